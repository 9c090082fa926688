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

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mosp_jax.config import SolverConfig
from mosp_jax.models.base import Adapter, Params
from mosp_jax.pipeline import artifact, walk
from mosp_jax.pipeline.checkpoint import LayerCheckpoint
from mosp_jax.pipeline.layer_source import DenseLayers
from mosp_jax.solvers import (
  MospInfo,
  ParetoLayer,
  Pattern,
  mosp_materialize,
  mosp_pareto,
  sharding,
)


@jax.jit
def _unstack(x: jax.Array) -> tuple[jax.Array, ...]:
  return tuple(x[i] for i in range(x.shape[0]))


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


def prune_and_evaluate(
    adapter: Adapter, model: DenseLayers, calib: Sequence[np.ndarray],
    test: Sequence[np.ndarray], prefs: np.ndarray, *, pattern: Pattern,
    cfg: SolverConfig, batch_size: int, streams: str = "global",
    artifact_dir: str | None = None,
    checkpoint: LayerCheckpoint | None = None,
    log: Callable[[str], None] = print,
    on_layer_done: Callable[[int], None] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    offload_streams: bool = False) -> WalkResult:
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
  unit = mosp_unit(adapter, prefs, m, pattern=pattern, cfg=cfg,
                   streams=streams, artifact_dir=artifact_dir, mesh=mesh)
  res = walk.walk_layers(adapter, model, calib, test, [unit],
                         batch_size=batch_size, checkpoint=checkpoint,
                         log=log, on_layer_done=on_layer_done,
                         offload_streams=offload_streams)
  return WalkResult(prefs=prefs, ppl=res.ppl[:P], dense_ppl=res.dense_ppl,
                    sparsity=res.sparsity[:P], layers=res.layers,
                    seconds=res.seconds, global_ppl=res.ppl[P])


class _Solved(NamedTuple):
  """What MOSP's solve of one layer hands to its evaluation: per linear
  its Pareto set and solver info; per group the `(m, n, n)` task Grams on
  the device (key: the group's first linear); the global model."""
  sets: dict[str, ParetoLayer]
  infos: dict[str, MospInfo]
  grams_dev: dict[str, jax.Array]
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
  for group in adapter.linear_groups():
    G_dev = jax.device_put(np.stack([task_grams[i].pop(group[0])
                                     for i in range(m)]))
    grams_dev[group[0]] = G_dev
    for name in group:
      W0 = adapter.get_layer_kernel(dense, name).astype(jnp.float32)
      par, info = mosp_pareto(G_dev, W0, pattern=pattern, cfg=cfg,
                              mesh=mesh)
      if mesh is not None:
        par, info = sharding.to_local((par, info), W0)
      where = f"layer {layer} {name}: pruned weights"
      walk.check_finite(par.W, where)
      walk.check_finite(par.W_tasks, where)
      global_layer = adapter.set_layer_kernel(global_layer, name, par.W)
      if streams == "task":
        for i, w in enumerate(_unstack(par.W_tasks)):
          task_layers[i] = adapter.set_layer_kernel(task_layers[i], name, w)
      sets[name], infos[name] = par, info
  through = task_layers if streams == "task" else [global_layer] * m
  return through, _Solved(sets, infos, grams_dev, global_layer)


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
  for p in range(P + 1):
    model_layer = dense if p < P else s.global_layer
    for group in adapter.linear_groups():
      G_dev = s.grams_dev[group[0]]
      for name in group:
        W0 = adapter.get_layer_kernel(dense, name).astype(jnp.float32)
        if p < P:
          W = mosp_materialize(s.sets[name], prefs[p],
                               pattern=pattern, cfg=cfg, grams=G_dev,
                               W0=W0)[0]
          model_layer = adapter.set_layer_kernel(model_layer, name, W[0])
        else:
          W = jnp.asarray(s.sets[name].W)[None]
        errs, nz = jax.device_get(walk.model_stats(G_dev, W0, W))
        zeros[p] += nz[0]
        errors.setdefault(name, []).append(errs[0].tolist())
    advance(p, model_layer)
  weights = sum(adapter.get_layer_kernel(dense, name).size
                for name in adapter.linear_names())
  stats = {}
  for name, info in jax.device_get(s.infos).items():
    stats[name] = {"stage1_iters": int(info.stage1.iters),
                   "stage2_iters": np.asarray(info.stage2.iters).tolist(),
                   "rel_error": errors[name]}
  return walk.Evaluated(zeros, weights, {"linears": stats})


def _save_layer(artifact_dir: str, layer: int, s: _Solved, *,
                groups: list[list[str]], cfg: SolverConfig) -> None:
  """Saves the layer's Pareto sets to the artifact."""
  # [ours] A refit needs the Grams again when a preference is
  # materialised later (export); the paper's Pareto set does not.
  grams = ({g[0]: np.asarray(jax.device_get(s.grams_dev[g[0]]))
            for g in groups} if cfg.pref_refit_iters > 0 else None)
  artifact.save_layer(artifact_dir, layer, jax.device_get(s.sets),
                      grams=grams)
