"""ALPS (single-objective ADMM + PCG) and the rho schedule."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mosp_jax.config import PAPER, SolverConfig
from mosp_jax.solvers import (
  NM,
  Unstructured,
  alps_prune,
  prune_mask,
  rho_step,
)
from mosp_jax.solvers import admm as admm_lib
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
    ((0.1, 0.29, False, 31), (0.1, False, STOP)),        # s < 3e-4 k after
    ((0.1, 0.3, True, 31), (0.11, True, CONTINUE)),      # 31 iterations
    ((0.1, 0.29, True, 30), (0.11, True, CONTINUE)),     # (ALPS's i >= 30)
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


def reference_rho_trajectory(G, B0, k, *, rho0=0.1, update_every=3,
                             max_iter=60):
  """ALPS's schedule as a plain Python loop over iterations, in float64
  numpy with its own top-k: `rho` after each iteration, until it stops.
  At every `update_every`-th iteration (and only there) the support change
  `s` of the sparse iterate since the last check sets `rho` (stop rules
  first: `s == 0` after a raise, or `s < 3e-4 k` after more than 30
  iterations; then x1.3 / x1.2 / x1.1, or a restart at `rho / 5`)."""
  G, B0 = np.asarray(G, np.float64), np.asarray(B0, np.float64)
  L, Q = np.linalg.eigh(G)

  def project(Z):
    keep = np.zeros(Z.size, bool)
    keep[np.argsort(-np.abs(Z).ravel(), kind="stable")[:k]] = True
    return np.where(keep.reshape(Z.shape), Z, 0.0), keep

  D0, supp0 = project(B0)
  B, D, V, prev = B0, D0, np.zeros_like(B0), supp0
  rho, raised, out = rho0, False, []
  for it in range(1, max_iter + 1):
    B = Q @ ((Q.T @ (G @ B0 - V + rho * D)) / (L + rho)[:, None])
    Z = B + V / rho
    D, supp = project(Z)
    V = V + rho * (B - D)
    stop = False
    if it % update_every == 0:
      s = int(np.sum(supp != prev))
      prev = supp
      if (raised and s == 0) or (it > 30 and s < 3e-4 * k):
        stop = True
      elif s >= 0.1 * k:
        rho, raised = rho * 1.3, True
      elif s >= 0.005 * k:
        rho, raised = rho * 1.2, True
      elif raised:
        rho *= 1.1
      else:
        rho /= 5
        B, D, V, prev = B0, D0, np.zeros_like(B0), supp0
    out.append(rho)
    if stop:
      break
  return np.asarray(out)


def test_rho_trajectory_matches_a_plain_loop(rng):
  """rho changes only at every third iteration (eq. 50), and the run stops
  where the loop stops; the JAX run is read after each iteration count."""
  n, n_out = 32, 24
  G = correlated_gram(rng, n).astype(np.float64)
  d = np.sqrt(np.diag(G))
  G = G / np.outer(d, d) + 0.01 * np.eye(n)
  B0 = rng.standard_normal((n, n_out))
  k = n * n_out // 2
  ref = reference_rho_trajectory(G, B0, k)

  @jax.jit
  def rho_after(G, B0, iters):
    Q, L = admm_lib.eig(G)

    def project(Z):
      return jax.vmap(lambda z: prune_mask(jnp.abs(z),
                                           Unstructured(0.5)))(Z), ()

    B = B0[None]
    mask, _ = project(B)
    _, _, info = admm_lib.run_admm(
        admm_lib.eig_solve(Q, L, n_out, 3), G @ B0,
        (B, jnp.where(mask, B, 0.0), jnp.zeros_like(B)), project, k=k,
        rho0=0.1, adaptive=True, update_every=3, max_iter=iters)
    return info.rho, info.iters, info.converged

  G32, B32 = G.astype(np.float32), B0.astype(np.float32)
  got = [guarded(rho_after, G32, B32, np.int32(t), jit=False)
         for t in range(1, len(ref) + 2)]
  rhos = np.array([float(r) for r, _, _ in got[:len(ref)]])
  np.testing.assert_allclose(rhos, ref, rtol=1e-5)
  assert [int(i) for _, i, _ in got] == list(range(1, len(ref) + 1)) + [
      len(ref)]
  assert bool(got[-1][2]) and len(ref) >= 12  # stopped by the schedule
  before = np.concatenate([[np.float32(0.1)], rhos[:-1]])
  between_checks = np.arange(1, len(rhos) + 1) % 3 != 0
  np.testing.assert_array_equal(rhos[between_checks], before[between_checks])
  assert (rhos[~between_checks] != before[~between_checks]).any()


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


def test_cap_is_respected(rng):
  G = correlated_gram(rng, 32)
  W0 = rng.standard_normal((32, 16)).astype(np.float32)
  cfg = dataclasses.replace(SolverConfig(), max_iter=4)
  _, mask, info = run_alps(G, W0, Unstructured(0.7), cfg)
  assert int(info.admm.iters) == 4 and mask.sum() == round(0.3 * 512)
