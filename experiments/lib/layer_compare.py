"""One real layer for `experiments.compare --layer_level`: capture, solve.

`capture_layer` runs every task's calibration and test segments through the
dense model up to decoder layer `L` and accumulates the input Grams of
layer `L`'s linears (one per task and group of linears sharing an input),
plus the dense kernels; the result is cached on disk, keyed by everything
that determines it. `solve_layer` prunes each linear (its
`linear_problem.LinearProblem`) with every method and measures the
relative reconstruction error of each model on each task's calibration
Gram (the objective) and held-out test Gram.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import re
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import numpy as np

from bridge import load
from experiments.lib.entries import Entry
from mosp_jax import cli, fetch
from mosp_jax.config import RunConfig
from mosp_jax.pipeline import artifact, run_record
from mosp_jax.pipeline import streams as streams_lib
from mosp_jax.pipeline.grams import layer_grams
from mosp_jax.pipeline.linear_problem import LinearProblem
from mosp_jax.solvers import Pattern

_CACHE_VERSION = 1


class CapturedLayer(NamedTuple):
  """The captured inputs of one decoder layer.

  layer: its index; num_layers: of the model.
  groups: linears sharing an input, as the adapter groups them.
  calib, test: `{group key: (m, n_in, n_in) float32}` per-task Grams on
    the calibration and on the test segments (key: the group's first
    linear).
  kernels: `{linear: (n_in, n_out) float32}` dense weights.
  """
  layer: int
  num_layers: int
  groups: list[list[str]]
  calib: dict[str, np.ndarray]
  test: dict[str, np.ndarray]
  kernels: dict[str, np.ndarray]

  def group_of(self, name: str) -> str:
    return next(g[0] for g in self.groups if name in g)


def load_inputs(run: RunConfig, *, log: Callable[[str], None] = print):
  """The model and data of a run, loaded once for every method (the
  tokenizer and data first, as `experiments.run` does, so that a task
  that is too small fails before the model loads).

  Returns `(adapter, params (on the device), calib, test, (model seconds,
  data seconds))`: `calib`/`test` per task `(N, T)` int32, every task cut
  to the same number of test segments.
  """
  t0 = time.perf_counter()
  log(f"loading the tokenizer and {len(run.tasks)} tasks ...")
  tokenizer = load.spec_tokenizer(run.model, trust_pickle=run.trust_pickle)
  calib, test = run_record.run_segments(run, tokenizer)
  t_data = time.perf_counter() - t0
  log(f"loading the model {run.model} ...")
  adapter, params, _ = load.load_dense(run.model, tokenizer,
                                       trust_pickle=run.trust_pickle)
  params = jax.device_put(params)
  return adapter, params, calib, test, (time.perf_counter() - t0 - t_data,
                                        t_data)


def _cache_path(run: RunConfig, layer: int) -> pathlib.Path:
  key = hashlib.sha256(json.dumps(dict(
      version=_CACHE_VERSION, model=run.model, tasks=list(run.tasks),
      nsamples=run.nsamples, seqlen=run.seqlen,
      test_tokens=run.test_tokens, seed=run.seed, layer=layer)).encode())
  slug = re.sub(r"[^A-Za-z0-9._-]+", "_", run.model)[:40]
  return fetch.cache_dir() / "grams" / f"{slug}-{key.hexdigest()[:24]}.npz"


def _save(path: pathlib.Path, prob: CapturedLayer) -> None:
  arrays = {f"calib/{k}": v for k, v in prob.calib.items()}
  arrays |= {f"test/{k}": v for k, v in prob.test.items()}
  arrays |= {f"kernel/{k}": v for k, v in prob.kernels.items()}
  arrays["meta"] = np.frombuffer(json.dumps(
      {"layer": prob.layer, "num_layers": prob.num_layers,
       "groups": prob.groups}).encode(), np.uint8)
  # numpy's stub checks `**arrays` against `allow_pickle: bool` too; no
  # key here is 'allow_pickle'.
  artifact.atomic_write(
      path, lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]


def _load(path: pathlib.Path) -> CapturedLayer:
  with np.load(path) as z:
    meta = json.loads(z["meta"].tobytes().decode())
    part = {s: {k.split("/", 1)[1]: z[k] for k in z.files
                if k.startswith(f"{s}/")} for s in ("calib", "test",
                                                     "kernel")}
  return CapturedLayer(meta["layer"], meta["num_layers"], meta["groups"],
                      part["calib"], part["test"], part["kernel"])


def check_linears(names: Sequence[str], known: Sequence[str]) -> None:
  """Raises `cli.UsageError` for a --linears entry the layer lacks."""
  unknown = [n for n in names if n not in known]
  if unknown:
    raise cli.UsageError(f"--linears: unknown {unknown}; the layer has "
                         f"{list(known)}")


def capture_layer(run: RunConfig, layer: int = -1, *,
                  linears: Sequence[str] = (), use_cache: bool = True,
                  log: Callable[[str], None] = print) -> CapturedLayer:
  """Grams of layer `layer` (-1: the middle one) on dense activations;
  `linears` (the ones to solve) are checked as soon as the model is
  known."""
  path = _cache_path(run, layer)
  if use_cache and path.exists():
    log(f"layer Grams from the cache: {path}")
    return _load(path)
  t0 = time.perf_counter()
  adapter, params, calib, test, _ = load_inputs(run, log=log)
  check_linears(linears, adapter.linear_names())
  n_layers = adapter.num_layers(params)
  target = n_layers // 2 if layer < 0 else layer
  if not 0 <= target < n_layers:
    raise cli.UsageError(f"--layer {layer}: the model has {n_layers} "
                         "layers")
  log(f"capturing the Grams of layer {target}/{n_layers} ...")
  bs = run.batch_size
  with jax.transfer_guard("disallow"):
    streams = {side: [streams_lib.dense_stream(adapter, params, ids,
                                               batch_size=bs, layers=target)
                      for ids in seqs]
               for side, seqs in (("calib", calib), ("test", test))}
    lp = adapter.layer_params(params, target)
    grams = {side: [layer_grams(adapter, lp, s, where=f"layer {target}, "
                                f"{side} task {t}")
                    for t, s in enumerate(ss)]
             for side, ss in streams.items()}
    groups = adapter.linear_groups()
    kernels = {name: np.asarray(jax.device_get(
        adapter.get_kernel(params, target, name)), np.float32)
               for g in groups for name in g}
  stacked = {side: {g[0]: np.stack([gr[g[0]] for gr in grams[side]])
                    for g in groups} for side in grams}
  prob = CapturedLayer(target, n_layers, groups, stacked["calib"],
                      stacked["test"], kernels)
  log(f"captured layer {target}/{n_layers} in "
      f"{time.perf_counter() - t0:.0f}s")
  if use_cache:
    _save(path, prob)
  return prob


class LayerResult(NamedTuple):
  """Per entry name: `errors[name][linear]` `(points, m)` relative errors
  on the calibration Grams, `heldout[name][linear]` on the test Grams,
  `seconds[name]` wall and `cpu_seconds[name]` process CPU time of the
  solves over all linears (compilation excluded; a MOSP entry's ':W'
  companion shares its time). On a shared machine both vary with the
  load (measured here: up to 4x between runs, ratios much less), so
  compare within one run."""
  errors: dict[str, dict[str, np.ndarray]]
  heldout: dict[str, dict[str, np.ndarray]]
  seconds: dict[str, float]
  cpu_seconds: dict[str, float]


def _solve(entry: Entry, prob: LinearProblem, prefs_dev: jax.Array,
           lams: Sequence[jax.Array]) -> dict[str, jax.Array]:
  """`{name: (points, n_in, n_out)}` pruned weights of one entry (a MOSP
  entry also returns its global model under `name + ':W'`)."""
  cfg = entry.cfg
  if entry.method == "mosp":
    par, _ = prob.pareto(cfg)
    W = prob.preference_models(par, prefs_dev, cfg)[0]
    return {entry.name: W, f"{entry.name}:W": _stack([par.W])}
  per_model = lams if entry.protocol == "mixed" else [None]
  return {entry.name: _stack([prob.baseline(entry.method, entry.protocol,
                                            cfg, lam=lam)
                              for lam in per_model])}


@jax.jit
def _stack(ws):
  return jax.numpy.stack(ws)


def _timed_solve(*args) -> dict[str, jax.Array]:
  return jax.block_until_ready(_solve(*args))


def solve_layer(captured: CapturedLayer, prefs: np.ndarray,
                entries: Sequence[Entry], *, pattern: Pattern,
                linears: Sequence[str] = (),
                log: Callable[[str], None] = print) -> LayerResult:
  """Prunes the linears of `captured` with every entry.

  Before the first linear of each shape, each entry is compiled on an
  easy problem of that shape (identity Grams), so the times exclude
  compilation (in a whole-model walk it is amortised over the layers).
  """
  names = list(linears) or [n for g in captured.groups for n in g]
  check_linears(names, list(captured.kernels))
  prefs = np.asarray(prefs, np.float32)
  errors: dict[str, dict[str, np.ndarray]] = {}
  heldout: dict[str, dict[str, np.ndarray]] = {}
  seconds = {e.name: 0.0 for e in entries}
  cpu = {e.name: 0.0 for e in entries}
  compiled: set[tuple[str, tuple[int, ...]]] = set()
  with jax.transfer_guard("disallow"):
    prefs_dev = jax.device_put(prefs)
    lams = [jax.device_put(p) for p in prefs]
    for name in names:
      key = captured.group_of(name)
      G, Gt, W0 = jax.device_put((captured.calib[key], captured.test[key],
                                  captured.kernels[name]))
      lin = LinearProblem(name, W0, G, pattern)
      held = dataclasses.replace(lin, grams=Gt)
      m, n_in = captured.calib[key].shape[:2]
      # Compile on an easy problem of the same shapes (identity Grams:
      # ADMM settles in a few iterations).
      easy = dataclasses.replace(lin, grams=jax.device_put(np.broadcast_to(
          np.eye(n_in, dtype=np.float32), (m, n_in, n_in))))
      for entry in entries:
        if (entry.name, W0.shape) not in compiled:
          _timed_solve(entry, easy, prefs_dev, lams)
          compiled.add((entry.name, W0.shape))
        t0, c0 = time.perf_counter(), time.process_time()
        out = _timed_solve(entry, lin, prefs_dev, lams)
        dt = time.perf_counter() - t0
        seconds[entry.name] += dt
        cpu[entry.name] += time.process_time() - c0
        for label, W in out.items():
          (e, _), (h, _) = jax.device_get((lin.errors(W), held.errors(W)))
          errors.setdefault(label, {})[name] = np.asarray(e, np.float64)
          heldout.setdefault(label, {})[name] = np.asarray(h, np.float64)
        log(f"{name} {tuple(W0.shape)} {entry.name}: {dt:.2f}s, mean rel. "
            f"error {np.mean(errors[entry.name][name]):.4g}")
  return LayerResult(errors, heldout, seconds, cpu)
