"""Shared test helpers: explicit transfers and realistic random layers."""

from __future__ import annotations

import functools
import pathlib
import zlib

import jax
import numpy as np
import pytest

# The repository root: the working directory of tests that run a command.
ROOT = pathlib.Path(__file__).resolve().parents[1]


def guarded(fn, *args, jit: bool = True, **kwargs):
  """Runs `fn` on device copies of `args` with implicit transfers disallowed
  (as the runner does) and returns its outputs as numpy. Bare array
  functions are jitted (eager ops would move Python scalars); the solvers'
  public entry points are already jitted and called with `jit=False`."""
  args = jax.device_put(args)
  if jit:
    fn = jax.jit(functools.partial(fn, **kwargs))
    kwargs = {}
  with jax.transfer_guard("disallow"):
    out = fn(*args, **kwargs)
  return jax.device_get(out)


def correlated_gram(rng: np.random.Generator, n: int, *, tokens: int = 0,
                    rank: int | None = None) -> np.ndarray:
  """Per-token mean Gram of activations with correlated channels and
  uneven channel scales, like an LLM layer input. `rank` < n makes it
  rank-deficient."""
  tokens = tokens or 4 * n
  r = rank or n
  basis = rng.standard_normal((r, n)) / np.sqrt(r)
  X = rng.standard_normal((tokens, r)) @ basis
  if rank is None:
    X += 0.5 * rng.standard_normal((tokens, n))
  X *= np.exp(rng.standard_normal(n))[None, :]  # outlier channels
  return (X.T @ X / tokens).astype(np.float32)


def task_grams(rng: np.random.Generator, m: int, n: int) -> np.ndarray:
  """`m` Grams that share structure but differ per task (distinct domains)."""
  shared = rng.standard_normal((n // 2, n)) / np.sqrt(n)
  out = []
  for _ in range(m):
    own = rng.standard_normal((n // 2, n)) / np.sqrt(n)
    X = rng.standard_normal((4 * n, n)) @ np.concatenate([shared, own])
    X *= np.exp(0.7 * rng.standard_normal(n))[None, :]
    out.append(X.T @ X / X.shape[0])
  return np.stack(out).astype(np.float32)


def rel_err(G, W0, W) -> float:
  """Independent numpy (float64) relative reconstruction error."""
  G = np.asarray(G, np.float64)
  E = np.asarray(W, np.float64) - W0
  return float(np.sum(E * (G @ E)) / np.sum(W0 * (G @ W0)))


@pytest.fixture
def rng(request):
  return np.random.default_rng(zlib.crc32(request.node.name.encode()))


# A finished run of the tiny smoke model (random 2-layer Llama, SmolLM2
# tokenizer), small enough for tests: what `tiny_run` runs.
TINY_RUN_FLAGS = ("--flagfile=experiments/configs/smoke.flags",
                  "--nsamples=2", "--test_tokens=128", "--max_iter=30",
                  "--stage2_max_iter=30")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """The run directory of `experiments.run` with TINY_RUN_FLAGS."""
  from absl import flags
  from absl.testing import flagsaver

  from experiments.lib import runner, shared_flags

  out = tmp_path_factory.mktemp("run")
  with flagsaver.flagsaver():
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["run", *TINY_RUN_FLAGS, f"--out_dir={out}"])
    run, solver = shared_flags.configs_from_flags()
  runner.run_experiment(run, solver, log=lambda s: None)
  return out


@pytest.fixture(scope="session")
def tiny_export(tiny_run):
  """`(folder, ExportInfo)` of the centroid of `tiny_run`, exported."""
  from bridge import torch_export

  out = tiny_run / "exported"
  info = torch_export.export_preference(tiny_run, "centroid", out)
  return out, info


@pytest.fixture(autouse=True, scope="module")
def _release_memory_after_each_module():
  """Frees what a test module leaves behind before the next one starts:
  JAX's compiled functions and the host memory Python has freed but the
  allocator still holds. One pytest process runs every module; the
  real-model tests peak at about 5 GB, and without this the suite's
  resident memory only grows."""
  yield
  import ctypes
  import gc
  gc.collect()
  jax.clear_caches()
  try:  # glibc only: hand freed heap pages back to the system.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass
