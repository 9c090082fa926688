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

A data-free method (magnitude) builds one model. Capture, propagation and
evaluation reuse `prune.py`'s helpers, so a baseline and MOSP see
identical inputs and numerics.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from mosp_jax import baselines
from mosp_jax.config import SolverConfig
from mosp_jax.pipeline.grams import layer_grams
from mosp_jax.pipeline.prune import (
  WalkResult,
  _check_finite,
  _device_batches,
  _embed,
  _propagate,
  eta_text,
  stream_ppl,
)
from mosp_jax.solvers import Pattern, concat_gram, mixed_gram

_mix = jax.jit(mixed_gram)
_concat = jax.jit(concat_gram)
PROTOCOLS = ("concat", "mixed", "data-free")


@jax.jit
def _zeros(W: jax.Array) -> jax.Array:
  return (W == 0).sum()


def baseline_walk(
    adapter: Any, params: Any, calib: Sequence[np.ndarray],
    test: Sequence[np.ndarray], prefs: np.ndarray, *, method: str,
    pattern: Pattern, cfg: SolverConfig, batch_size: int,
    protocol: str = "mixed",
    log: Callable[[str], None] = print) -> WalkResult:
  """Prunes `params` with `method` under `protocol` and evaluates.

  Args:
    adapter, params: the model (dense parameters on the device).
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

  Returns:
    `WalkResult` with `(P, m)` perplexities for 'mixed', `(1, m)` for the
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
  n_models = prefs.shape[0]
  used = [[] if protocol == "data-free" else
          [i for i in range(m) if prefs[p, i] > 0] for p in range(n_models)]
  lams = [jax.device_put(prefs[p]) for p in range(n_models)]
  seconds = dict.fromkeys(("capture", "solve", "propagate", "evaluate"),
                          0.0)
  t_start = time.perf_counter()

  def embed(ids):
    return [_embed(adapter, params, b)
            for b in _device_batches(np.asarray(ids), batch_size)]

  def advance(lp, stream):
    return [_propagate(adapter, lp, h) for h in stream]

  def gram(G_dev, W0, p):
    if protocol == "data-free":
      return None
    if protocol == "concat":
      return _concat(G_dev)
    return _mix(G_dev, W0, lams[p])

  needed = sorted({i for u in used for i in u})
  calib_h0 = {i: embed(calib[i]) for i in needed}
  calib_h = [{i: calib_h0[i] for i in used[p]} for p in range(n_models)]
  test_ids = [_device_batches(np.asarray(t), batch_size) for t in test]
  test_h0 = [embed(t) for t in test]
  dense_h = list(test_h0)
  model_h = [list(test_h0) for _ in range(n_models)]

  n_layers = adapter.num_layers(params)
  groups = adapter.linear_groups()
  zeros, weights_total = np.zeros(n_models), 0
  layers_out, durations = [], []
  for layer in range(n_layers):
    lp = adapter.layer_params(params, layer)
    t_cap = t_solve = t_prop = t_eval = 0.0
    for p in range(n_models):
      t0 = time.perf_counter()
      grams = {i: layer_grams(adapter, lp, calib_h[p][i],
                              where=f"{method} model {p}, layer {layer}, "
                              f"task {i}") for i in used[p]}
      t1 = time.perf_counter()
      mp = params
      for group in groups:
        G_dev = None
        if used[p]:
          G = np.zeros((m, *grams[used[p][0]][group[0]].shape), np.float32)
          for i in used[p]:
            G[i] = grams[i][group[0]]
          G_dev = jax.device_put(G)
        for name in group:
          W0 = adapter.get_kernel(params, layer, name)
          W = baselines.prune_single(method, gram(G_dev, W0, p), W0,
                                     pattern=pattern, cfg=cfg)
          _check_finite(W, f"{method} model {p}, layer {layer} {name}: "
                        "pruned weights")
          mp = adapter.set_kernel(mp, layer, name, W)
          zeros[p] += int(jax.device_get(_zeros(W)))
          if p == 0:
            weights_total += W0.size
      t2 = time.perf_counter()
      lpp = adapter.layer_params(mp, layer)
      calib_h[p] = {i: advance(lpp, h) for i, h in calib_h[p].items()}
      for i, stream in calib_h[p].items():
        for h in stream:
          _check_finite(h, f"{method} model {p}, layer {layer}: task {i} "
                        "activations")
      t3 = time.perf_counter()
      model_h[p] = jax.block_until_ready([advance(lpp, h)
                                          for h in model_h[p]])
      t4 = time.perf_counter()
      t_cap, t_solve = t_cap + t1 - t0, t_solve + t2 - t1
      t_prop, t_eval = t_prop + t3 - t2, t_eval + t4 - t3
    t0 = time.perf_counter()
    dense_h = jax.block_until_ready([advance(lp, h) for h in dense_h])
    t_eval += time.perf_counter() - t0
    for key, value in (("capture", t_cap), ("solve", t_solve),
                       ("propagate", t_prop), ("evaluate", t_eval)):
      seconds[key] += value
    durations.append(t_cap + t_solve + t_prop + t_eval)
    layers_out.append({"layer": layer, "capture_s": t_cap,
                       "solve_s": t_solve, "propagate_s": t_prop,
                       "evaluate_s": t_eval})
    done = time.perf_counter() - t_start
    log(f"{method}-{protocol} layer {layer + 1}/{n_layers}: capture "
        f"{t_cap:.1f}s, solve {t_solve:.1f}s, propagate {t_prop:.1f}s, "
        f"evaluate {t_eval:.1f}s | elapsed {done:.0f}s, "
        f"{eta_text(durations, n_layers - layer - 1)}")

  t5 = time.perf_counter()
  dense_ppl = np.array([stream_ppl(adapter, params, dense_h[t], test_ids[t])
                        for t in range(m)])
  ppl = np.array([[stream_ppl(adapter, params, model_h[p][t], test_ids[t])
                   for t in range(m)] for p in range(n_models)])
  seconds["evaluate"] += time.perf_counter() - t5
  seconds["walk"] = seconds["capture"] + seconds["solve"] + seconds[
      "propagate"]
  seconds["total"] = time.perf_counter() - t_start
  return WalkResult(prefs=prefs, ppl=ppl, dense_ppl=dense_ppl,
                    sparsity=zeros / max(weights_total, 1),
                    layers=layers_out, seconds=seconds)
