"""Best wall times of device calls: the one timer of the plan's rate
probes (`pipeline.plan.probes`) and the solver benchmarks
(`experiments.bench_solvers`, `experiments.lib.bench_mesh`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax


def best_times(calls: Sequence[Callable[[], Any]], *, repeats: int,
               budget: float = 0.0, enough: float = math.inf,
               max_rounds: int = 100) -> tuple[list[float], list[Any]]:
  """Best wall time (s) of each call and its last output.

  A round calls every call once, in order: the calls are interleaved so
  that load from other processes hits every call alike (the ratios are
  what counts on a shared machine). Each call's output is waited for
  (`jax.block_until_ready`) inside its timing.

  Args:
    calls: functions of no argument (compiled ahead by the caller, or
      called once before, so that no timing includes compilation).
    repeats: at least this many rounds.
    budget: more rounds while all calls so far took under `budget`
      seconds in total, up to `max_rounds` (0: exactly `repeats`).
    enough: no round after one where every call's best is over
      `enough` seconds.
    max_rounds: the cap of the rounds that `budget` adds.

  Returns:
    `(best seconds per call, last output per call)`.
  """
  best = [math.inf] * len(calls)
  outs: list[Any] = [None] * len(calls)
  spent, rounds = 0.0, 0
  while rounds < repeats or (spent < budget and rounds < max_rounds):
    for i, call in enumerate(calls):
      t0 = time.perf_counter()
      outs[i] = jax.block_until_ready(call())
      dt = time.perf_counter() - t0
      best[i], spent = min(best[i], dt), spent + dt
    rounds += 1
    if min(best, default=math.inf) > enough:
      break
  return best, outs
