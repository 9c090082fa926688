"""The sequential pruning walk, written once.

`walk_layers` walks a dense model read one decoder layer at a time
(`layer_source.DenseLayers`), moving every model's batches with the
functions of `streams.py` (docs/METHOD_NOTES.md #whole-model). Per decoder
layer and per `Unit` (one pruning decision and the streams it governs):
capture the Grams of the unit's calibration streams on the dense layer,
let the unit solve, advance its calibration streams through the layers it
chose, then let it build its evaluated models and advance their test
streams; the dense model's test streams are advanced last. The caller
supplies only what differs: what to prune (MOSP's walk in `prune.py`, the
baselines' in `single_objective.py`) and which stream goes through which
model.

About 420 lines: the walk's records (`Unit`, `Walk`, `Front`), its
progress line and its per-layer phases belong to the one loop; the model
functions it calls live in `streams.py`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from mosp_jax.models.base import Adapter, Params
from mosp_jax.pipeline.checkpoint import LayerCheckpoint
from mosp_jax.pipeline.grams import layer_grams
from mosp_jax.pipeline.layer_source import DenseLayers
from mosp_jax.pipeline.run_record import LayerRecord, LinearStats
from mosp_jax.pipeline.streams import (
  BatchStream,
  advance_stream,
  check_finite,
  device_batches,
  embed,
  keep,
  stream_ppl,
)

Grams = dict[str, np.ndarray]  # {first linear of a group: (n_in, n_in)}


# Progress.


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


# The pruning walk.


class Evaluated(NamedTuple):
  """What a unit's models are after one layer.

  zeros: per evaluated model, exact zeros in its pruned linears.
  weights: weights in the pruned linears of one model.
  linears: per linear, the unit's diagnostics for the layer's record
    (MOSP's; none for a baseline).
  materialise_s: of the evaluation, the wall seconds spent building the
    models (MOSP's preference models, refit included; 0 for a baseline,
    whose model is its solve's).
  """
  zeros: Sequence[int] | np.ndarray
  weights: int
  linears: Mapping[str, LinearStats] = {}
  materialise_s: float = 0.0


# `advance(j, layer_params)`: model j's test streams through its layer.
Advance = Callable[[int, Params], None]


class Unit(NamedTuple):
  """One pruning decision per layer and the streams it governs.

  tasks: the tasks whose calibration streams the unit captures and
    advances (each unit has its own copy of them).
  models: how many models it evaluates (each on every task's test stream).
  solve: `(layer, dense, {task: Grams}) -> (layers, carry)`: prunes the
    layer, `dense` being its dense parameter subtree; `layers[j]` is the
    decoder layer task `tasks[j]`'s calibration stream goes through; timed
    as 'solve'. It may empty the Grams' dicts (the walk keeps no other
    reference), so their host memory goes as soon as they are used.
  evaluate: `(layer, dense, carry, advance) -> Evaluated`: builds each
    evaluated model's layer (e.g. a materialised preference) and calls
    `advance(j, layer)` once for every model `j < models`, which moves
    that model's test streams through it before it returns; so a unit
    can hold one evaluated layer at a time [ours]; timed as 'evaluate'.
  commit: `(layer, carry) -> None` or None: saves what the layer made
    (untimed, before the layer is checkpointed).
  where: prefix of error messages ('sparsegpt model 2, ').
  """
  tasks: tuple[int, ...]
  models: int
  solve: Callable[[int, Params, dict[int, Grams]],
                  tuple[list[Params], Any]]
  evaluate: Callable[[int, Params, Any, Advance], Evaluated]
  commit: Callable[[int, Any], None] | None = None
  where: str = ""


class Walk(NamedTuple):
  """What `walk_layers` measured.

  ppl: `(M, m)` perplexity of each evaluated model (the units' models in
    order) on each task's test segments.
  dense_ppl: `(m,)` perplexity of the dense model.
  sparsity: `(M,)` fraction of exact zeros over the pruned linears.
  layers: per layer, its phase seconds and the units' diagnostics.
  seconds: wall time per phase: 'capture', 'solve', 'propagate', 'evaluate'
    (test streams, perplexity), 'walk' (= capture + solve + propagate) and
    'total'.
  """
  ppl: np.ndarray
  dense_ppl: np.ndarray
  sparsity: np.ndarray
  layers: list[LayerRecord]
  seconds: dict[str, float]


class Front(NamedTuple):
  """One method's models as its walk measured them (`prune.py`,
  `single_objective.py`): the walk's models split into the preference
  models and, for MOSP, the global model `W`.

  prefs: `(P, m)` the models' preferences (a one-model baseline's row is
    the uniform mix, which the concatenated data weighs equally).
  ppl: `(P, m)` perplexity of model p on task t's test segments.
  sparsity: `(P,)` fraction of exact zeros over all pruned linears.
  global_ppl: `(m,)` perplexity of MOSP's global model `W` (None for the
    baselines).
  walk: the walk itself: the dense model's perplexity, the per-layer
    records and the seconds per phase.
  """
  prefs: np.ndarray
  ppl: np.ndarray
  sparsity: np.ndarray
  global_ppl: np.ndarray | None
  walk: Walk


_PHASES = ("capture", "solve", "propagate", "evaluate")


def _capture(adapter: Adapter, layer: int, lp: Params, unit: Unit,
             calib: Sequence[BatchStream], sums: dict[str, np.ndarray]
             ) -> dict[int, Grams]:
  return {i: layer_grams(adapter, lp, s, sums=sums,
                         where=f"{unit.where}layer {layer}, task {i}")
          for i, s in zip(unit.tasks, calib, strict=True)}


def _advance_calib(adapter: Adapter, layer: int, unit: Unit,
                   layers: Sequence[Params], calib: Sequence[BatchStream],
                   offload: bool) -> list[BatchStream]:
  out = [advance_stream(adapter, lp, s, offload=offload)
         for lp, s in zip(layers, calib, strict=True)]
  for i, stream in zip(unit.tasks, out, strict=True):
    for h in stream:
      check_finite(h, f"{unit.where}layer {layer}: task {i} activations")
  return out


def _evaluate(adapter: Adapter, unit: Unit, layer: int, lp: Params,
              carry: Any, tests: Sequence[list[BatchStream]], offload: bool
              ) -> tuple[list[list[BatchStream]], Evaluated]:
  """`unit.evaluate` with the `advance` it calls: each model's test
  streams `tests[j]` (one per task) through that model's layer, waited
  for before the next model's layer is built. Returns the advanced
  streams and the unit's `Evaluated`."""
  out: dict[int, list[BatchStream]] = {}

  def advance(j: int, model_layer: Params) -> None:
    if not 0 <= j < unit.models or j in out:
      raise ValueError(f"{unit.where}layer {layer}: advance({j}) called "
                       f"twice or outside 0..{unit.models - 1}")
    # Dispatch is asynchronous: wait, so this work is timed as 'evaluate'
    # and the layer's buffers go before the next model's are built.
    out[j] = jax.block_until_ready(
        [advance_stream(adapter, model_layer, s, offload=offload)
         for s in tests[j]])

  ev = unit.evaluate(layer, lp, carry, advance)
  missing = sorted(set(range(unit.models)) - set(out))
  if missing:
    raise ValueError(f"{unit.where}layer {layer}: evaluate did not advance "
                     f"models {missing}")
  return [out[j] for j in range(unit.models)], ev


def _walk_layer(
    adapter: Adapter, model: DenseLayers, layer: int, units: Sequence[Unit],
    state: dict[str, list], offload: bool, sums: dict[str, np.ndarray]
) -> tuple[dict[str, list], LayerRecord, np.ndarray, np.ndarray]:
  """One decoder layer of every unit: `(state, record, zeros, weights)`,
  the record's seconds per phase (reading the layer counts as capture);
  `sums`: the host's Gram accumulators, reused (`grams.accumulate`)."""
  times = dict.fromkeys(_PHASES, 0.0)
  t0 = time.perf_counter()
  lp = model.layer(layer)
  for name in adapter.linear_names():
    check_finite(adapter.get_layer_kernel(lp, name),
                 f"layer {layer} {name}: dense weights")
  times["capture"] += time.perf_counter() - t0
  linears: dict[str, LinearStats] = {}
  zeros: list[int] = []
  weights: list[int] = []
  calib, tests = list(state["calib"]), list(state["test"])
  materialise = 0.0
  for u, unit in enumerate(units):
    t0 = time.perf_counter()
    grams = _capture(adapter, layer, lp, unit, calib[u], sums)
    t1 = time.perf_counter()
    layers, carry = unit.solve(layer, lp, grams)
    del grams  # whatever the solve left of them
    t2 = time.perf_counter()
    calib[u] = _advance_calib(adapter, layer, unit, layers, calib[u],
                              offload)
    del layers
    t3 = time.perf_counter()
    tests[u], ev = _evaluate(adapter, unit, layer, lp, carry, tests[u],
                             offload)
    t4 = time.perf_counter()
    for key, dt in zip(_PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3),
                       strict=True):
      times[key] += dt
    materialise += ev.materialise_s
    if unit.commit is not None:
      unit.commit(layer, carry)
    linears |= ev.linears
    zeros += list(ev.zeros)
    weights += [ev.weights] * unit.models
  t0 = time.perf_counter()
  dense = jax.block_until_ready([advance_stream(adapter, lp, s,
                                                offload=offload)
                                 for s in state["dense"]])
  times["evaluate"] += time.perf_counter() - t0
  record = LayerRecord(layer, times["capture"], times["solve"],
                       times["propagate"], times["evaluate"], linears,
                       materialise_s=materialise)
  return ({"calib": calib, "test": tests, "dense": dense}, record,
          np.asarray(zeros, np.float64), np.asarray(weights, np.float64))


class _Progress(NamedTuple):
  """What the walk has done so far (and what a checkpoint holds): the
  first layer still to walk, its input streams, the `(M,)` float64 counts
  of exact zeros and of weights, the per-layer records and the seconds
  per phase."""
  first: int
  state: dict[str, list]
  zeros: np.ndarray
  weights: np.ndarray
  layers: list[LayerRecord]
  seconds: dict[str, float]

  def after(self, record: LayerRecord, state: dict[str, list],
            zeros: np.ndarray, weights: np.ndarray) -> _Progress:
    """The progress once `record`'s layer is walked."""
    seconds = {k: self.seconds.get(k, 0.0) + (getattr(record, f"{k}_s")
                                              or 0.0)
               for k in (*_PHASES, "materialise")}
    return _Progress(record.layer + 1, state, self.zeros + zeros,
                     self.weights + weights, [*self.layers, record],
                     seconds)

  def save(self, checkpoint: LayerCheckpoint) -> None:
    checkpoint.save(self.first - 1, {"streams": self.state,
                                     "zeros": self.zeros,
                                     "weights": self.weights},
                    {"layers": [r.to_dict() for r in self.layers],
                     "seconds": self.seconds})


def walk_layers(
    adapter: Adapter, model: DenseLayers, calib: Sequence[np.ndarray],
    test: Sequence[np.ndarray], units: Sequence[Unit], *, batch_size: int,
    label: str = "", checkpoint: LayerCheckpoint | None = None,
    log: Callable[[str], None] = print,
    on_layer_done: Callable[[int], None] | None = None,
    offload_streams: bool = False) -> Walk:
  """Walks the decoder layers of `model`, pruning each with `units`.

  Args:
    adapter: the family adapter of the model.
    model: the dense model, read one layer at a time (`layer_source`).
    calib: per task, `(N, T)` int32 calibration segments.
    test: per task, `(n_i, T')` int32 test segments.
    units: the pruning decisions and the streams each governs.
    batch_size: sequences per forward batch.
    label: prefix of the progress line ('sparsegpt-mixed ').
    checkpoint: where to save every stream after each layer; when it holds
      a step, the walk resumes after that layer (same inputs required) and
      ends with identical results.
    log: progress sink, one line per layer.
    on_layer_done: called with the layer index once it is checkpointed.
    offload_streams: keep every stream's batches in host memory between
      layers (`keep`); the results are identical.

  Returns:
    `Walk` of the units' models and the dense model.
  """
  t_start = time.perf_counter()
  n_models = sum(u.models for u in units)
  n_layers = model.num_layers
  progress = _start(checkpoint, _embedded(
      adapter, model.outer, calib, test, units, batch_size,
      offload_streams), n_models)
  test_ids = [device_batches(np.asarray(t), batch_size) for t in test]
  if checkpoint is not None and progress.first > 0:
    log(f"resuming after layer {progress.first}/{n_layers} from "
        f"{checkpoint.directory}")
  durations = []
  sums: dict[str, np.ndarray] = {}
  for layer in range(progress.first, n_layers):
    state, record, zeros, weights = _walk_layer(
        adapter, model, layer, units, progress.state, offload_streams, sums)
    progress = progress.after(record, state, zeros, weights)
    if checkpoint is not None:
      progress.save(checkpoint)
    durations.append(sum(getattr(record, f"{k}_s") for k in _PHASES))
    log(f"{label}layer {layer + 1}/{n_layers}: "
        + _progress(record, time.perf_counter() - t_start, durations,
                    n_layers - layer - 1))
    if on_layer_done is not None:
      on_layer_done(layer)
  return _finish(adapter, model.outer, progress, test_ids, t_start)


def _finish(adapter: Adapter, params: Params, progress: _Progress,
            test_ids: Sequence[BatchStream], t_start: float) -> Walk:
  """The `Walk` after the last layer: every model's perplexity on the
  test batches `test_ids` (one stream per task; timed as 'evaluate') and
  the totals."""
  t0 = time.perf_counter()
  dense_ppl, ppl = _final_ppl(adapter, params, progress.state, test_ids)
  seconds = dict(progress.seconds)
  seconds["evaluate"] += time.perf_counter() - t0
  seconds["walk"] = seconds["capture"] + seconds["solve"] + seconds[
      "propagate"]
  # What a user waits for to hold the set and its models: the walk and
  # building the models (part of 'evaluate'), not their evaluation.
  seconds["set"] = seconds["walk"] + seconds.get("materialise", 0.0)
  seconds["total"] = time.perf_counter() - t_start
  return Walk(ppl=ppl.reshape(-1, len(test_ids)), dense_ppl=dense_ppl,
              sparsity=progress.zeros / np.maximum(progress.weights, 1),
              layers=progress.layers, seconds=seconds)


def _start(checkpoint: LayerCheckpoint | None, state: dict[str, list],
           n_models: int) -> _Progress:
  """Where the walk starts: layer 0 with the embedded streams `state`
  (also the structure that a checkpoint restores), or after the
  checkpoint's latest layer when it holds one; `n_models`: models
  evaluated by the walk."""
  zeros, weights = np.zeros(n_models), np.zeros(n_models)
  seconds = dict.fromkeys((*_PHASES, "materialise"), 0.0)
  if checkpoint is None or checkpoint.latest_layer() is None:
    return _Progress(0, state, zeros, weights, [], seconds)
  done_layer, saved, meta = checkpoint.restore(
      {"streams": state, "zeros": zeros, "weights": weights})
  seconds.update(meta["seconds"])
  return _Progress(done_layer + 1, saved["streams"],
                   np.asarray(saved["zeros"], np.float64),
                   np.asarray(saved["weights"], np.float64),
                   [LayerRecord.from_dict(r) for r in meta["layers"]],
                   seconds)


def _progress(record: LayerRecord, elapsed: float,
              durations: Sequence[float], remaining: int) -> str:
  """The progress line of a layer: seconds per phase, elapsed, ETA."""
  return (f"capture {record.capture_s:.1f}s, solve {record.solve_s:.1f}s, "
          f"propagate {record.propagate_s:.1f}s, evaluate "
          f"{record.evaluate_s:.1f}s | elapsed {elapsed:.0f}s, "
          f"{eta_text(durations, remaining)}")


def _final_ppl(adapter: Adapter, params: Params, state: dict[str, list],
               test_ids: Sequence[BatchStream]
               ) -> tuple[np.ndarray, np.ndarray]:
  """Perplexity per task of the streams after the last layer: the dense
  model's `(tasks,)` and the unit models' `(models, tasks)`, in the order
  of `state["test"]`."""

  def model_ppl(model: Sequence[BatchStream]) -> list[float]:
    # per task, the model's stream after the last layer
    return [stream_ppl(adapter, params, s, ids)
            for s, ids in zip(model, test_ids, strict=True)]

  dense_ppl = np.array(model_ppl(state["dense"]))
  ppl = np.array([model_ppl(model) for unit_tests in state["test"]
                  for model in unit_tests])
  return dense_ppl, ppl


def _embedded(adapter: Adapter, params: Params, calib: Sequence[np.ndarray],
              test: Sequence[np.ndarray], units: Sequence[Unit],
              batch_size: int, offload: bool) -> dict[str, list]:
  """The walk's streams before the first layer: each unit's calibration
  streams and each of its models' test streams, and the dense model's
  test streams; every copy starts from the same embedded batches.
  `params`: the model's parameters outside its layers (`outer`)."""

  def embedded(ids: np.ndarray) -> BatchStream:
    return [keep(embed(adapter, params, b), offload)
            for b in device_batches(np.asarray(ids), batch_size)]

  needed = sorted({i for u in units for i in u.tasks})
  calib_h0 = {i: embedded(calib[i]) for i in needed}
  test_h0 = [embedded(t) for t in test]
  return {"calib": [[calib_h0[i] for i in u.tasks] for u in units],
          "test": [[list(test_h0) for _ in range(u.models)]
                   for u in units],
          "dense": list(test_h0)}
