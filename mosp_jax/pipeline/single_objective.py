"""The layer walk for single-objective baselines.

Two protocols (docs/METHOD_NOTES.md#baselines):

- `concat` [paper-summary, the paper's]: ONE model, pruned on the
  concatenated calibration data: every task's stream runs through this
  model and the Gram of each linear is the mean of the task Grams.
- `mixed` [ours, stricter]: one model per preference `lam`, each pruned
  for the mixed objective `F_lam` alone: for every decoder layer and
  every model, capture the Gram of each task `i` with `lam_i > 0` on that
  task's calibration data flowing through *this* model, prune every
  linear on `H_lam = sum_i lam_i G_i / tr(W0^T G_i W0)` and advance the
  model's streams. At a vertex `e_i` this is the single-task run.

A data-free method (magnitude) builds one model. Each model is a
`walk.Unit` of the one layer walk (`walk.py`) that MOSP's walk uses too, so
a baseline and MOSP see identical inputs and numerics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from mosp_jax import baselines
from mosp_jax.config import SolverConfig
from mosp_jax.models.base import Adapter, Params
from mosp_jax.pipeline import linear_problem, streams, walk
from mosp_jax.pipeline.layer_source import DenseLayers
from mosp_jax.solvers import Pattern

PROTOCOLS = linear_problem.PROTOCOLS


@jax.jit
def _zeros(W: jax.Array) -> jax.Array:
  return (W == 0).sum()


def baseline_walk(
    adapter: Adapter, model: DenseLayers, calib: Sequence[np.ndarray],
    test: Sequence[np.ndarray], prefs: np.ndarray, *, method: str,
    pattern: Pattern, cfg: SolverConfig, batch_size: int,
    protocol: str = "mixed",
    log: Callable[[str], None] = print,
    offload_streams: bool = False) -> walk.Front:
  """Prunes `model` with `method` under `protocol` and evaluates.

  Args:
    adapter, model: the model, read one layer at a time (`layer_source`).
    calib: per task, `(N, T)` int32 calibration segments.
    test: per task, `(n_i, T')` int32 test segments.
    prefs: `(P, m)` preferences (rows on the simplex); used by 'mixed'.
    method: one of `baselines.METHODS`.
    pattern: sparsity pattern per linear.
    cfg: hyperparameters (damping; ALPS's schedule and PCG).
    batch_size: sequences per forward batch.
    protocol: 'concat' (one model on the concatenated data), 'mixed' (one
      model per preference) or 'data-free' (magnitude: one model).
    log: progress sink, one line per layer.
    offload_streams: keep the streams in host memory between layers.

  Returns:
    `walk.Front` with `(P, m)` perplexities for 'mixed', `(1, m)` for the
    one model of the others (its `prefs` row the uniform mix, which the
    concatenated data weighs equally); `layers` holds per-layer timings.
  """
  if method not in baselines.METHODS:
    raise ValueError(f"unknown method {method!r}; expected one of "
                     f"{baselines.METHODS}")
  if protocol not in PROTOCOLS:
    raise ValueError(f"protocol must be one of {PROTOCOLS}, got "
                     f"{protocol!r}")
  if (method in baselines.DATA_FREE) != (protocol == "data-free"):
    raise ValueError(f"{method} needs protocol 'data-free' exactly when "
                     "it uses no data")
  m = len(calib)
  prefs = np.asarray(prefs, np.float32)
  if prefs.ndim != 2 or prefs.shape[1] != m:
    raise ValueError(f"prefs must be (P, {m}), got {prefs.shape}")
  if protocol != "mixed":
    prefs = np.full((1, m), 1.0 / m, np.float32)
  units = [baseline_unit(adapter, prefs[p], method=method,
                         protocol=protocol, pattern=pattern, cfg=cfg,
                         where=f"{method} model {p}, ")
           for p in range(prefs.shape[0])]
  res = walk.walk_layers(adapter, model, calib, test, units,
                         batch_size=batch_size, label=f"{method}-{protocol} ",
                         log=log, offload_streams=offload_streams)
  return walk.Front(prefs=prefs, ppl=res.ppl, sparsity=res.sparsity,
                    global_ppl=None, walk=res)


def baseline_unit(adapter: Adapter, lam: np.ndarray, *,
                  method: str, protocol: str, pattern: Pattern,
                  cfg: SolverConfig, where: str = "") -> walk.Unit:
  """One baseline model as a `walk.Unit`: the calibration streams of the
  tasks with `lam_i > 0` (none for 'data-free') go through the model that
  `method` prunes on the protocol's Gram; `lam (m,)` is used by 'mixed'.
  Arguments as `baseline_walk`."""
  m = lam.shape[0]
  used = () if protocol == "data-free" else tuple(
      i for i in range(m) if lam[i] > 0)
  lam_dev = jax.device_put(lam)

  def solve(layer: int, dense: Params, grams: dict[int, walk.Grams]
            ) -> tuple[list[Params], Any]:
    def to_device(key: str) -> jax.Array | None:
      if not used:
        return None
      # Tasks the model does not weigh enter as zero Grams.
      G = np.zeros((m, *grams[used[0]][key].shape), np.float32)
      for i in used:
        G[i] = grams[i][key]
      return jax.device_put(G)

    lp, zeros, weights = dense, 0, 0
    for prob in linear_problem.layer_problems(adapter, dense, to_device,
                                              pattern=pattern):
      W = prob.baseline(method, protocol, cfg, lam=lam_dev)
      streams.check_finite(W, f"{where}layer {layer} {prob.name}: pruned "
                        "weights")
      lp = adapter.set_layer_kernel(lp, prob.name, W)
      zeros += int(jax.device_get(_zeros(W)))
      weights += prob.W0.size
    return [lp] * len(used), (lp, walk.Evaluated([zeros], weights))

  def evaluate(layer: int, dense: Params, solved: Any,
               advance: walk.Advance) -> walk.Evaluated:
    del layer, dense  # the model's layer is the solve's
    lp, evaluated = solved
    advance(0, lp)
    return evaluated

  return walk.Unit(tasks=used, models=1, solve=solve, evaluate=evaluate,
                   where=where)
