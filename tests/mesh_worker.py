"""Sharded vs one-device solver runs; prints one JSON line (test_mesh.py).

Run in a fresh process with forced host devices, before JAX initialises:

  XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
      python -m tests.mesh_worker
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

from mosp_jax.pipeline.layer_source import from_tree
from mosp_jax.solvers import (
  NM,
  Unstructured,
  alps_prune,
  make_mesh,
  mosp_prune,
  relative_error,
)

from .conftest import task_grams

# n_out = 256 keeps >= 64 local columns per device: XLA:CPU sends narrower
# matmuls through another kernel whose rounding depends on the width.
N_IN, N_OUT = 64, 256
PATTERNS = {"unstructured": Unstructured(0.5), "2:4": NM(2, 4)}
# mesh spec -> tasks. With one preference there are m + 1 = 4 models:
# '2x2' splits them over its task axis.
CASES = {"4": 3, "2x2": 3}


def _errors(grams: np.ndarray, W0: np.ndarray, weights: np.ndarray
            ) -> np.ndarray:
  """`(models, tasks)` relative errors, computed on one device."""
  rel = jax.jit(jax.vmap(jax.vmap(relative_error, (0, None, None)),
                         (None, None, 0)))
  return np.asarray(jax.device_get(rel(*jax.device_put(
      (grams, W0, weights)))))


def _rel_diff(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-30)))


def solver_cases() -> list[dict]:
  rng = np.random.default_rng(0)
  out = []
  for spec, m in CASES.items():
    mesh = make_mesh(spec)
    grams = task_grams(rng, m, N_IN)
    W0 = rng.standard_normal((N_IN, N_OUT)).astype(np.float32)
    prefs = np.full((1, m), 1.0 / m, np.float32)
    for name, pattern in PATTERNS.items():
      with jax.transfer_guard("disallow"):
        one = mosp_prune(*jax.device_put((grams, W0, prefs)),
                         pattern=pattern)
        shd = mosp_prune(*jax.device_put((grams, W0, prefs)),
                         pattern=pattern, mesh=mesh)
        a_one = alps_prune(*jax.device_put((grams[0], W0)),
                           pattern=pattern)
        a_shd = alps_prune(*jax.device_put((grams[0], W0)),
                           pattern=pattern, mesh=mesh)
      spread = {"W_tasks": shd.pareto.W_tasks.sharding,
                "weights": shd.weights.sharding, "alps": a_shd[0].sharding}
      one, shd, a_one, a_shd = jax.device_get((one, shd, a_one, a_shd))
      out.append({
          "mesh": spec, "m": m, "pattern": name,
          "devices": {k: len(s.device_set) for k, s in spread.items()},
          "specs": {k: str(v.spec) for k, v in spread.items()},
          "mosp_masks_equal": bool(np.array_equal(one.masks, shd.masks)),
          "core_equal": bool(np.array_equal(one.pareto.core,
                                            shd.pareto.core)),
          "global_equal": bool(np.array_equal(one.pareto.W,
                                              shd.pareto.W)),
          "budget": int(pattern.keep(N_IN, N_OUT)),
          "nnz": np.asarray(shd.masks.sum((1, 2))).tolist(),
          "mosp_rel_objective_diff": _rel_diff(
              _errors(grams, W0, one.weights),
              _errors(grams, W0, shd.weights)),
          "iters": [int(one.info.stage1.iters), int(shd.info.stage1.iters)],
          "stage2_iters": [np.asarray(one.info.stage2.iters).tolist(),
                           np.asarray(shd.info.stage2.iters).tolist()],
          "alps_masks_equal": bool(np.array_equal(a_one[1], a_shd[1])),
          "alps_rel_objective_diff": _rel_diff(
              _errors(grams[:1], W0, a_one[0][None]),
              _errors(grams[:1], W0, a_shd[0][None])),
      })
  return out


def pipeline_case() -> dict:
  """A one-layer random Llama pruned for two token streams, with the
  solvers on one device and on the mesh '4'."""
  from mosp_jax import models
  from mosp_jax.config import SolverConfig
  from mosp_jax.pipeline.prune import prune_and_evaluate

  model, params = models.tiny_llama(vocab_size=97, hidden_size=64,
                                    num_layers=1)
  adapter = models.adapter_for(model)
  params = jax.device_put(params)
  rng = np.random.default_rng(1)
  calib = [rng.integers(0, 97, (4, 32), dtype=np.int32) for _ in range(2)]
  test = [rng.integers(0, 97, (2, 32), dtype=np.int32) for _ in range(2)]
  prefs = np.array([[1, 0], [0, 1], [0.5, 0.5]], np.float32)
  runs = {}
  for spec in ("", "4"):
    with jax.transfer_guard("disallow"):
      res = prune_and_evaluate(
          adapter, from_tree(adapter, params), calib, test, prefs,
          pattern=Unstructured(0.5),
          cfg=SolverConfig(), batch_size=2, log=lambda _: None,
          mesh=make_mesh(spec))
    runs[spec or "one"] = res
  one, shd = runs["one"], runs["4"]
  return {"ppl": [one.ppl.tolist(), shd.ppl.tolist()],
          "sparsity": [one.sparsity.tolist(), shd.sparsity.tolist()],
          "rel_error": [[list(map(list, lin.rel_error))
                         for lin in r.walk.layers[0].linears.values()]
                        for r in (one, shd)],
      "global_ppl": [one.global_ppl.tolist(), shd.global_ppl.tolist()]}


def pcg_case() -> dict:
  """PCG on a column-split 576 x 256 problem against one device: how
  many entries of the weights and of the residual norms differ
  (`pcg.column_sums` makes the column sums independent of the split;
  `jnp.sum(axis=0)` and `jnp.linalg.norm(axis=0)` were not)."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from mosp_jax.solvers import pcg, projection

  rng = np.random.default_rng(1)
  n, o = 576, 256
  X = rng.standard_normal((2 * n, n)).astype(np.float32)
  H = X.T @ X / (2 * n) + 0.01 * np.eye(n, dtype=np.float32)
  W0 = rng.standard_normal((n, o)).astype(np.float32)
  mask = np.asarray(projection.topk_mask(np.abs(W0), n * o // 2))
  mesh = make_mesh("4")
  cols = NamedSharding(mesh, P(None, "cols"))
  fn = jax.jit(lambda h, w, mk: pcg.masked_pcg(h, w, mk, w, iters=10))
  one = jax.device_get(fn(*jax.device_put((H, W0, mask))))
  split = jax.device_get(fn(
      jax.device_put(H, NamedSharding(mesh, P())),
      jax.device_put(W0, cols), jax.device_put(mask, cols)))
  return {"pcg_entries_differing": int(np.sum(one[0] != split[0])),
          "pcg_residuals_differing": int(np.sum(
              one[1].residual != split[1].residual))}


def uneven_error() -> str:
  """The error for output columns that do not split over the devices."""
  grams = np.eye(8, dtype=np.float32)[None]
  try:
    mosp_prune(grams, np.ones((8, 6), np.float32), np.ones((0, 1),
               np.float32), pattern=Unstructured(0.5), mesh=make_mesh("4"))
  except ValueError as e:
    return str(e)
  return ""


def main() -> None:
  print(json.dumps({"device_count": jax.device_count(),
                    "cases": solver_cases(),
                    "pipeline": pipeline_case(),
                    "pcg": pcg_case(),
                    "uneven_error": uneven_error()}))
  sys.stdout.flush()


if __name__ == "__main__":
  main()
