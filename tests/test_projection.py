"""Projections against numpy references: exact counts, deterministic ties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mosp_jax.solvers import projection as P

from .conftest import guarded


def np_topk(scores, k, eligible=None):
  """Reference: stable sort, ties to the lower flat index."""
  s = np.asarray(scores, np.float64).ravel().copy()
  if eligible is not None:
    s[~eligible.ravel()] = -np.inf
  order = np.argsort(-s, kind="stable")
  mask = np.zeros(s.size, bool)
  mask[order[:k]] = True
  return mask.reshape(np.shape(scores))


def np_nm(scores, n, m):
  n_in, n_out = scores.shape
  out = np.zeros_like(scores, bool)
  for c in range(n_out):
    for g in range(0, n_in, m):
      order = np.argsort(-scores[g:g + m, c], kind="stable")
      out[g + order[:n], c] = True
  return out


@pytest.mark.parametrize("shape", [(7, 5), (64, 48), (1, 9), (33, 1), (50,),
                                   (3, 8, 6)])
@pytest.mark.parametrize("frac", [0.0, 0.01, 0.3, 0.5, 0.99, 1.0])
def test_topk_matches_stable_sort(rng, shape, frac):
  s = rng.random(shape).astype(np.float32)
  k = int(round(frac * s.size))
  got = guarded(lambda x: P.topk_mask(x, k), s)
  assert got.sum() == k
  np.testing.assert_array_equal(got, np_topk(s, k))


def test_topk_ties_go_to_lower_index(rng):
  # Quantised weights: only 4 distinct magnitudes, many ties.
  s = rng.integers(0, 4, (40, 30)).astype(np.float32) ** 2
  for k in [1, 100, 599, 600, 601, 1199]:
    got = guarded(lambda x, k=k: P.topk_mask(x, k), s)
    assert got.sum() == k
    np.testing.assert_array_equal(got, np_topk(s, k))


def test_topk_eligible_and_special_values(rng):
  s = rng.random((20, 10)).astype(np.float32)
  s[0, :3] = [0.0, -0.0, np.inf]
  elig = rng.random((20, 10)) > 0.4
  k = int(elig.sum()) - 3
  got = guarded(lambda x, e: P.topk_mask(x, k, e), s, elig)
  assert got.sum() == k and not (got & ~elig).any()
  np.testing.assert_array_equal(got, np_topk(s, k, elig))


@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (3, 4), (4, 8), (1, 2)])
def test_nm_counts_and_reference(rng, n, m):
  s = rng.integers(0, 5, (16, 6)).astype(np.float32)  # ties
  got = guarded(lambda x: P.nm_mask(x, n, m), s)
  np.testing.assert_array_equal(got.reshape(-1, m, 6).sum(1), n)
  np.testing.assert_array_equal(got, np_nm(s, n, m))


def test_core_score_power_means(rng):
  Z = rng.standard_normal((3, 6, 5)).astype(np.float32)
  r = Z ** 2 / np.mean(Z ** 2, axis=(1, 2), keepdims=True)
  for p, ref in [(1.0, r.mean(0)), (0.5, np.mean(r ** 0.5, 0) ** 2),
                 (0.0, np.exp(np.mean(np.log(r), 0))),
                 (4.0, np.mean(r ** 4, 0) ** 0.25)]:
    got = guarded(lambda z, p=p: P.core_score(z, p), Z)
    np.testing.assert_allclose(got, ref, rtol=2e-5)


@pytest.mark.parametrize("pattern", [P.Unstructured(0.5), P.Unstructured(0.7),
                                     P.NM(2, 4), P.NM(4, 8)])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.8, 1.0])
def test_mosp_masks_invariants(rng, pattern, alpha):
  m, n_in, n_out = 3, 16, 12
  Z = rng.standard_normal((m, n_in, n_out)).astype(np.float32)
  core, masks = guarded(
      lambda z: P.mosp_masks(z, pattern, alpha=alpha, p=0.5), Z)
  k = pattern.keep(n_in, n_out)
  if isinstance(pattern, P.NM):
    k0 = int(np.floor(alpha * pattern.n))
    groups = lambda x: x.reshape(-1, pattern.m, n_out).sum(-2)  # noqa: E731
    np.testing.assert_array_equal(groups(core), k0)
    for i in range(m):
      np.testing.assert_array_equal(groups(masks[i]), pattern.n)
  else:
    k0 = int(np.floor(alpha * k))
    assert core.sum() == k0
    np.testing.assert_array_equal(masks.sum((1, 2)), k)
    # Core = top-k0 of the power-mean score; own = top of Z_i^2 outside.
    score = np.mean((Z ** 2 / np.mean(Z ** 2, (1, 2), keepdims=True))
                    ** 0.5, 0) ** 2
    np.testing.assert_array_equal(core, np_topk(score, k0))
    for i in range(m):
      own = np_topk(Z[i] ** 2, k - k0, ~core)
      np.testing.assert_array_equal(masks[i], own | core)
  assert (masks & core[None] == core[None]).all()


def test_eager_equals_jit(rng):
  Z = rng.standard_normal((2, 12, 8)).astype(np.float32)
  f = lambda z: P.mosp_masks(z, P.Unstructured(0.6), alpha=0.5, p=0.5)  # noqa
  zj = jnp.asarray(Z)
  with jax.disable_jit():
    eager = f(zj)
  jitted = jax.jit(f)(zj)
  for a, b in zip(eager, jitted, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_pattern_validation():
  with pytest.raises(ValueError, match="sparsity must be in"):
    P.Unstructured(1.0)
  with pytest.raises(ValueError, match="0 < N < M"):
    P.NM(4, 4)
  with pytest.raises(ValueError, match="divisible by 4"):
    P.NM(2, 4).keep(10, 3)
