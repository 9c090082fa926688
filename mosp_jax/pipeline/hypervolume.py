"""Front metrics: exact hypervolume, Pareto dominance, reference points.

Points are `(n, d)` objective values to minimise (log perplexities here).
"""

from __future__ import annotations

import numpy as np


def _hv(pts: np.ndarray, ref: np.ndarray) -> float:
  """Hypervolume of points that all lie strictly below `ref`."""
  if pts.shape[0] == 0:
    return 0.0
  if pts.shape[1] == 1:
    return float(ref[0] - pts[:, 0].min())
  pts = pts[np.argsort(pts[:, -1], kind="stable")]
  tops = np.append(pts[1:, -1], ref[-1])
  vol = 0.0
  for i in range(pts.shape[0]):
    depth = tops[i] - pts[i, -1]
    if depth > 0:
      vol += depth * _hv(pts[:i + 1, :-1], ref[:-1])
  return vol


def hypervolume(points: np.ndarray, ref: np.ndarray) -> float:
  """Exact hypervolume dominated by `points` and bounded by `ref`.

  Minimisation: the measure of `{x : x <= ref, x >= p for some point p}`.
  Points with any coordinate at or beyond `ref` add nothing. Computed by
  slicing along the last objective (HSO, While et al. 2006): sort by it,
  and between consecutive values multiply the slab depth by the
  `(d-1)`-dimensional hypervolume of the points below; `O(n^d)`, exact
  and fast for the few objectives and tens of points of a front.

  Args:
    points: `(n, d)`; ref: `(d,)`.
  """
  pts = np.asarray(points, np.float64)
  ref = np.asarray(ref, np.float64).reshape(-1)
  pts = pts.reshape(-1, ref.size)
  if not np.isfinite(ref).all():
    raise ValueError(f"reference point must be finite, got {ref}")
  pts = pts[np.all(pts < ref[None], axis=1)]
  return _hv(pts, ref)


def dominates(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """`(n, q)` bool: point `a[i]` Pareto-dominates `b[j]` (minimisation:
  no worse in every objective, better in one)."""
  a = np.asarray(a, np.float64)[:, None, :]
  b = np.asarray(b, np.float64)[None, :, :]
  return np.all(a <= b, axis=-1) & np.any(a < b, axis=-1)


def dominated_count(front: np.ndarray, others: np.ndarray) -> int:
  """How many rows of `others (q, d)` some row of `front (n, d)`
  dominates."""
  return int(np.sum(np.any(dominates(front, others), axis=0)))


def reference_point(point_sets: list[np.ndarray], *,
                    margin: float = float(np.log(1.1))) -> np.ndarray:
  """One shared reference: the worst value of each objective over every
  point of every set, plus `margin` (in log space, 10% worse), so every
  evaluated point contributes."""
  allpts = np.concatenate([np.asarray(p, np.float64).reshape(
      -1, np.shape(point_sets[0])[-1]) for p in point_sets])
  return allpts.max(axis=0) + margin
