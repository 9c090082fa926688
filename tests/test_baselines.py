"""Baselines against independent references and hand-computed kept sets."""

import functools

import numpy as np
import pytest

from mosp_jax.baselines import (
  column_keep,
  magnitude_prune,
  prune_single,
  sparsegpt_prune,
  wanda_prune,
)
from mosp_jax.pipeline import hypervolume
from mosp_jax.solvers import NM, Unstructured, mixed_gram
from tests.conftest import correlated_gram, guarded, rel_err


def sparsegpt_reference(G, W0, *, sparsity=None, nm=None, blocksize,
                        damping=0.01):
  """A direct float64 transcription of IST-DASLab/sparsegpt `fasterprune`
  in its own `(n_out, n_in)` layout, with every OBS update applied at once
  to all later columns (no lazy batching) and an exact kept count per
  block (ties to the lower index of the `(n_in, n_out)` layout)."""
  W = np.asarray(W0, np.float64).T.copy()        # (rows=out, cols=in)
  H = np.asarray(G, np.float64).copy()
  dead = np.diag(H) == 0
  H[dead, dead] = 1.0
  W[:, dead] = 0.0
  H += damping * np.mean(np.diag(H)) * np.eye(H.shape[0])
  U = np.linalg.cholesky(np.linalg.inv(H)).T      # upper, U^T U = H^-1
  rows, cols = W.shape
  keep = np.zeros_like(W, bool)
  for i1 in range(0, cols, blocksize):
    i2 = min(i1 + blocksize, cols)
    if sparsity is not None:
      score = (W[:, i1:i2] ** 2 / np.diag(U)[i1:i2] ** 2).T  # (in, out)
      k = int(round((1 - sparsity) * score.size))
      order = np.lexsort((np.arange(score.size), -score.ravel()))
      blk = np.zeros(score.size, bool)
      blk[order[:k]] = True
      keep[:, i1:i2] = blk.reshape(score.shape).T
    for i in range(i1, i2):
      if nm is not None and (i - i1) % nm[1] == 0:
        score = W[:, i:i + nm[1]] ** 2 / np.diag(U)[i:i + nm[1]] ** 2
        top = np.argsort(-score, axis=1, kind="stable")[:, :nm[0]]
        np.put_along_axis(keep[:, i:i + nm[1]], top, True, axis=1)
      w = W[:, i].copy()
      q = np.where(keep[:, i], w, 0.0)
      err = (w - q) / U[i, i]
      W[:, i:] -= np.outer(err, U[i, i:])
      W[:, i] = q
  return W.T, keep.T


@pytest.mark.parametrize("pattern,blocksize", [
    (Unstructured(0.5), 8),   # 24 inputs: three full blocks
    (Unstructured(0.7), 10),  # two full blocks and a remainder of 4
    (NM(2, 4), 8),
    (NM(1, 4), 12),           # remainder block of 12 = 3 groups
])
def test_sparsegpt_matches_numpy_obs(rng, pattern, blocksize):
  n_in, n_out = 24, 6
  G = correlated_gram(rng, n_in)
  G[5, :] = G[:, 5] = 0.0   # a dead input
  W0 = rng.standard_normal((n_in, n_out)).astype(np.float32)
  W, mask = guarded(sparsegpt_prune, G, W0, pattern=pattern,
                    blocksize=blocksize, jit=False)
  kw = ({"sparsity": pattern.sparsity} if isinstance(pattern, Unstructured)
        else {"nm": (pattern.n, pattern.m)})
  W_ref, keep_ref = sparsegpt_reference(G, W0, blocksize=blocksize, **kw)
  np.testing.assert_array_equal(mask, keep_ref)
  np.testing.assert_allclose(W, W_ref, rtol=2e-4, atol=2e-5)
  assert np.all(W[~mask] == 0)
  assert mask.sum() == pattern.keep(n_in, n_out)
  assert np.all(W[5] == 0)  # the dead input is gone


def test_sparsegpt_zero_sparsity_is_identity_and_beats_wanda(rng):
  G = correlated_gram(rng, 32)
  W0 = rng.standard_normal((32, 8)).astype(np.float32)
  W, mask = guarded(sparsegpt_prune, G, W0, pattern=Unstructured(0.0),
                    blocksize=16, jit=False)
  assert mask.all()
  np.testing.assert_allclose(W, W0, rtol=1e-5, atol=1e-6)
  # The OBS update lowers the error of its own support's plain zeroing.
  W5, m5 = guarded(sparsegpt_prune, G, W0, pattern=Unstructured(0.5),
                   jit=False)
  assert rel_err(G, W0, W5) < rel_err(G, W0, np.where(m5, W0, 0.0))


def test_sparsegpt_rejects_bad_blocksize():
  with pytest.raises(ValueError, match="multiple of the N:M group"):
    sparsegpt_prune(np.eye(8, dtype=np.float32),
                    np.ones((8, 2), np.float32), pattern=NM(2, 4),
                    blocksize=6)


def test_magnitude_keeps_exactly_the_largest():
  W0 = np.array([[0.1, -4.0],
                 [-3.0, 0.2],
                 [2.0, 2.0],
                 [0.5, -2.0]], np.float32)  # three 2s for two places
  W, mask = guarded(magnitude_prune, W0, pattern=Unstructured(0.5),
                    jit=False)
  # 4 and 3, then the two 2s of lowest flat index (4, 5; not 7).
  expected = np.array([[0, 1], [1, 0], [1, 1], [0, 0]], bool)
  np.testing.assert_array_equal(mask, expected)
  np.testing.assert_array_equal(W, np.where(expected, W0, 0))
  _, mask = guarded(magnitude_prune, W0, pattern=NM(1, 2), jit=False)
  # Groups of rows (0, 1) and (2, 3); the tie 2 vs 2 goes to row 2.
  np.testing.assert_array_equal(
      mask, np.array([[0, 1], [1, 0], [1, 1], [0, 0]], bool))


def test_wanda_keeps_exactly_the_expected_weights():
  # ||x_j|| = sqrt(G_jj) = (1, 2, 0, 3): input 2 never fires.
  G = np.diag([1.0, 4.0, 0.0, 9.0]).astype(np.float32)
  G[0, 1] = G[1, 0] = 0.5  # off-diagonals do not matter
  W0 = np.array([[3.0, -1.0],   # scores  3, 1
                 [-1.0, 0.5],   #         2, 1   (tie with row 0, col 1)
                 [9.0, 9.0],    #         0, 0   (large but dead)
                 [0.5, 0.2]],   #       1.5, 0.6
                np.float32)
  W, mask = guarded(wanda_prune, G, W0, pattern=Unstructured(0.5),
                    jit=False)
  # Per output column, the top 2 of 4.
  expected = np.array([[1, 1], [1, 1], [0, 0], [0, 0]], bool)
  np.testing.assert_array_equal(mask, expected)
  np.testing.assert_array_equal(W, np.where(expected, W0, 0))
  _, mask = guarded(wanda_prune, G, W0, pattern=NM(1, 2), jit=False)
  np.testing.assert_array_equal(
      mask, np.array([[1, 1], [0, 0], [0, 0], [1, 1]], bool))
  # One per column: column 1 may not borrow column 0's second place (2
  # beats every score of column 1), and its tie 1 vs 1 goes to row 0.
  _, mask = guarded(wanda_prune, G, W0, pattern=Unstructured(0.75),
                    jit=False)
  np.testing.assert_array_equal(
      mask, np.array([[1, 1], [0, 0], [0, 0], [0, 0]], bool))
  assert column_keep(Unstructured(0.7), 576) == 173


def test_mixed_gram_weights_tasks_by_energy(rng):
  grams = np.stack([correlated_gram(rng, 12) for _ in range(3)])
  W0 = rng.standard_normal((12, 5)).astype(np.float32)
  lam = np.array([0.2, 0.0, 0.8], np.float32)
  H = guarded(mixed_gram, grams, W0, lam)
  W = np.where(rng.random(W0.shape) < 0.5, W0, 0.0)
  want = sum(lam[i] * rel_err(grams[i], W0, W) for i in range(3))
  E = W - W0
  assert np.sum(E * (H @ E)) == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("method", ["alps", "sparsegpt", "wanda",
                                    "magnitude"])
def test_every_method_meets_the_budget(rng, method):
  G = correlated_gram(rng, 32)
  W0 = rng.standard_normal((32, 8)).astype(np.float32)
  for pattern in (Unstructured(0.5), NM(2, 4)):
    W = guarded(functools.partial(prune_single, method), G, W0,
                pattern=pattern, jit=False)
    assert np.count_nonzero(W) == pattern.keep(32, 8), (method, pattern)
    if isinstance(pattern, NM):
      assert (np.count_nonzero(W.reshape(8, 4, 8), axis=1) == 2).all()


def test_hypervolume_2d_by_hand():
  pts = np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]])
  # Staircase under (4, 4): slabs of width 1 and heights 1, 2, 3.
  assert hypervolume.hypervolume(pts, [4.0, 4.0]) == pytest.approx(6.0)
  # Dominated, duplicate and out-of-reference points add nothing.
  more = np.concatenate([pts, [[2.5, 2.5], [2.0, 2.0], [0.5, 5.0]]])
  assert hypervolume.hypervolume(more, [4.0, 4.0]) == pytest.approx(6.0)
  assert hypervolume.hypervolume(pts[:1], [4.0, 4.0]) == pytest.approx(3.0)
  assert hypervolume.hypervolume(np.zeros((0, 2)), [1.0, 1.0]) == 0.0


def test_hypervolume_3d_by_hand():
  assert hypervolume.hypervolume([[0, 0, 0]], [1, 2, 3]) == pytest.approx(6.0)
  # Boxes of 2*2*1 = 4 and 1*1*2 = 2 overlapping in [1,2]^3 (volume 1).
  pts = [[0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]
  assert hypervolume.hypervolume(pts, [2, 2, 2]) == pytest.approx(5.0)
  # Boxes 1*2*2 = 4 each, pairwise overlaps 1*1*2 = 2, triple 1:
  # 3*4 - 3*2 + 1 = 7.
  pts = [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
  assert hypervolume.hypervolume(pts, [2, 2, 2]) == pytest.approx(7.0)


def test_hypervolume_matches_inclusion_exclusion(rng):
  import itertools
  pts = rng.random((6, 3))
  ref = np.ones(3)
  want = 0.0
  for r in range(1, 7):
    for sub in itertools.combinations(range(6), r):
      corner = pts[list(sub)].max(axis=0)
      want += (-1) ** (r + 1) * np.prod(ref - corner)
  assert hypervolume.hypervolume(pts, ref) == pytest.approx(want)


def test_dominated_count():
  front = np.array([[1.0, 2.0], [2.0, 1.0]])
  others = np.array([[1.0, 2.0],    # equal: not dominated
                     [1.5, 2.0],    # dominated by [1, 2]
                     [3.0, 3.0],    # dominated by both
                     [0.5, 5.0]])   # not dominated
  assert hypervolume.dominated_count(front, others) == 2
  assert hypervolume.dominated_count(others, front) == 0
