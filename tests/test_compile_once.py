"""Compile once per shape: the MOSP entry points and one whole walk.

chex's `assert_max_traces` counts the traces of one wrapped function; the
entry points here are module-level `jax.jit`s, so `Compilations` counts
what JAX itself reports instead: every jaxpr trace and every XLA
compilation, by function name, while it is open. A call with same-shaped
inputs of other values (and other traced hyperparameters) must report
nothing at all; a new shape must trace and compile the jitted core once,
which shows the counter sees it.

Shapes, the pattern and the configs are unique to this file, so no other
test module has compiled them before these tests run.
"""

from __future__ import annotations

import collections
import dataclasses

import jax
import numpy as np
import pytest

from mosp_jax.config import SolverConfig
from mosp_jax.models import adapter_for, tiny_llama
from mosp_jax.pipeline.layer_source import from_tree
from mosp_jax.pipeline.prune import prune_and_evaluate
from mosp_jax.solvers import (
  Unstructured,
  alps_prune,
  mosp_materialize,
  mosp_pareto,
  mosp_prune,
)

from .conftest import task_grams

# Events of jax/_src/dispatch.py (JAXPR_TRACE_EVENT, BACKEND_COMPILE_EVENT),
# recorded with the function's name: 'f' for a trace, 'jit(f)' for a
# compilation.
_TRACE = "/jax/core/compile/jaxpr_trace_duration"
_COMPILE = "/jax/core/compile/backend_compile_duration"


class Compilations:
  """Counts JAX traces and XLA compilations while open (a context manager).

  Attributes:
    events: `(kind, function name)` in order, kind 'trace' or 'compile'.
  """

  def __init__(self):
    self.events: list[tuple[str, str]] = []

  def _listen(self, event: str, duration: float, **kwargs) -> None:
    del duration
    kind = {_TRACE: "trace", _COMPILE: "compile"}.get(event)
    if kind is not None:
      self.events.append((kind, str(kwargs.get("fun_name"))))

  def __enter__(self) -> Compilations:
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc) -> None:
    jax.monitoring.unregister_event_duration_listener(self._listen)

  def counts(self, start: int = 0, stop: int | None = None
             ) -> collections.Counter:
    """`{(kind, name): count}` of `events[start:stop]`."""
    return collections.Counter(self.events[start:stop])

  def once(self, name: str) -> bool:
    """`name` was traced once and compiled once."""
    c = self.counts()
    return c[("trace", name)] == 1 and c[("compile", f"jit({name})")] == 1


N_IN, M = 12, 2
PATTERN = Unstructured(0.45)
CFG = SolverConfig(max_iter=40, stage2_max_iter=8)
# Other values of every hyperparameter that is traced, not static.
CFG_B = dataclasses.replace(CFG, rho0=0.05, stage2_rho=0.8, damping=0.02)


def _inputs(seed: int, n_out: int
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`(M, N_IN, N_IN)` task Grams, `(N_IN, n_out)` dense weights and
  `(1, M)` preferences, drawn with `seed`."""
  rng = np.random.default_rng(seed)
  grams = task_grams(rng, M, N_IN)
  W0 = rng.standard_normal((N_IN, n_out)).astype(np.float32)
  return grams, W0, rng.dirichlet(np.ones(M), 1).astype(np.float32)


def _pareto(grams, W0, prefs, cfg):
  del prefs
  return mosp_pareto(*jax.device_put((grams, W0)), pattern=PATTERN,
                     cfg=cfg)


def _prune(grams, W0, prefs, cfg):
  return mosp_prune(*jax.device_put((grams, W0, prefs)), pattern=PATTERN,
                    cfg=cfg)


def _alps(grams, W0, prefs, cfg):
  del prefs  # One objective: the first task's Gram.
  return alps_prune(*jax.device_put((grams[0], W0)), pattern=PATTERN,
                    cfg=cfg)


# entry point -> (call(grams, W0, prefs, cfg), its jitted cores, n_out,
# new n_out). A core meets each new n_out nowhere else in this file.
ENTRY_POINTS = {
    "mosp_pareto": (_pareto, ("_pareto",), 6, 9),
    "mosp_prune": (_prune, ("_pareto", "_preference_models"), 10, 12),
    "alps_prune": (_alps, ("_alps",), 6, 9),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_entry_point_compiles_once_per_shape(entry):
  call, cores, n_out, new_n_out = ENTRY_POINTS[entry]
  with jax.transfer_guard("disallow"):
    with Compilations() as first:
      jax.block_until_ready(call(*_inputs(0, n_out), CFG))
    with Compilations() as again:
      jax.block_until_ready(call(*_inputs(1, n_out), CFG_B))
    with Compilations() as other_shape:
      jax.block_until_ready(call(*_inputs(2, new_n_out), CFG))
  for core in cores:  # At most once: another case may share its shape.
    assert first.counts()[("trace", core)] <= 1, first.events
  assert again.events == []  # Nothing anywhere, not only the cores.
  for core in cores:
    assert other_shape.once(core), other_shape.events


def test_mosp_materialize_compiles_once_per_preference_count():
  """New preference values (and damping) reuse the compiled
  materialisation and its refit; a new number of preferences compiles
  it once."""
  grams, W0, _ = _inputs(0, 6)
  grams_dev, W0_dev = jax.device_put((grams, W0))
  rng = np.random.default_rng(0)
  prefs = [jax.device_put(rng.dirichlet(np.ones(M), K).astype(np.float32))
           for K in (2, 2, 4)]
  with jax.transfer_guard("disallow"):
    pareto, _ = _pareto(grams, W0, None, CFG)
    with Compilations() as first:
      jax.block_until_ready(mosp_materialize(
          pareto, prefs[0], pattern=PATTERN, cfg=CFG, grams=grams_dev,
          W0=W0_dev))
    with Compilations() as again:
      jax.block_until_ready(mosp_materialize(
          pareto, prefs[1], pattern=PATTERN, cfg=CFG_B, grams=grams_dev,
          W0=W0_dev))
    with Compilations() as other_shape:
      jax.block_until_ready(mosp_materialize(
          pareto, prefs[2], pattern=PATTERN, cfg=CFG, grams=grams_dev,
          W0=W0_dev))
  assert first.counts()[("trace", "_preference_models")] <= 1, first.events
  assert again.events == []
  assert other_shape.once("_preference_models"), other_shape.events


# The walk's per-layer functions: forward, Gram capture, solvers, stats.
PER_LAYER = ("advance", "batch_grams", "_pareto", "_preference_models",
             "model_stats")


def _walk(adapter, params, calib, test):
  """One MOSP walk: `(result, what it compiled, ends)`, `ends` the event
  count at each layer's progress line (logged once the layer is done)."""
  ends = []
  with Compilations() as seen, jax.transfer_guard("disallow"):
    res = prune_and_evaluate(
        adapter, from_tree(adapter, params), calib, test,
        np.array([[0.5, 0.5]], np.float32),
        pattern=PATTERN, cfg=CFG, batch_size=2,
        log=lambda _: ends.append(len(seen.events)))
  return res, seen, ends


def test_a_whole_walk_compiles_on_its_first_layer_only():
  """The tiny 2-layer Llama pruned twice: the first walk compiles the
  per-layer functions on layer 1, none on layer 2 (same shapes), and the
  head once after it; the second walk compiles nothing and gives the same
  perplexities."""
  model, params = tiny_llama(vocab_size=61, hidden_size=32, seed=0)
  adapter, params = adapter_for(model), jax.device_put(params)
  rng = np.random.default_rng(0)
  calib = [rng.integers(0, 61, (2, 10)).astype(np.int32) for _ in range(M)]
  test = [rng.integers(0, 61, (2, 10)).astype(np.int32) for _ in range(M)]
  res1, first, (end1, end2) = _walk(adapter, params, calib, test)
  res2, second, _ = _walk(adapter, params, calib, test)
  layer1, layer2 = first.counts(0, end1), first.counts(end1, end2)
  for name in PER_LAYER:
    assert layer1[("trace", name)] >= 1, (name, layer1)
  assert layer2 == {}, layer2
  assert first.counts(end2)[("trace", "nll")] == 1
  assert second.events == []
  np.testing.assert_array_equal(res2.ppl, res1.ppl)
