"""The layer walk for single-objective baselines (mixed calibration).

A baseline builds one model per preference `lam`, each pruned for the
mixed objective `F_lam` alone (METHOD.md section 7): for every decoder layer
and every model,
  1. capture the Gram of each task `i` with `lam_i > 0` on that task's
     calibration data flowing through *this* model (so a model keeps its
     own calibration streams, one per task it weighs);
  2. prune every linear with the baseline on the mixed Gram
     `H_lam = sum_i lam_i G_i / tr(W0^T G_i W0)`;
  3. advance the model's calibration and test streams through its pruned
     layer.
At a vertex `e_i` this is the single-task run on task `i`'s data only.
A data-free method (magnitude) builds one model, shared by every
preference. Capture, propagation and evaluation reuse `prune.py`'s
helpers, so a baseline and MOSP see identical inputs and numerics.
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
  _nll,
  _propagate,
)
from mosp_jax.solvers import Pattern, mixed_gram

_mix = jax.jit(mixed_gram)


@jax.jit
def _zeros(W: jax.Array) -> jax.Array:
  return (W == 0).sum()


def stream_ppl(adapter: Any, params: Any, stream: list[jax.Array],
               ids: list[jax.Array]) -> float:
  """Perplexity of hidden states after the last layer `(B, T, d)` batches
  against their token batches `(B, T)`."""
  total = sum(float(jax.device_get(_nll(adapter, params, h, i)))
              for h, i in zip(stream, ids, strict=True))
  count = sum(i.shape[0] * (i.shape[1] - 1) for i in ids)
  return float(np.exp(total / count))


def baseline_walk(
    adapter: Any, params: Any, calib: Sequence[np.ndarray],
    test: Sequence[np.ndarray], prefs: np.ndarray, *, method: str,
    pattern: Pattern, cfg: SolverConfig, batch_size: int,
    log: Callable[[str], None] = print) -> WalkResult:
  """Prunes `params` once per preference with `method` and evaluates.

  Args:
    adapter, params: the model (dense parameters on the device).
    calib: per task, `(N_i, T)` int32 calibration segments.
    test: per task, `(n_i, T')` int32 test segments.
    prefs: `(P, m)` preferences (rows on the simplex).
    method: one of `baselines.METHODS`.
    pattern: sparsity pattern per linear.
    cfg: hyperparameters (damping; ALPS's schedule and PCG).
    batch_size: sequences per forward batch.
    log: progress sink, one line per layer.

  Returns:
    `WalkResult` with `(P, m)` perplexities (a data-free method's single
    model repeated on every row) and timings; `layers` holds per-layer
    timings only.
  """
  if method not in baselines.METHODS:
    raise ValueError(f"unknown method {method!r}; expected one of "
                     f"{baselines.METHODS}")
  m = len(calib)
  prefs = np.asarray(prefs, np.float32)
  if prefs.ndim != 2 or prefs.shape[1] != m:
    raise ValueError(f"prefs must be (P, {m}), got {prefs.shape}")
  P = prefs.shape[0]
  data_free = method in baselines.DATA_FREE
  n_models = 1 if data_free else P
  used = [[] if data_free else [i for i in range(m) if prefs[p, i] > 0]
          for p in range(n_models)]
  lams = [jax.device_put(prefs[p]) for p in range(n_models)]
  seconds = {"capture": 0.0, "solve": 0.0, "propagate": 0.0,
             "evaluate": 0.0}
  t_start = time.perf_counter()

  def embed(ids):
    return [_embed(adapter, params, b)
            for b in _device_batches(np.asarray(ids), batch_size)]

  def advance(lp, stream):
    return [_propagate(adapter, lp, h) for h in stream]

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
  layers_out = []
  for layer in range(n_layers):
    lp = adapter.layer_params(params, layer)
    t_cap = t_solve = t_prop = 0.0
    for p in range(n_models):
      t0 = time.perf_counter()
      grams = {i: layer_grams(adapter, lp, calib_h[p][i],
                              where=f"{method} model {p}, layer {layer}, "
                              f"task {i}") for i in used[p]}
      t1 = time.perf_counter()
      mp = params
      for group in groups:
        G_dev = None
        if not data_free:
          G = np.zeros((m, *grams[used[p][0]][group[0]].shape), np.float32)
          for i in used[p]:
            G[i] = grams[i][group[0]]
          G_dev = jax.device_put(G)
        for name in group:
          W0 = adapter.get_kernel(params, layer, name)
          H = None if data_free else _mix(G_dev, W0, lams[p])
          W = baselines.prune_single(method, H, W0, pattern=pattern,
                                     cfg=cfg)
          _check_finite(W, f"{method} model {p}, layer {layer} {name}: "
                        "pruned weights")
          mp = adapter.set_kernel(mp, layer, name, W)
          zeros[p] += int(jax.device_get(_zeros(W)))
          if p == 0:
            weights_total += W0.size
      t2 = time.perf_counter()
      lpp = adapter.layer_params(mp, layer)
      calib_h[p] = {i: advance(lpp, h) for i, h in calib_h[p].items()}
      model_h[p] = [advance(lpp, h) for h in model_h[p]]
      for i, stream in calib_h[p].items():
        for h in stream:
          _check_finite(h, f"{method} model {p}, layer {layer}: task {i} "
                        "activations")
      t3 = time.perf_counter()
      t_cap, t_solve, t_prop = t_cap + t1 - t0, t_solve + t2 - t1, \
          t_prop + t3 - t2
    t0 = time.perf_counter()
    dense_h = [advance(lp, h) for h in dense_h]
    t_prop += time.perf_counter() - t0
    seconds["capture"] += t_cap
    seconds["solve"] += t_solve
    seconds["propagate"] += t_prop
    layers_out.append({"layer": layer, "capture_s": t_cap,
                       "solve_s": t_solve, "propagate_s": t_prop})
    done = time.perf_counter() - t_start
    log(f"{method} layer {layer + 1}/{n_layers}: capture {t_cap:.1f}s, "
        f"solve {t_solve:.1f}s, propagate {t_prop:.1f}s | elapsed "
        f"{done:.0f}s, ETA {done / (layer + 1) * (n_layers - layer - 1):.0f}s")

  t4 = time.perf_counter()
  dense_ppl = np.array([stream_ppl(adapter, params, dense_h[t], test_ids[t])
                        for t in range(m)])
  ppl = np.array([[stream_ppl(adapter, params, model_h[p][t], test_ids[t])
                   for t in range(m)] for p in range(n_models)])
  seconds["evaluate"] = time.perf_counter() - t4
  seconds["total"] = time.perf_counter() - t_start
  sparsity = zeros / max(weights_total, 1)
  if data_free:
    ppl, sparsity = np.repeat(ppl, P, axis=0), np.repeat(sparsity, P)
  return WalkResult(prefs=prefs, ppl=ppl, dense_ppl=dense_ppl,
                    sparsity=sparsity, layers=layers_out, seconds=seconds)
