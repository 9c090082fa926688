"""The compact Pareto-set artifact of a run, one file per decoder layer.

`<run_dir>/pareto/meta.json` says what was pruned (model, tasks, pattern,
solver config, linears); `layer_XXX.npz` holds, per linear, the compact
Pareto set `(S_c, W, W_1..W_m, d)` [paper-summary]: the core as packed
bits, the global and task models as packed supports plus their nonzero
values (float32), and the column scale `d`; a run with the preference
refit [ours, the default] adds per group of linears its task Grams in
the compact form of `gram_store` (diagonal + float16 correlation
triangle). Any preference, including ones the run did not evaluate, is
materialised from these with `mosp_jax.solvers.mosp_materialize` (no
solve but the refit), which is deterministic: the same inputs give the
weights the run evaluated. Sets written before the compact form hold
float32 Grams (`gram/<group>`); they are still read.

Every file is written under a temporary name and renamed into place, with
the permissions the umask gives a new file (like every other output).
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
import zipfile
from collections.abc import Callable
from typing import Any, BinaryIO

import numpy as np

from mosp_jax.pipeline.gram_store import StoredGrams
from mosp_jax.solvers import ParetoLayer

META = "meta.json"
GRAM = "gram"  # Key prefix of the optional task Grams.
# Stored Grams: `gram/<group>/diag` and `gram/<group>/corr`; a key
# `gram/<group>` alone is a float32 Gram of an older set.
# What reading a cut or corrupt .npz raises, depending on where it is cut.
_UNREADABLE = (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError)


class ArtifactError(ValueError):
  """A Pareto-set file is missing, truncated or corrupt; names the file."""


def new_file_mode() -> int:
  """The permissions `open()` gives a new file under the current umask
  (`tempfile.mkstemp` makes its files private instead)."""
  umask = os.umask(0)
  os.umask(umask)
  return 0o666 & ~umask


def atomic_write(path: pathlib.Path, write: Callable[[BinaryIO], Any]
                 ) -> None:
  """Writes `path` with `write(file)` through a temporary file in the same
  folder, renamed into place: a reader sees the old file or the new one,
  never half of one."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                             suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.chmod(tmp, new_file_mode())
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Writes `obj` as indented JSON, atomically."""
  data = (json.dumps(obj, indent=2) + "\n").encode()
  atomic_write(pathlib.Path(path), lambda f: f.write(data))


def write_text(path: str | os.PathLike, text: str) -> None:
  atomic_write(pathlib.Path(path), lambda f: f.write(text.encode()))


def layer_path(root: pathlib.Path, layer: int) -> pathlib.Path:
  return root / f"layer_{layer:03d}.npz"


def _pack(name: str, W: np.ndarray) -> dict[str, np.ndarray]:
  """A sparse `W (..., n_in, n_out)` as its packed support and values."""
  nz = W != 0
  return {f"{name}/nonzero": np.packbits(nz.ravel()),
          f"{name}/values": W[nz].astype(np.float32),
          f"{name}/shape": np.asarray(W.shape, np.int64)}


def _unpack(z: np.lib.npyio.NpzFile, name: str) -> np.ndarray:
  shape = tuple(int(s) for s in z[f"{name}/shape"])
  size = int(np.prod(shape))
  nz = np.unpackbits(z[f"{name}/nonzero"], count=size).astype(bool)
  W = np.zeros(size, np.float32)
  W[nz] = z[f"{name}/values"]
  return W.reshape(shape)


def save_layer(root: str | os.PathLike, layer: int,
               linears: dict[str, ParetoLayer],
               grams: dict[str, StoredGrams] | None = None) -> None:
  """Saves one layer's Pareto sets.

  Args:
    root: the artifact folder (`<run_dir>/pareto`).
    layer: decoder layer index.
    linears: `{name: ParetoLayer}` of numpy arrays (`core (n_in, n_out)`
      bool, `W (n_in, n_out)`, `W_tasks (m, n_in, n_out)`, `d (n_in,)`).
    grams: `{group key: StoredGrams}` task Grams, stored only for a
      refit of the preference models [ours; `pref_refit_iters`].
  """
  arrays: dict[str, np.ndarray] = {}
  for k, g in (grams or {}).items():
    arrays[f"{GRAM}/{k}/diag"] = np.asarray(g.diag, np.float32)
    arrays[f"{GRAM}/{k}/corr"] = np.asarray(g.corr, np.float16)
  for name, par in linears.items():
    arrays[f"{name}/core"] = np.packbits(np.asarray(par.core).ravel())
    arrays |= _pack(f"{name}/W", np.asarray(par.W))
    arrays |= _pack(f"{name}/W_tasks", np.asarray(par.W_tasks))
    arrays[f"{name}/d"] = np.asarray(par.d, np.float32)
  # numpy's stub checks `**arrays` against `allow_pickle: bool` too; no
  # key here is 'allow_pickle'.
  atomic_write(layer_path(pathlib.Path(root), layer),
               lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]


def _unreadable(path: pathlib.Path, e: BaseException) -> ArtifactError:
  return ArtifactError(
      f"{path}: unreadable Pareto set ({type(e).__name__}: {e}); the file "
      f"is truncated or corrupt ({path.stat().st_size} bytes); rerun "
      "experiments.run with --overwrite to rebuild it")


def check_layers(root: str | os.PathLike, num_layers: int) -> None:
  """Checks that every layer file exists and is a complete archive (CRC of
  every member), without unpacking it.

  Raises:
    ArtifactError: naming the first missing or damaged file.
  """
  for layer in range(num_layers):
    path = layer_path(pathlib.Path(root), layer)
    if not path.is_file():
      raise ArtifactError(f"{path}: missing; the run saved no Pareto set "
                          f"for layer {layer}")
    try:
      with zipfile.ZipFile(path) as zf:
        bad = zf.testzip()
    except _UNREADABLE as e:
      raise _unreadable(path, e) from e
    if bad is not None:
      raise _unreadable(path, zipfile.BadZipFile(f"bad CRC in {bad}"))


def load_layer(root: str | os.PathLike, layer: int
               ) -> dict[str, ParetoLayer]:
  """Inverse of `save_layer`: `{name: ParetoLayer}` of numpy arrays.

  Raises:
    FileNotFoundError: no file for `layer`.
    ArtifactError: the file is truncated or corrupt (names it).
  """
  path = layer_path(pathlib.Path(root), layer)
  if not path.exists():
    raise FileNotFoundError(f"{path}: no Pareto set saved for layer {layer}")
  linears = {}
  try:
    with np.load(path) as z:
      names = sorted({k.split("/", 1)[0] for k in z.files} - {GRAM})
      for name in names:
        W = _unpack(z, f"{name}/W")
        core = np.unpackbits(z[f"{name}/core"], count=W.size)
        linears[name] = ParetoLayer(
            core=core.astype(bool).reshape(W.shape), W=W,
            W_tasks=_unpack(z, f"{name}/W_tasks"), d=z[f"{name}/d"])
  except _UNREADABLE as e:
    raise _unreadable(path, e) from e
  return linears


def load_grams(root: str | os.PathLike, layer: int
               ) -> dict[str, StoredGrams | np.ndarray]:
  """The task Grams saved with a layer (only by runs that refit their
  preference models): `{group key: StoredGrams}`, or `(m, n_in, n_in)`
  float32 arrays from a set written before the compact form."""
  path = layer_path(pathlib.Path(root), layer)
  grams: dict[str, StoredGrams | np.ndarray] = {}
  try:
    with np.load(path) as z:
      for k in z.files:
        parts = k.split("/")
        if parts[0] != GRAM:
          continue
        if len(parts) == 2:
          grams[parts[1]] = z[k]
        elif parts[2] == "diag":
          grams[parts[1]] = StoredGrams(
              diag=z[k], corr=z[f"{GRAM}/{parts[1]}/corr"])
  except FileNotFoundError:
    raise
  except _UNREADABLE as e:
    raise _unreadable(path, e) from e
  if not grams:
    raise FileNotFoundError(f"{path}: no task Grams saved (the run did "
                            "not refit its preference models)")
  return grams
