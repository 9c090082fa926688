"""The sequential layer walk: capture, prune with MOSP, propagate, evaluate.

METHOD.md section 6. For each decoder layer:
  1. capture the inputs of its linears on each task's calibration stream and
     accumulate one Gram per task per group of linears sharing an input;
  2. prune every linear with MOSP (one Pareto set per linear) and
     materialise the models of all requested preferences;
  3. advance every activation stream through the pruned layer: task i's
     calibration stream through task i's model (the vertex e_i), and the
     test streams of every model and task through that model, so every
     Pareto model is evaluated with no whole-model pass and no model is
     ever held in memory whole.
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
from mosp_jax.solvers import Pattern, mosp_materialize, mosp_pareto, sharding


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


@dataclasses.dataclass(frozen=True)
class WalkResult:
  """What the walk measured.

  prefs: `(P, m)` the models' preferences.
  ppl: `(P, m)` perplexity of model p on task t's test segments.
  dense_ppl: `(m,)` perplexity of the dense model.
  sparsity: `(P,)` fraction of exact zeros over all pruned linears.
  layers: per layer, a dict of timings, solver iterations and per-linear
    relative errors `(P, m)` on the calibration Grams.
  seconds: total wall time per phase.
  """
  prefs: np.ndarray
  ppl: np.ndarray
  dense_ppl: np.ndarray
  sparsity: np.ndarray
  layers: list[dict]
  seconds: dict[str, float]


def _check_finite(x, where: str) -> None:
  if not bool(jax.device_get(jnp.all(jnp.isfinite(x)))):
    raise NonFiniteError(f"{where}: NaN or Inf")


def prune_and_evaluate(
    adapter: Any, params: Any, calib: Sequence[np.ndarray],
    test: Sequence[np.ndarray], prefs: np.ndarray, *, pattern: Pattern,
    cfg: SolverConfig, batch_size: int, artifact_dir: str | None = None,
    checkpoint: LayerCheckpoint | None = None,
    log: Callable[[str], None] = print,
    on_layer_done: Callable[[int], None] | None = None,
    mesh: jax.sharding.Mesh | None = None) -> WalkResult:
  """Prunes `params` layer by layer with MOSP and evaluates every model.

  Args:
    adapter: the family adapter of the model.
    params: dense model parameters (device arrays).
    calib: per task, `(N_i, T)` int32 calibration segments.
    test: per task, `(n_i, T')` int32 test segments.
    prefs: `(P, m)` preferences of the models to build; must contain every
      vertex `e_i` (task i's calibration stream runs through that model).
    pattern: sparsity pattern per linear.
    cfg: solver hyperparameters.
    batch_size: sequences per forward batch.
    artifact_dir: where to save the compact Pareto set per layer (skipped
      when None).
    checkpoint: where to save every stream after each layer; when it holds
      a step, the walk resumes after that layer (same inputs required: the
      runner checks the configuration) and ends with identical results.
    log: progress sink, one line per layer.
    on_layer_done: called with the layer index once it is checkpointed.
    mesh: optional device mesh (`solvers.sharding.make_mesh`) the per-layer
      solvers run on; their results come back to the model's device.
  """
  m = len(calib)
  prefs = np.asarray(prefs, np.float32)
  vertex = []
  for i in range(m):
    hits = np.flatnonzero(np.all(prefs == np.eye(m, dtype=np.float32)[i],
                                 axis=1))
    if hits.size == 0:
      raise ValueError(f"prefs must contain the vertex e_{i}; got {prefs}")
    vertex.append(int(hits[0]))
  P = prefs.shape[0]
  prefs_dev = jax.device_put(prefs)
  seconds = {"capture": 0.0, "solve": 0.0, "propagate": 0.0,
             "evaluate": 0.0}
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
  model_h = [list(test_h0) for _ in range(P)]

  n_layers = adapter.num_layers(params)
  groups = adapter.linear_groups()
  zeros, weights_total = np.zeros(P), 0
  layers_out = []
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

    model_params = [params] * P
    saved, grams_saved, stats = {}, {}, {}
    for group in groups:
      G = np.stack([g[group[0]] for g in task_grams])
      grams_saved[group[0]] = G
      G_dev = jax.device_put(G)
      for name in group:
        W0 = adapter.get_kernel(params, layer, name)
        where = f"layer {layer} {name}"
        pareto, (info1, info2) = mosp_pareto(G_dev, W0, pattern=pattern,
                                             cfg=cfg, mesh=mesh)
        W, _, _ = mosp_materialize(G_dev, W0, pareto, prefs_dev,
                                   pattern=pattern, cfg=cfg, mesh=mesh)
        if mesh is not None:
          W, pareto, info1, info2 = sharding.to_local(
              (W, pareto, info1, info2), W0)
        _check_finite(W, f"{where}: pruned weights")
        for p, w in enumerate(_unstack(W)):
          model_params[p] = adapter.set_kernel(model_params[p], layer, name,
                                               w)
        (errs, nz), core, task_sparse, it1, it2 = jax.device_get(
            (_model_stats(G_dev, W0, W), pareto.core, pareto.task_sparse,
             info1.iters, info2.iters))
        zeros += nz
        weights_total += W0.size
        saved[name] = (np.asarray(core), np.asarray(task_sparse))
        stats[name] = {"stage1_iters": int(it1),
                       "stage2_iters": np.asarray(it2).tolist(),
                       "rel_error": np.asarray(errs).tolist()}
    t2 = time.perf_counter()

    lps = [adapter.layer_params(mp, layer) for mp in model_params]
    calib_h = [advance(lps[vertex[i]], calib_h[i]) for i in range(m)]
    dense_h = [advance(lp, h) for h in dense_h]
    model_h = [[advance(lps[p], h) for h in model_h[p]] for p in range(P)]
    for i in range(m):
      for h in calib_h[i]:
        _check_finite(h, f"layer {layer}: task {i} activations")
    t3 = time.perf_counter()
    if artifact_dir is not None:
      artifact.save_layer(artifact_dir, layer, saved, grams_saved)

    seconds["capture"] += t1 - t0
    seconds["solve"] += t2 - t1
    seconds["propagate"] += t3 - t2
    done = time.perf_counter() - t_start
    eta = done / (layer + 1 - first) * (n_layers - layer - 1)
    layers_out.append({"layer": layer, "capture_s": t1 - t0,
                       "solve_s": t2 - t1, "propagate_s": t3 - t2,
                       "linears": stats})
    if checkpoint is not None:
      checkpoint.save(layer, {"calib": calib_h, "dense": dense_h,
                              "models": model_h, "zeros": zeros},
                      {"weights_total": weights_total, "layers": layers_out,
                       "seconds": seconds})
    log(f"layer {layer + 1}/{n_layers}: capture {t1 - t0:.1f}s, "
        f"solve {t2 - t1:.1f}s, propagate {t3 - t2:.1f}s | elapsed "
        f"{done:.0f}s, ETA {eta:.0f}s")
    if on_layer_done is not None:
      on_layer_done(layer)

  t4 = time.perf_counter()

  def ppl(stream, ids):
    total = sum(float(jax.device_get(_nll(adapter, params, h, i)))
                for h, i in zip(stream, ids, strict=True))
    count = sum(i.shape[0] * (i.shape[1] - 1) for i in ids)
    return float(np.exp(total / count))

  dense_ppl = np.array([ppl(dense_h[t], test_ids[t]) for t in range(m)])
  model_ppl = np.array([[ppl(model_h[p][t], test_ids[t]) for t in range(m)]
                        for p in range(P)])
  seconds["evaluate"] = time.perf_counter() - t4
  seconds["total"] = time.perf_counter() - t_start
  return WalkResult(prefs=prefs, ppl=model_ppl, dense_ppl=dense_ppl,
                    sparsity=zeros / max(weights_total, 1),
                    layers=layers_out, seconds=seconds)
