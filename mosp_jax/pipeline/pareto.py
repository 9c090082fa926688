"""Preference sets, front metrics (hypervolume, dominance) and the plot."""

from __future__ import annotations

import itertools
import math
import os

import numpy as np


def simplex_grid(m: int, steps: int) -> np.ndarray:
  """All preferences with coordinates in {0, 1/steps, ..., 1}, vertices first.

  Returns `(K, m)` float32, rows summing to 1; `steps = 1` gives the
  vertices only.
  """
  if m < 1 or steps < 1:
    raise ValueError(f"need m >= 1 and steps >= 1, got m={m}, "
                     f"steps={steps}")
  pts = [c for c in itertools.product(range(steps + 1), repeat=m)
         if sum(c) == steps]
  pts.sort(key=lambda c: (-max(c), [-x for x in c]))
  return np.asarray(pts, np.float32) / steps


def with_centroid(prefs: np.ndarray) -> np.ndarray:
  m = prefs.shape[1]
  centroid = np.full((1, m), 1.0 / m, np.float32)
  if np.any(np.all(np.isclose(prefs, centroid), axis=1)):
    return prefs
  return np.concatenate([prefs, centroid])


def ensure_vertices(prefs: np.ndarray) -> np.ndarray:
  """Prepends the missing vertices `e_i` (each task's stream needs it)."""
  m = prefs.shape[1]
  eye = np.eye(m, dtype=np.float32)
  missing = [e for e in eye
             if not np.any(np.all(np.isclose(prefs, e), axis=1))]
  return np.concatenate([np.asarray(missing, np.float32).reshape(-1, m),
                         prefs.astype(np.float32)])


def check_prefs(prefs: np.ndarray, m: int, *, flag: str = "--prefs") -> None:
  """Raises ValueError naming `flag` unless `prefs` is `(K, m)` on the
  simplex."""
  if prefs.ndim != 2 or prefs.shape[1] != m or prefs.shape[0] == 0:
    raise ValueError(f"{flag}: expected preferences of {m} weights each "
                     f"(one per task), got shape {prefs.shape}")
  if (prefs < 0).any():
    raise ValueError(f"{flag}: preference weights must be >= 0, got "
                     f"{prefs[(prefs < 0).any(axis=1)].tolist()}")
  sums = prefs.sum(axis=1)
  bad = np.abs(sums - 1.0) > 1e-4
  if bad.any():
    raise ValueError(f"{flag}: each preference must sum to 1, got sums "
                     f"{sums[bad].tolist()}")


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


def plot_fronts(path: str | os.PathLike, tasks: list[str], prefs: np.ndarray,
                ppl: np.ndarray, dense_ppl: np.ndarray | None, *,
                title: str = "", extra: dict[str, np.ndarray] | None = None,
                metric: str = "PPL") -> None:
  """log-PPL fronts, one panel per task pair; the dense model is a star.

  Args:
    path: PNG to write (atomically).
    tasks: the m task names.
    prefs: `(P, m)`; ppl: `(P, m)` the MOSP models.
    dense_ppl: `(m,)`, or None (no dense point).
    extra: other methods' points `{name: (Q, m) ppl}` (baselines).
    metric: what the values are (axis labels say `log <metric>`).
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  m = len(tasks)
  pairs = list(itertools.combinations(range(m), 2)) or [(0, 0)]
  cols = min(3, len(pairs))
  rows = math.ceil(len(pairs) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 4.2 * rows),
                           squeeze=False)
  for ax, (a, b) in zip(axes.ravel(), pairs, strict=False):
    for j, (name, pts) in enumerate((extra or {}).items()):
      ax.scatter(np.log(pts[:, a]), np.log(pts[:, b]), s=18, alpha=0.6,
                 label=name, c=f"C{j if j < 3 else j + 1}")  # C3 = MOSP
    ax.scatter(np.log(ppl[:, a]), np.log(ppl[:, b]), s=36, c="C3",
               label="MOSP", zorder=3)
    for pref, pt in zip(prefs, ppl, strict=True):
      ax.annotate(",".join(f"{x:.2g}" for x in pref),
                  (np.log(pt[a]), np.log(pt[b])), fontsize=7,
                  xytext=(3, 3), textcoords="offset points")
    if dense_ppl is not None:
      ax.scatter([np.log(dense_ppl[a])], [np.log(dense_ppl[b])],
                 marker="*", s=160, c="k", label="dense", zorder=4)
    ax.set_xlabel(f"log {metric} {tasks[a]}")
    ax.set_ylabel(f"log {metric} {tasks[b]}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  for ax in axes.ravel()[len(pairs):]:
    ax.axis("off")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  tmp = f"{path}.tmp.png"
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)
