"""A PyTorch checkpoint folder converted to a Flax checkpoint tensor by tensor.

[ours] The whole-model conversion of `bridge.torch_convert` builds the PyTorch
model, its state dict in numpy and the Flax tree: about three float32
copies of the model in host memory at once (about 81 GB for Llama-2-7B,
360 GB for OPT-30B). Here each tensor is read from its shard
(`safetensors.safe_open`; for pickled shards, `torch.load(mmap=True,
weights_only=True)`, which maps the file and reads a tensor's bytes when
it is used: older checkpoints such as OPT's came as pickles), renamed and
transposed by `bridge.rename`'s
table, cast to float32 and appended to the output file, whose header is
computed first from the shards' shapes; the names and shapes are checked
against the Flax model (`rename.tree_diff`) before any data is read. Host
memory holds one tensor (two while a kernel is transposed, and the
embedding beside the head when a tied head is checked).

The output is a float32 safetensors file with metadata `format: flax`,
the layout `flax_checkpoint.save_flax_dir` writes, read by the same loaders.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pathlib
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from bridge import model_files, rename

INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"


class _Shape(NamedTuple):
  """A tensor's shape, as `rename.tree_diff` reads leaves."""

  shape: tuple[int, ...]


def shard_files(folder: str | os.PathLike, *,
                pickle: bool = False) -> list[pathlib.Path]:
  """The weight files of a PyTorch checkpoint folder: those its index
  names (`model.safetensors.index.json`, or `pytorch_model.bin.index.json`
  when `pickle`), else every `*.safetensors` (every pickle file)."""
  d = pathlib.Path(folder)
  index = d / (PICKLE_INDEX if pickle else INDEX)
  if index.exists():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise rename.CheckpointMismatchError(
          f"{index}: unreadable index ({e})") from e
    return [d / n for n in sorted(set(weight_map.values()))]
  if pickle:
    return sorted(f for f in d.iterdir()
                  if f.name.endswith(model_files.PICKLE_SUFFIXES))
  return sorted(d.glob("*.safetensors"))


class _Tensor(NamedTuple):
  """A stored tensor: its shape and how to read it (a torch tensor)."""

  shape: tuple[int, ...]
  read: Callable[[], Any]


def _safetensors_tensors(path: pathlib.Path,
                         stack: contextlib.ExitStack) -> dict[str, _Tensor]:
  from safetensors import safe_open

  h = stack.enter_context(safe_open(str(path), framework="pt"))
  return {key: _Tensor(tuple(h.get_slice(key).get_shape()),
                       functools.partial(h.get_tensor, key))
          for key in h.keys()}  # noqa: SIM118 (a safe_open handle)


def _pickle_tensors(path: pathlib.Path, what: str) -> dict[str, _Tensor]:
  """The tensors of a pickled state dict, memory-mapped. Raises
  CheckpointMismatchError when the file cannot be mapped (the legacy,
  pre-zip format) or holds more than tensors: then it converts whole."""
  import pickle

  import torch

  try:
    state = torch.load(str(path), map_location="cpu", mmap=True,
                       weights_only=True)
  except (RuntimeError, pickle.UnpicklingError, OSError, EOFError) as e:
    raise rename.CheckpointMismatchError(
        f"{what}: {path.name} cannot be memory-mapped ({e})") from e
  if not isinstance(state, dict) or not all(
      isinstance(v, torch.Tensor) for v in state.values()):
    raise rename.CheckpointMismatchError(
        f"{what}: {path.name} is not a state dict of tensors")
  # `detach` is a view: the bytes are read when the tensor is cast.
  return {key: _Tensor(tuple(t.shape), t.detach) for key, t in state.items()}


def write_float32(path: str | os.PathLike,
                  entries: Sequence[tuple[str, tuple[int, ...],
                                          Callable[[], np.ndarray]]],
                  metadata: Mapping[str, str]) -> None:
  """Writes a safetensors file of float32 tensors one at a time.

  Args:
    path: the file (overwritten).
    entries: `(name, shape, read)`; `read()` returns the tensor (any float
      dtype, cast here) and is called once, in order, while it is written.
    metadata: the header's `__metadata__` strings.
  """
  header: dict[str, Any] = {"__metadata__": dict(metadata)}
  offset = 0
  for name, shape, _ in entries:
    size = 4 * int(np.prod(shape, dtype=np.int64))
    header[name] = {"dtype": "F32", "shape": list(shape),
                    "data_offsets": [offset, offset + size]}
    offset += size
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for name, shape, read in entries:
      arr = np.ascontiguousarray(read(), dtype="<f4")
      if arr.shape != tuple(shape):
        raise ValueError(f"{name}: read {arr.shape}, header says {shape}")
      f.write(arr.data)


def convert(folder: str | os.PathLike, dest: str | os.PathLike, *,
            expected: Mapping[tuple[str, ...], rename.Shaped],
            model_type: str, tie_word_embeddings: bool, what: str,
            pickle: bool = False) -> None:
  """Converts the folder's PyTorch shards into the Flax checkpoint file
  `dest`, one tensor at a time.

  Args:
    folder: the PyTorch checkpoint folder (`shard_files`).
    dest: the output `model.safetensors`.
    expected: the Flax model's flat parameter tree (leaves with `.shape`).
    model_type: the HF `model_type` (its tied head, `rename.TIED_HEADS`).
    tie_word_embeddings: the config's flag; a tied head stored in the
      shards is checked against the embedding and dropped, as
      `rename.pt_to_flax` does.
    what: the checkpoint, for error messages.
    pickle: the shards are pickled (`*.bin`, ...), not safetensors.

  Raises:
    rename.CheckpointMismatchError: names or shapes differ from the
      model's (nothing is written then), a tensor is in two shards, a
      tied head differs from the embedding, or a pickle cannot be mapped.
  """
  import torch

  head_key, emb_path = rename.TIED_HEADS.get(model_type, (None, None))
  with contextlib.ExitStack() as stack:
    stored = _stored_tensors(folder, stack, pickle=pickle, what=what)
    shapes, source, tied_head = _flax_shapes(
        stored, expected, head_key=head_key, emb_path=emb_path,
        tie_word_embeddings=tie_word_embeddings)
    rename.tree_diff(shapes, expected, what=what)

    def read(key: str, transpose: bool = False) -> np.ndarray:
      arr = stored[key].read().to(torch.float32).numpy()
      return arr.T if transpose else arr

    if tied_head:
      assert head_key is not None and emb_path is not None
      rename.check_tied_head(read(head_key), read(source[emb_path][0]),
                             head_key=head_key, what=what)
    write_float32(dest, [
        (".".join(path), shapes[path].shape, functools.partial(read, key, t))
        for path, (key, t) in sorted(source.items())], {"format": "flax"})


def _stored_tensors(folder: str | os.PathLike, stack: contextlib.ExitStack,
                    *, pickle: bool, what: str) -> dict[str, _Tensor]:
  """Every tensor of the folder's shards by PyTorch name (files kept open
  by `stack`); raises CheckpointMismatchError for a name in two shards."""
  stored: dict[str, _Tensor] = {}
  for f in shard_files(folder, pickle=pickle):
    tensors = (_pickle_tensors(f, what) if pickle
               else _safetensors_tensors(f, stack))
    for key, tensor in tensors.items():
      if key in stored:
        raise rename.CheckpointMismatchError(
            f"{what}: tensor {key} is stored in two shards")
      stored[key] = tensor
  return stored


def _flax_shapes(stored: Mapping[str, _Tensor],
                 expected: Mapping[tuple[str, ...], rename.Shaped], *,
                 head_key: str | None, emb_path: tuple[str, ...] | None,
                 tie_word_embeddings: bool
                 ) -> tuple[dict[tuple[str, ...], _Shape],
                            dict[tuple[str, ...], tuple[str, bool]], bool]:
  """The stored tensors renamed onto Flax paths (`rename.flax_path`).

  Returns:
    `(shapes, source, tied_head)`: the shape at every Flax path, for
    `rename.tree_diff` (a name no rule maps is kept under its own path,
    which the diff reports as unexpected; a tied head stored with no
    embedding under its own, shape `()`); per mapped path its
    `(PyTorch name, transpose)`; whether a tied head is stored.
  """
  shapes: dict[tuple[str, ...], _Shape] = {}
  source: dict[tuple[str, ...], tuple[str, bool]] = {}
  tied_head = False
  for key, tensor in stored.items():
    if rename.ignored(key):
      continue
    shape = tensor.shape
    rule = rename.flax_path(key, expected)
    if rule is None:
      if tie_word_embeddings and key == head_key:
        tied_head = True
      else:  # tree_diff names it as unexpected
        shapes[tuple(key.split("."))] = _Shape(shape)
      continue
    path, transpose = rule
    shapes[path] = _Shape(shape[::-1] if transpose else shape)
    source[path] = (key, transpose)
  if tied_head and emb_path not in source:
    shapes[tuple(str(head_key).split("."))] = _Shape(())
  return shapes, source, tied_head
