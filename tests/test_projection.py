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


# (300, 7) and (256, 5): more rows than one uint8 count block (64 rows),
# the first with padding rows.
@pytest.mark.parametrize("shape", [(7, 5), (64, 48), (1, 9), (33, 1), (50,),
                                   (3, 8, 6), (300, 7), (256, 5)])
@pytest.mark.parametrize("frac", [0.0, 0.01, 0.3, 0.5, 0.99, 1.0])
def test_topk_matches_stable_sort(rng, shape, frac):
  s = rng.random(shape).astype(np.float32)
  k = int(round(frac * s.size))
  got = guarded(lambda x: P.topk_mask(x, k), s)
  assert got.sum() == k
  np.testing.assert_array_equal(got, np_topk(s, k))


@pytest.mark.parametrize("shape", [(40, 30), (300, 30)])
def test_topk_ties_go_to_lower_index(rng, shape):
  # Quantised weights: only 4 distinct magnitudes, many ties; (300, 30)
  # spans five of the bisection's uint8 count blocks (64 rows each).
  s = rng.integers(0, 4, shape).astype(np.float32) ** 2
  n = s.size
  for k in [1, 100, n // 2 - 1, n // 2, n // 2 + 1, n - 1]:
    got = guarded(lambda x, k=k: P.topk_mask(x, k), s)
    assert got.sum() == k
    np.testing.assert_array_equal(got, np_topk(s, k))


def test_topk_of_a_constant_matrix_is_the_first_k():
  # Every count block is full at the threshold: one count per row of
  # each column, the most a uint8 partial count holds in the bisection.
  s = np.full((300, 4), 0.5, np.float32)
  for k in [1, 599, 1199]:
    got = guarded(lambda x, k=k: P.topk_mask(x, k), s)
    np.testing.assert_array_equal(got.ravel(), np.arange(s.size) < k)


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


@pytest.mark.parametrize("pattern", [P.Unstructured(0.5), P.Unstructured(0.7),
                                     P.NM(2, 4), P.NM(4, 8)])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.8, 1.0])
def test_task_masks_keep_the_core_and_the_budget(rng, pattern, alpha):
  """`P_{k,S_c}`: the core plus the top of |Z_i| outside it, exactly
  the budget per matrix or per N:M group, against numpy."""
  m, n_in, n_out = 3, 16, 12
  Z = rng.standard_normal((m, n_in, n_out)).astype(np.float32)
  k0 = P.core_count(pattern, n_in, n_out, alpha)
  core = P.prune_mask(np.abs(Z[0]), pattern) if k0 else np.zeros(
      (n_in, n_out), bool)
  if k0 and isinstance(pattern, P.NM):  # k0 of the kept per group
    core = np_nm(np.where(core, np.abs(Z[0]), -1.0), k0, pattern.m)
  elif k0:
    core = np_topk(np.abs(Z[0]), k0)
  count = pattern.unit_keep(n_in, n_out) - k0
  own = guarded(lambda z, c: P.task_masks(z, c, pattern, count), Z, core)
  masks = own | core[None]
  assert not (own & core[None]).any()
  for i in range(m):
    if isinstance(pattern, P.NM):
      ref = np_nm(np.where(core, -1.0, np.abs(Z[i])), count, pattern.m)
      np.testing.assert_array_equal(
          masks[i].reshape(-1, pattern.m, n_out).sum(1), pattern.n)
    else:
      ref = np_topk(np.abs(Z[i]), count, ~core)
      assert masks[i].sum() == pattern.keep(n_in, n_out)
    np.testing.assert_array_equal(own[i], ref)


@pytest.mark.parametrize("pattern", [P.Unstructured(0.5), P.Unstructured(0.7),
                                     P.NM(2, 4)])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_core_select_inside_the_support(rng, pattern, alpha):
  """The core: the top `floor(alpha k)` of the scores inside the support
  per unit, against numpy; empty at alpha 0, the support at alpha 1."""
  n_in, n_out = 16, 12
  scores = np.abs(rng.standard_normal((n_in, n_out))).astype(np.float32)
  support = np.asarray(P.prune_mask(rng.random((n_in, n_out)), pattern))
  count = P.core_count(pattern, n_in, n_out, alpha)
  got = np.asarray(guarded(
      lambda s, sup: P.core_select(s, pattern, count, sup), scores, support))
  assert not (got & ~support).any()
  if isinstance(pattern, P.NM):
    ref = np_nm(np.where(support, scores, -1.0), count, pattern.m)
    np.testing.assert_array_equal(
        got.reshape(-1, pattern.m, n_out).sum(1), count)
  else:
    ref = np_topk(scores, count, support)
    assert got.sum() == count
  np.testing.assert_array_equal(got, ref)
  if alpha == 0.0:
    assert not got.any()
  if alpha == 1.0:
    np.testing.assert_array_equal(got, support)


def test_eager_equals_jit(rng):
  Z = rng.standard_normal((2, 12, 8)).astype(np.float32)
  core = np.zeros((12, 8), bool)
  core[::3] = True
  f = lambda z, c: P.task_masks(z, c, P.Unstructured(0.6), 20)  # noqa
  zj, cj = jnp.asarray(Z), jnp.asarray(core)
  with jax.disable_jit():
    eager = f(zj, cj)
  jitted = jax.jit(f)(zj, cj)
  np.testing.assert_array_equal(np.asarray(eager), np.asarray(jitted))


def test_pattern_validation():
  with pytest.raises(ValueError, match="sparsity must be in"):
    P.Unstructured(1.0)
  with pytest.raises(ValueError, match="0 < N < M"):
    P.NM(4, 4)
  with pytest.raises(ValueError, match="divisible by 4"):
    P.NM(2, 4).keep(10, 3)
