"""The sequential layer walk: capture, prune with MOSP, propagate, evaluate.

docs/METHOD_NOTES.md#whole-model. For each decoder layer:
  1. capture the inputs of its linears on each task's calibration stream and
     accumulate one Gram per task per group of linears sharing an input;
  2. prune every linear with MOSP (one Pareto set per linear);
  3. advance every task's calibration stream through the pruned layer: by
     default through the global model `W` [ours: the paper does not say],
     which makes the walk the ALPS-concat baseline's own; with
     `streams='task'` task i's stream goes through its model `W_i`;
  4. evaluate: materialise every requested preference's model (a weighted
     sum and a projection) and advance the test streams of every model
     (the preferences and `W`) and task through it, so every model is
     evaluated with no whole-model pass and no model is held whole.
Embeddings, norms and the LM head stay dense.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mosp_jax.config import SolverConfig
from mosp_jax.pipeline import artifact
from mosp_jax.pipeline.checkpoint import LayerCheckpoint
from mosp_jax.pipeline.grams import NonFiniteError, layer_grams
from mosp_jax.solvers import (
  Pattern,
  mosp_materialize,
  mosp_pareto,
  sharding,
)


@functools.partial(jax.jit, static_argnames=("adapter",))
def _embed(adapter, params, ids):
  return adapter.embed(params, ids)


@functools.partial(jax.jit, static_argnames=("adapter",))
def _propagate(adapter, layer_params, hidden):
  return adapter.apply_block(layer_params, hidden)[0]


@functools.partial(jax.jit, static_argnames=("adapter",))
def _nll(adapter, params, hidden, ids):
  """Summed next-token negative log-likelihood of `(B, T)` segments."""
  logits = adapter.head(params, hidden).astype(jnp.float32)[:, :-1]
  logp = jax.nn.log_softmax(logits, axis=-1)
  tgt = ids[:, 1:, None]
  return -jnp.sum(jnp.take_along_axis(logp, tgt, axis=-1))


@jax.jit
def _unstack(x):
  return tuple(x[i] for i in range(x.shape[0]))


@jax.jit
def _model_stats(grams, W0, W):
  """`(P, m)` relative reconstruction error of each model on each task's
  calibration Gram, and `(P,)` exact zeros per model."""
  E = W - W0[None]                                        # (P, n, o)
  num = jnp.einsum("pio,mij,pjo->pm", E, grams, E)
  den = jnp.einsum("io,mij,jo->m", W0, grams, W0)
  return (num / jnp.where(den > 0, den, 1.0)[None],
          jnp.sum(W == 0, axis=(1, 2)))


def _device_batches(ids: np.ndarray, batch_size: int) -> list[jax.Array]:
  """Host `(N, T)` -> device batches; a stream is a list of these (no
  device-side slicing, so nothing moves implicitly)."""
  return [jax.device_put(ids[lo:lo + batch_size])
          for lo in range(0, ids.shape[0], batch_size)]


STREAMS = ("global", "task")


@dataclasses.dataclass(frozen=True)
class WalkResult:
  """What a walk measured.

  prefs: `(P, m)` the models' preferences.
  ppl: `(P, m)` perplexity of model p on task t's test segments.
  dense_ppl: `(m,)` perplexity of the dense model.
  sparsity: `(P,)` fraction of exact zeros over all pruned linears.
  layers: per layer, a dict of timings, solver iterations and per-linear
    relative errors `(P, m)` on the calibration Grams.
  seconds: wall time per phase: 'capture', 'solve', 'propagate'
    (calibration streams), 'evaluate' (materialising the models, test
    streams, perplexity), 'walk' (= capture + solve + propagate: what
    pruning costs) and 'total'.
  global_ppl: `(m,)` perplexity of MOSP's global model `W` (None for the
    baselines).
  """
  prefs: np.ndarray
  ppl: np.ndarray
  dense_ppl: np.ndarray
  sparsity: np.ndarray
  layers: list[dict]
  seconds: dict[str, float]
  global_ppl: np.ndarray | None = None


def _check_finite(x, where: str) -> None:
  if not bool(jax.device_get(jnp.all(jnp.isfinite(x)))):
    raise NonFiniteError(f"{where}: NaN or Inf")


def eta_seconds(durations: Sequence[float], remaining: int) -> float:
  """Seconds left for `remaining` layers, from the layers done so far; the
  first layer (which compiles every function) is left out once others
  are measured, so it does not inflate the estimate."""
  steady = durations[1:] if len(durations) > 1 else durations
  return float(np.mean(steady)) * remaining if steady else 0.0


def eta_text(durations: Sequence[float], remaining: int) -> str:
  """The ETA of a progress line: 'ETA 4m05s' from the layers after the
  first; after the first layer alone (its time includes compilation, so
  it would inflate any estimate) it says when an estimate comes."""
  if remaining <= 0:
    return "ETA 0s"
  if len(durations) < 2:
    return "ETA after the next layer (this one included compilation)"
  eta = round(eta_seconds(durations, remaining))
  return f"ETA {eta // 60}m{eta % 60:02d}s" if eta >= 60 else f"ETA {eta}s"


def prune_and_evaluate(
    adapter: Any, params: Any, calib: Sequence[np.ndarray],
    test: Sequence[np.ndarray], prefs: np.ndarray, *, pattern: Pattern,
    cfg: SolverConfig, batch_size: int, streams: str = "global",
    artifact_dir: str | None = None,
    checkpoint: LayerCheckpoint | None = None,
    log: Callable[[str], None] = print,
    on_layer_done: Callable[[int], None] | None = None,
    mesh: jax.sharding.Mesh | None = None) -> WalkResult:
  """Prunes `params` layer by layer with MOSP and evaluates every model.

  Args:
    adapter: the family adapter of the model.
    params: dense model parameters (device arrays).
    calib: per task, `(N, T)` int32 calibration segments (the same count
      for every task: their Grams' mean is the concatenated Gram).
    test: per task, `(n_i, T')` int32 test segments.
    prefs: `(P, m)` preferences of the models to evaluate.
    pattern: sparsity pattern per linear.
    cfg: solver hyperparameters.
    batch_size: sequences per forward batch.
    streams: 'global' (every calibration stream through `W`) or 'task'
      (task i's through `W_i`).
    artifact_dir: where to save the compact Pareto set per layer (skipped
      when None).
    checkpoint: where to save every stream after each layer; when it holds
      a step, the walk resumes after that layer (same inputs required: the
      runner checks the configuration) and ends with identical results.
    log: progress sink, one line per layer.
    on_layer_done: called with the layer index once it is checkpointed.
    mesh: optional device mesh (`solvers.sharding.make_mesh`) the per-layer
      solvers run on; their results come back to the model's device.

  Returns:
    `WalkResult` of the `P` preference models, with `global_ppl` for `W`.
  """
  if streams not in STREAMS:
    raise ValueError(f"streams must be one of {STREAMS}, got {streams!r}")
  m = len(calib)
  if len({np.shape(c)[0] for c in calib}) != 1:
    raise ValueError("every task needs the same number of calibration "
                     f"segments, got {[np.shape(c)[0] for c in calib]}")
  prefs = np.asarray(prefs, np.float32)
  P = prefs.shape[0]
  prefs_dev = jax.device_put(prefs)
  seconds = dict.fromkeys(("capture", "solve", "propagate", "evaluate"),
                          0.0)
  t_start = time.perf_counter()

  def embed(ids):
    return [_embed(adapter, params, b)
            for b in _device_batches(np.asarray(ids), batch_size)]

  def advance(lp, stream):
    return [_propagate(adapter, lp, h) for h in stream]

  calib_h = [embed(c) for c in calib]
  test_ids = [_device_batches(np.asarray(t), batch_size) for t in test]
  test_h0 = [embed(t) for t in test]
  dense_h = list(test_h0)
  # Test streams of the P preference models, then of the global model.
  model_h = [list(test_h0) for _ in range(P + 1)]

  n_layers = adapter.num_layers(params)
  groups = adapter.linear_groups()
  zeros, weights_total = np.zeros(P + 1), 0
  layers_out, durations = [], []
  first = 0
  if checkpoint is not None and checkpoint.latest_layer() is not None:
    done_layer, state, meta = checkpoint.restore(
        {"calib": calib_h, "dense": dense_h, "models": model_h,
         "zeros": zeros})
    calib_h, dense_h, model_h = state["calib"], state["dense"], state[
        "models"]
    zeros = np.asarray(state["zeros"], np.float64)
    weights_total, layers_out = meta["weights_total"], meta["layers"]
    seconds.update(meta["seconds"])
    first = done_layer + 1
    log(f"resuming after layer {first}/{n_layers} from {checkpoint.directory}")
  for layer in range(first, n_layers):
    t0 = time.perf_counter()
    lp = adapter.layer_params(params, layer)
    for name in adapter.linear_names():
      _check_finite(adapter.get_kernel(params, layer, name),
                    f"layer {layer} {name}: dense weights")
    task_grams = [layer_grams(adapter, lp, calib_h[i],
                              where=f"layer {layer}, task {i}")
                  for i in range(m)]
    t1 = time.perf_counter()

    sets, infos, grams_dev = {}, {}, {}
    global_params, task_params = params, [params] * m
    for group in groups:
      G_dev = jax.device_put(np.stack([g[group[0]] for g in task_grams]))
      grams_dev[group[0]] = G_dev
      for name in group:
        W0 = adapter.get_kernel(params, layer, name)
        par, info = mosp_pareto(G_dev, W0, pattern=pattern, cfg=cfg,
                                mesh=mesh)
        if mesh is not None:
          par, info = sharding.to_local((par, info), W0)
        where = f"layer {layer} {name}: pruned weights"
        _check_finite(par.W, where)
        _check_finite(par.W_tasks, where)
        global_params = adapter.set_kernel(global_params, layer, name,
                                           par.W)
        if streams == "task":
          for i, w in enumerate(_unstack(par.W_tasks)):
            task_params[i] = adapter.set_kernel(task_params[i], layer, name,
                                                w)
        sets[name], infos[name] = par, info
    t2 = time.perf_counter()

    lp_global = adapter.layer_params(global_params, layer)
    if streams == "task":
      calib_h = [advance(adapter.layer_params(task_params[i], layer),
                         calib_h[i]) for i in range(m)]
    else:
      calib_h = [advance(lp_global, h) for h in calib_h]
    for i in range(m):
      for h in calib_h[i]:
        _check_finite(h, f"layer {layer}: task {i} activations")
    t3 = time.perf_counter()

    model_params = [params] * P
    stats = {}
    for group in groups:
      for name in group:
        W0 = adapter.get_kernel(params, layer, name)
        par = sets[name]
        W, _ = mosp_materialize(par, prefs_dev, pattern=pattern, cfg=cfg,
                                grams=grams_dev[group[0]], W0=W0)
        for p, w in enumerate(_unstack(W)):
          model_params[p] = adapter.set_kernel(model_params[p], layer, name,
                                               w)
        (errs, nz), info = jax.device_get((_model_stats(
            grams_dev[group[0]], W0, jnp.concatenate([W, par.W[None]])),
            infos[name]))
        zeros += nz
        weights_total += W0.size
        stats[name] = {"stage1_iters": int(info.stage1.iters),
                       "stage2_iters": np.asarray(
                           info.stage2.iters).tolist(),
                       "rel_error": np.asarray(errs).tolist()}
    lps = [adapter.layer_params(mp, layer) for mp in model_params]
    lps.append(lp_global)
    dense_h = [advance(lp, h) for h in dense_h]
    model_h = [[advance(lps[p], h) for h in model_h[p]]
               for p in range(P + 1)]
    # Dispatch is asynchronous: wait, or this work would be timed as the
    # next layer's capture.
    jax.block_until_ready((dense_h, model_h))
    t4 = time.perf_counter()
    if artifact_dir is not None:
      # [ours] A refit needs the Grams again when a preference is
      # materialised later (export); the paper's Pareto set does not.
      artifact.save_layer(artifact_dir, layer, jax.device_get(sets),
                          grams={g[0]: np.stack([t[g[0]] for t in
                                                 task_grams])
                                 for g in groups}
                          if cfg.pref_refit_iters > 0 else None)

    seconds["capture"] += t1 - t0
    seconds["solve"] += t2 - t1
    seconds["propagate"] += t3 - t2
    seconds["evaluate"] += t4 - t3
    durations.append(t4 - t0)
    layers_out.append({"layer": layer, "capture_s": t1 - t0,
                       "solve_s": t2 - t1, "propagate_s": t3 - t2,
                       "evaluate_s": t4 - t3, "linears": stats})
    if checkpoint is not None:
      checkpoint.save(layer, {"calib": calib_h, "dense": dense_h,
                              "models": model_h, "zeros": zeros},
                      {"weights_total": weights_total, "layers": layers_out,
                       "seconds": seconds})
    done = time.perf_counter() - t_start
    log(f"layer {layer + 1}/{n_layers}: capture {t1 - t0:.1f}s, "
        f"solve {t2 - t1:.1f}s, propagate {t3 - t2:.1f}s, evaluate "
        f"{t4 - t3:.1f}s | elapsed {done:.0f}s, "
        f"{eta_text(durations, n_layers - layer - 1)}")
    if on_layer_done is not None:
      on_layer_done(layer)

  t5 = time.perf_counter()
  dense_ppl = np.array([stream_ppl(adapter, params, dense_h[t], test_ids[t])
                        for t in range(m)])
  model_ppl = np.array([[stream_ppl(adapter, params, model_h[p][t],
                                    test_ids[t]) for t in range(m)]
                        for p in range(P + 1)])
  seconds["evaluate"] += time.perf_counter() - t5
  seconds["walk"] = seconds["capture"] + seconds["solve"] + seconds[
      "propagate"]
  seconds["total"] = time.perf_counter() - t_start
  return WalkResult(prefs=prefs, ppl=model_ppl[:P], dense_ppl=dense_ppl,
                    sparsity=zeros[:P] / max(weights_total, 1),
                    layers=layers_out, seconds=seconds,
                    global_ppl=model_ppl[P])


def stream_ppl(adapter: Any, params: Any, stream: list[jax.Array],
               ids: list[jax.Array]) -> float:
  """Perplexity of hidden states after the last layer `(B, T, d)` batches
  against their token batches `(B, T)`."""
  total = sum(float(jax.device_get(_nll(adapter, params, h, i)))
              for h, i in zip(stream, ids, strict=True))
  count = sum(i.shape[0] * (i.shape[1] - 1) for i in ids)
  return float(np.exp(total / count))
