"""Masked PCG against per-column direct solves (numpy.linalg.solve)."""

import jax
import numpy as np
import pytest

from mosp_jax.solvers import masked_pcg

from .conftest import correlated_gram, guarded


def direct(H, W0, mask):
  """Reference: for each column c, H[S,S] w = (H W0)[S], S = mask[:, c]."""
  H = H.astype(np.float64)
  b = H @ W0
  out = np.zeros_like(W0, np.float64)
  for c in range(W0.shape[1]):
    S = mask[:, c]
    if S.any():
      out[S, c] = np.linalg.solve(H[np.ix_(S, S)], b[S, c])
  return out


def objective(H, W0, W):
  E = np.asarray(W, np.float64) - W0
  return np.sum(E * (H @ E), axis=0)


def problem(rng, n=40, n_out=12, keep=0.4):
  H = correlated_gram(rng, n)
  H += 0.01 * np.mean(np.diag(H)) * np.eye(n, dtype=np.float32)
  W0 = rng.standard_normal((n, n_out)).astype(np.float32)
  mask = rng.random((n, n_out)) < keep
  mask[:, 0] = False  # an empty column
  return H, W0, mask


def test_long_run_equals_direct_solve(rng):
  H, W0, mask = problem(rng)
  X0 = np.where(mask, W0, 0).astype(np.float32)
  X, info = guarded(lambda *a: masked_pcg(*a, iters=200), H, W0, mask, X0)
  ref = direct(H, W0, mask)
  assert not X[~mask].any()
  np.testing.assert_allclose(X, ref, rtol=1e-5,
                             atol=1e-5 * np.abs(ref).max())
  assert info.residual.max() < 1e-4


def test_ten_iterations_never_raise_objective(rng):
  H, W0, mask = problem(rng, n=64, n_out=20)
  X0 = np.where(mask, W0, 0).astype(np.float32)
  prev = objective(H, W0, X0)
  for it in range(1, 11):
    X, _ = guarded(lambda *a, it=it: masked_pcg(*a, iters=it),
                   H, W0, mask, X0)
    cur = objective(H, W0, X)
    assert (cur <= prev * (1 + 1e-5) + 1e-7).all(), it
    prev = cur
  # and it closes most of the gap to the optimum
  opt = objective(H, W0, direct(H, W0, mask)).sum()
  assert prev.sum() - opt < 0.1 * (objective(H, W0, X0).sum() - opt)


def test_off_mask_warm_start_is_ignored(rng):
  H, W0, mask = problem(rng)
  X0 = rng.standard_normal(W0.shape).astype(np.float32)
  a, _ = guarded(lambda *x: masked_pcg(*x, iters=5), H, W0, mask, X0)
  b, _ = guarded(lambda *x: masked_pcg(*x, iters=5), H, W0, mask,
                 np.where(mask, X0, 0).astype(np.float32))
  np.testing.assert_array_equal(a, b)


def test_vmap_equals_loop(rng):
  probs = [problem(rng) for _ in range(3)]
  Hs, W0s, masks = (np.stack(x) for x in zip(*probs, strict=True))
  f = lambda H, W, M: masked_pcg(H, W, M, W * M, iters=10)[0]  # noqa: E731
  batched = guarded(jax.vmap(f), Hs, W0s, masks)
  for i in range(3):
    np.testing.assert_allclose(
        batched[i], guarded(f, Hs[i], W0s[i], masks[i]), rtol=1e-5,
        atol=1e-6)


@pytest.mark.parametrize("n_out", [1, 5])
def test_degenerate_inputs_are_finite(rng, n_out):
  n = 16
  H = np.zeros((n, n), np.float32)  # no signal at all
  W0 = rng.standard_normal((n, n_out)).astype(np.float32)
  mask = np.ones((n, n_out), bool)
  X, info = guarded(lambda *a: masked_pcg(*a, iters=10), H, W0, mask, W0)
  assert np.isfinite(X).all() and np.isfinite(info.residual).all()
