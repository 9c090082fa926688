"""Random solver problems and ahead-compiled timed calls, shared by the
solver benchmarks (`experiments.bench_solvers`, `experiments.lib.bench_mesh`).

Timings go through the one timer of the project (`mosp_jax.timing`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from mosp_jax import timing


def compiled(fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
  """`fn` jitted and compiled ahead for `args`, as a call without
  arguments (arrays stay arguments, so XLA cannot fold them as
  constants); its timings never include compilation."""
  exe = jax.jit(fn).lower(*args).compile()
  return lambda: exe(*args)


def timed(fn: Callable[..., Any], *args: Any, repeats: int
          ) -> tuple[float, Any]:
  """`(best seconds, output)` of `fn(*args)`, compiled ahead, over
  `repeats` calls."""
  (t,), (out,) = timing.best_times([compiled(fn, *args)], repeats=repeats)
  return t, out


def random_grams(rng: np.random.Generator, m: int, n: int) -> np.ndarray:
  """m task Grams sharing half their structure, with outlier channels."""
  tokens = 2 * n
  shared = rng.standard_normal((n // 4, n), np.float32) / np.sqrt(n)
  out = []
  for _ in range(m):
    own = rng.standard_normal((n // 4, n), np.float32) / np.sqrt(n)
    X = rng.standard_normal((tokens, n // 2), np.float32) @ np.concatenate(
        [shared, own])
    X += 0.3 * rng.standard_normal((tokens, n), np.float32)
    X *= np.exp(rng.standard_normal(n)).astype(np.float32)
    out.append(X.T @ X / tokens)
  return np.stack(out)
