"""ALPS (single-objective ADMM + PCG) and the rho schedule."""

import dataclasses

import numpy as np
import pytest

from mosp_jax.config import PAPER, SolverConfig
from mosp_jax.solvers import NM, Unstructured, alps_prune, rho_step
from mosp_jax.solvers import alps as alps_module
from mosp_jax.solvers.admm import CONTINUE, RESTART, STOP

from .conftest import correlated_gram, guarded, rel_err


def magnitude(W0, sparsity):
  k = int(round((1 - sparsity) * W0.size))
  order = np.argsort(-np.abs(W0).ravel(), kind="stable")
  keep = np.zeros(W0.size, bool)
  keep[order[:k]] = True
  return np.where(keep.reshape(W0.shape), W0, 0)


def wanda(W0, G, sparsity):
  """Wanda: |W| * ||x_j||, compared within each output, no update."""
  score = np.abs(W0) * np.sqrt(np.diag(G))[:, None]
  keep_rows = int(round((1 - sparsity) * W0.shape[0]))
  out = np.zeros_like(W0)
  for c in range(W0.shape[1]):
    idx = np.argsort(-score[:, c], kind="stable")[:keep_rows]
    out[idx, c] = W0[idx, c]
  return out


def run_alps(G, W0, pattern, cfg=PAPER):
  return guarded(lambda g, w: alps_prune(g, w, pattern=pattern, cfg=cfg),
                 G, W0, jit=False)


# (rho, s, raised, iters_done) -> (new rho, raised, action); k = 1000.
RHO_TABLE = [
    ((0.1, 100.0, False, 3), (0.13, True, CONTINUE)),    # s >= 0.1 k
    ((0.1, 99.9, False, 3), (0.12, True, CONTINUE)),     # s >= 0.005 k
    ((0.1, 5.0, True, 3), (0.12, True, CONTINUE)),       # s == 0.005 k
    ((0.1, 4.9, True, 3), (0.11, True, CONTINUE)),       # 0 < s, raised
    ((0.1, 1.0, True, 3), (0.11, True, CONTINUE)),
    ((0.1, 4.9, False, 3), (0.02, False, RESTART)),      # froze, not raised
    ((0.1, 0.0, False, 3), (0.02, False, RESTART)),
    ((0.1, 0.0, True, 6), (0.1, True, STOP)),            # stable support
    ((0.1, 0.29, False, 30), (0.1, False, STOP)),        # s < 3e-4 k at 30
    ((0.1, 0.3, True, 30), (0.11, True, CONTINUE)),
    ((0.1, 0.29, True, 29), (0.11, True, CONTINUE)),
    ((9e5, 200.0, True, 9), (1e6, True, CONTINUE)),      # cap
]


@pytest.mark.parametrize("args,expected", RHO_TABLE)
def test_rho_rule_table(args, expected):
  rho, s, raised, it = args
  got = guarded(lambda r, s, b, i: rho_step(r, s, 1000, b, i),
                np.float32(rho), np.float32(s), np.bool_(raised),
                np.int32(it))
  np.testing.assert_allclose(got[0], expected[0], rtol=1e-6)
  assert bool(got[1]) == expected[1] and int(got[2]) == expected[2]


def test_sparsity_zero_returns_dense(rng):
  G = correlated_gram(rng, 32)
  W0 = rng.standard_normal((32, 16)).astype(np.float32)
  W, mask, _ = run_alps(G, W0, Unstructured(0.0))
  assert mask.all()
  np.testing.assert_allclose(W, W0, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
@pytest.mark.parametrize("seed", range(5))
def test_beats_magnitude_and_wanda(sparsity, seed):
  rng = np.random.default_rng(seed)
  n, n_out = 96, 64
  G = correlated_gram(rng, n)
  W0 = rng.standard_normal((n, n_out)).astype(np.float32)
  W, mask, info = run_alps(G, W0, Unstructured(sparsity))
  k = int(round((1 - sparsity) * n * n_out))
  assert mask.sum() == k and np.count_nonzero(W) <= k
  assert not W[~mask].any()
  err = rel_err(G, W0, W)
  assert err < rel_err(G, W0, magnitude(W0, sparsity))
  assert err < rel_err(G, W0, wanda(W0, G, sparsity))
  assert bool(info.admm.converged) and int(info.admm.iters) < 300


def test_nm_exact_counts(rng):
  G = correlated_gram(rng, 32)
  W0 = rng.standard_normal((32, 8)).astype(np.float32)
  W, mask, _ = run_alps(G, W0, NM(2, 4))
  np.testing.assert_array_equal(mask.reshape(8, 4, 8).sum(1), 2)
  assert not W[~mask].any()
  # Wanda restricted to 2:4 groups (no update).
  score = (np.abs(W0) * np.sqrt(np.diag(G))[:, None]).reshape(8, 4, 8)
  rank = np.argsort(np.argsort(-score, axis=1, kind="stable"), axis=1)
  w24 = np.where((rank < 2).reshape(32, 8), W0, 0)
  assert rel_err(G, W0, W) < rel_err(G, W0, w24)


@pytest.mark.parametrize("case", ["dead_inputs", "rank_deficient",
                                  "zero_gram", "sparsity_0.99",
                                  "one_output"])
def test_degenerate_inputs(rng, case):
  n, n_out, sparsity = 24, 10, 0.5
  G = correlated_gram(rng, n)
  if case == "dead_inputs":
    G[:, :5] = 0
    G[:5, :] = 0
  elif case == "rank_deficient":
    G = correlated_gram(rng, n, rank=3)
  elif case == "zero_gram":
    G = np.zeros_like(G)
  elif case == "sparsity_0.99":
    sparsity = 0.99
  elif case == "one_output":
    n_out = 1
  W0 = rng.standard_normal((n, n_out)).astype(np.float32)
  W, mask, info = run_alps(G, W0, Unstructured(sparsity))
  assert np.isfinite(W).all() and np.isfinite(float(info.admm.rho))
  assert mask.sum() == int(round((1 - sparsity) * n * n_out))
  assert not W[~mask].any()
  if case == "dead_inputs":  # weights on inputs that never fire go first
    assert not mask[:5].any()


def test_compiles_once_across_data_and_rho(rng):
  before = alps_module._alps._cache_size()
  for rho0 in (0.1, 0.05):
    G = correlated_gram(rng, 20)
    W0 = rng.standard_normal((20, 7)).astype(np.float32)
    run_alps(G, W0, Unstructured(0.6),
             dataclasses.replace(SolverConfig(), rho0=rho0))
  assert alps_module._alps._cache_size() - before == 1


def test_cap_is_respected(rng):
  G = correlated_gram(rng, 32)
  W0 = rng.standard_normal((32, 16)).astype(np.float32)
  cfg = dataclasses.replace(SolverConfig(), max_iter=4)
  _, mask, info = run_alps(G, W0, Unstructured(0.7), cfg)
  assert int(info.admm.iters) == 4 and mask.sum() == round(0.3 * 512)
