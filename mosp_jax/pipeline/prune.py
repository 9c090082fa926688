"""MOSP on the sequential layer walk: capture, prune, propagate, evaluate.

docs/METHOD_NOTES.md#whole-model. MOSP is one `walk.Unit` of
`walk.walk_layers`; for each decoder layer:
  1. capture the inputs of its linears on each task's calibration stream and
     accumulate one Gram per task per group of linears sharing an input;
  2. prune every linear with MOSP (one Pareto set per linear);
  3. advance every task's calibration stream through the pruned layer: by
     default through the global model `W` [ours: the paper does not say],
     which makes the walk the ALPS-concat baseline's own; with
     `streams='task'` task i's stream goes through its model `W_i`;
  4. evaluate: materialise each requested preference's model (a weighted
     sum and a projection) and advance its test streams (one per task)
     through it, one preference at a time [ours], then `W`'s; so every
     model is evaluated with no whole-model pass, no model is held whole
     and one preference's layer exists at a time.
Embeddings, norms and the LM head stay dense.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mosp_jax.config import SolverConfig
from mosp_jax.models.base import Adapter, Params
from mosp_jax.pipeline import (
  artifact,
  gram_store,
  linear_problem,
  run_record,
  walk,
)
from mosp_jax.pipeline.checkpoint import LayerCheckpoint
from mosp_jax.pipeline.layer_source import DenseLayers
from mosp_jax.pipeline.streams import check_finite
from mosp_jax.solvers import (
  MospInfo,
  ParetoLayer,
  Pattern,
)


@jax.jit
def _unstack(x: jax.Array) -> tuple[jax.Array, ...]:
  return tuple(x[i] for i in range(x.shape[0]))


STREAMS = ("global", "task")


def prune_and_evaluate(
    adapter: Adapter, model: DenseLayers, calib: Sequence[np.ndarray],
    test: Sequence[np.ndarray], prefs: np.ndarray, *, pattern: Pattern,
    cfg: SolverConfig, batch_size: int, streams: str = "global",
    artifact_dir: str | None = None,
    checkpoint: LayerCheckpoint | None = None,
    log: Callable[[str], None] = print,
    on_layer_done: Callable[[int], None] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    offload_streams: bool = False) -> walk.Front:
  """Prunes `model` layer by layer with MOSP and evaluates every model.

  Args:
    adapter: the family adapter of the model.
    model: the dense model, read one layer at a time (`layer_source`).
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
    offload_streams: keep the activation streams in host memory between
      layers (`walk.walk_layers`).

  Returns:
    `walk.Front` of the `P` preference models, with `global_ppl` for `W`.
  """
  if streams not in STREAMS:
    raise ValueError(f"streams must be one of {STREAMS}, got {streams!r}")
  m = len(calib)
  if len({np.shape(c)[0] for c in calib}) != 1:
    raise ValueError("every task needs the same number of calibration "
                     f"segments, got {[np.shape(c)[0] for c in calib]}")
  prefs = np.asarray(prefs, np.float32)
  P = prefs.shape[0]
  unit = mosp_unit(adapter, prefs, m, pattern=pattern, cfg=cfg,
                   streams=streams, artifact_dir=artifact_dir, mesh=mesh)
  res = walk.walk_layers(adapter, model, calib, test, [unit],
                         batch_size=batch_size, checkpoint=checkpoint,
                         log=log, on_layer_done=on_layer_done,
                         offload_streams=offload_streams)
  return walk.Front(prefs=prefs, ppl=res.ppl[:P], sparsity=res.sparsity[:P],
                    global_ppl=res.ppl[P], walk=res)


class _Solved(NamedTuple):
  """What MOSP's solve of one layer hands to its evaluation: per linear
  its Pareto set and solver info; per group the `(m, n, n)` task Grams on
  the device (key: the group's first linear) and, under the refit, their
  stored form; the global model.

  Under the refit the evaluation reads the Grams as stored
  (`gram_store.decode(stored)`), for its refit and its errors alike, so
  that a preference exported from the Pareto set on disk is the model
  the run evaluated [ours]; stages 1-3 solve on the exact Grams."""
  sets: dict[str, ParetoLayer]
  infos: dict[str, MospInfo]
  grams_dev: dict[str, jax.Array]
  stored: dict[str, gram_store.StoredGrams]
  global_layer: Params


def mosp_unit(adapter: Adapter, prefs: np.ndarray, m: int, *,
              pattern: Pattern, cfg: SolverConfig, streams: str = "global",
              artifact_dir: str | None = None,
              mesh: jax.sharding.Mesh | None = None) -> walk.Unit:
  """MOSP as a `walk.Unit`: every task's calibration stream, one Pareto set
  per linear, the `P` preference models of `prefs (P, m)` and the global
  model `W` evaluated (in that order). Arguments as `prune_and_evaluate`."""
  return walk.Unit(
      tasks=tuple(range(m)), models=prefs.shape[0] + 1,
      solve=functools.partial(_solve_layer, adapter=adapter,
                              pattern=pattern, cfg=cfg, streams=streams,
                              mesh=mesh),
      evaluate=functools.partial(
          _evaluate_layer, adapter=adapter, pattern=pattern, cfg=cfg,
          prefs=tuple(jax.device_put(prefs[p:p + 1])
                      for p in range(prefs.shape[0]))),
      commit=None if artifact_dir is None else functools.partial(
          _save_layer, artifact_dir, groups=adapter.linear_groups(),
          cfg=cfg))


def _solve_layer(layer: int, dense: Params, task_grams: dict[int, walk.Grams],
                 *, adapter: Adapter, pattern: Pattern,
                 cfg: SolverConfig, streams: str,
                 mesh: jax.sharding.Mesh | None
                 ) -> tuple[list[Params], _Solved]:
  """One Pareto set per linear of `layer` from the `m` tasks' Grams; the
  layers the calibration streams go through (`W`, or `W_i` for task i).
  Empties `task_grams` group by group: their host copies go once on the
  device."""
  m = len(task_grams)
  sets, infos, grams_dev = {}, {}, {}
  global_layer, task_layers = dense, [dense] * m

  def to_device(key: str) -> jax.Array:
    grams_dev[key] = jax.device_put(np.stack([task_grams[i].pop(key)
                                              for i in range(m)]))
    return grams_dev[key]

  for prob in linear_problem.layer_problems(adapter, dense, to_device,
                                            pattern=pattern):
    par, info = prob.pareto(cfg, mesh=mesh)
    where = f"layer {layer} {prob.name}: pruned weights"
    check_finite(par.W, where)
    check_finite(par.W_tasks, where)
    global_layer = adapter.set_layer_kernel(global_layer, prob.name, par.W)
    if streams == "task":
      for i, w in enumerate(_unstack(par.W_tasks)):
        task_layers[i] = adapter.set_layer_kernel(task_layers[i], prob.name,
                                                  w)
    sets[prob.name], infos[prob.name] = par, info
  stored = {}
  if linear_problem.needs_grams(cfg):
    for key in list(grams_dev):
      stored[key] = gram_store.encode(grams_dev[key])
      grams_dev[key] = gram_store.decode(stored[key])
  through = task_layers if streams == "task" else [global_layer] * m
  return through, _Solved(sets, infos, grams_dev, stored, global_layer)


def _evaluate_layer(layer: int, dense: Params, s: _Solved,
                    advance: walk.Advance, *, adapter: Adapter,
                    prefs: tuple[jax.Array, ...], pattern: Pattern,
                    cfg: SolverConfig) -> walk.Evaluated:
  """Materialises the models of preferences `prefs` (P arrays `(1, m)`)
  of `layer` one at a time, each advanced (`advance(p, layer)`) before
  the next is built, then advances `W`'s (model P); their zeros, and per
  linear the solver iterations and `(P + 1, m)` relative errors on the
  calibration Grams."""
  P = len(prefs)
  zeros = np.zeros(P + 1)
  errors: dict[str, list] = {}
  materialise_s = 0.0
  for p in range(P + 1):
    model_layer = dense if p < P else s.global_layer
    for prob in linear_problem.layer_problems(
        adapter, dense, s.grams_dev.__getitem__, pattern=pattern):
      if p < P:
        t0 = time.perf_counter()
        W = jax.block_until_ready(
            prob.preference_models(s.sets[prob.name], prefs[p], cfg)[0])
        materialise_s += time.perf_counter() - t0
        model_layer = adapter.set_layer_kernel(model_layer, prob.name, W[0])
      else:
        W = jnp.asarray(s.sets[prob.name].W)[None]
      errs, nz = jax.device_get(prob.errors(W))
      zeros[p] += nz[0]
      errors.setdefault(prob.name, []).append(errs[0].tolist())
    advance(p, model_layer)
  weights = sum(adapter.get_layer_kernel(dense, name).size
                for name in adapter.linear_names())
  linears = {name: run_record.LinearStats(
      stage1_iters=int(info.stage1.iters),
      stage2_iters=tuple(np.asarray(info.stage2.iters).tolist()),
      rel_error=tuple(map(tuple, errors[name])))
             for name, info in jax.device_get(s.infos).items()}
  return walk.Evaluated(zeros, weights, linears, materialise_s)


def _save_layer(artifact_dir: str, layer: int, s: _Solved, *,
                groups: list[list[str]], cfg: SolverConfig) -> None:
  """Saves the layer's Pareto sets to the artifact, with the stored
  Grams when a preference materialised later (the export) needs them."""
  grams = ({g[0]: jax.device_get(s.stored[g[0]]) for g in groups}
           if linear_problem.needs_grams(cfg) else None)
  artifact.save_layer(artifact_dir, layer, jax.device_get(s.sets),
                      grams=grams)
