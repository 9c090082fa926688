"""The compact Pareto-set artifact of a run, one file per decoder layer.

`<run_dir>/pareto/meta.json` says what was pruned (model, tasks, pattern,
solver config, linears); `layer_XXX.npz` holds, per linear, the shared core
mask and the task-specific stage-2 weights (as a packed nonzero mask plus
the nonzero values), and per linear group the task Grams. Any preference,
including ones the run did not evaluate, is materialised from these with
`mosp_jax.solvers.mosp_materialize`, which is deterministic: the same
inputs give the weights the run evaluated.

Every file is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any

import numpy as np

META = "meta.json"


def _atomic_write(path: pathlib.Path, write) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                             suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Writes `obj` as indented JSON, atomically."""
  data = (json.dumps(obj, indent=2) + "\n").encode()
  _atomic_write(pathlib.Path(path), lambda f: f.write(data))


def write_text(path: str | os.PathLike, text: str) -> None:
  _atomic_write(pathlib.Path(path), lambda f: f.write(text.encode()))


def layer_path(root: pathlib.Path, layer: int) -> pathlib.Path:
  return root / f"layer_{layer:03d}.npz"


def save_layer(root: str | os.PathLike, layer: int,
               linears: dict[str, tuple[np.ndarray, np.ndarray]],
               grams: dict[str, np.ndarray]) -> None:
  """Saves one layer.

  Args:
    root: the artifact folder (`<run_dir>/pareto`).
    layer: decoder layer index.
    linears: `{name: (core (n_in, n_out) bool, task_sparse (m, n_in, n_out)
      float32)}`.
    grams: `{group key: (m, n_in, n_in) float32}`.
  """
  arrays = {}
  for name, (core, task_sparse) in linears.items():
    nz = task_sparse != 0
    arrays[f"{name}/core"] = np.packbits(core.ravel())
    arrays[f"{name}/nonzero"] = np.packbits(nz.ravel())
    arrays[f"{name}/values"] = task_sparse[nz].astype(np.float32)
    arrays[f"{name}/shape"] = np.asarray(task_sparse.shape, np.int64)
  for key, g in grams.items():
    arrays[f"gram/{key}"] = g.astype(np.float32)
  _atomic_write(layer_path(pathlib.Path(root), layer),
                lambda f: np.savez(f, **arrays))


def load_layer(root: str | os.PathLike, layer: int
               ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]],
                          dict[str, np.ndarray]]:
  """Inverse of `save_layer`: `(linears, grams)`."""
  path = layer_path(pathlib.Path(root), layer)
  if not path.exists():
    raise FileNotFoundError(f"{path}: no Pareto set saved for layer {layer}")
  linears, grams = {}, {}
  with np.load(path) as z:
    names = sorted({k.rsplit("/", 1)[0] for k in z.files
                    if not k.startswith("gram/")})
    for name in names:
      shape = tuple(int(s) for s in z[f"{name}/shape"])
      size = int(np.prod(shape))
      core = np.unpackbits(z[f"{name}/core"], count=size // shape[0])
      nz = np.unpackbits(z[f"{name}/nonzero"], count=size).astype(bool)
      task_sparse = np.zeros(size, np.float32)
      task_sparse[nz] = z[f"{name}/values"]
      linears[name] = (core.astype(bool).reshape(shape[1:]),
                       task_sparse.reshape(shape))
    for k in z.files:
      if k.startswith("gram/"):
        grams[k[len("gram/"):]] = z[k]
  return linears, grams
