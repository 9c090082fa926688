"""Preference sets: simplex grids, the centroid, vertices, checks, labels.

A preference `lam (m,)` weights the m tasks (non-negative, summing to 1);
a set of them is `(P, m)` float32.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

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
  if not np.isfinite(prefs).all():
    raise ValueError(f"{flag}: preference weights must be finite numbers, "
                     f"got {prefs[~np.isfinite(prefs).all(axis=1)].tolist()}")
  if (prefs < 0).any():
    raise ValueError(f"{flag}: preference weights must be >= 0, got "
                     f"{prefs[(prefs < 0).any(axis=1)].tolist()}")
  sums = prefs.sum(axis=1)
  bad = np.abs(sums - 1.0) > 1e-4
  if bad.any():
    raise ValueError(f"{flag}: each preference must sum to 1, got sums "
                     f"{sums[bad].tolist()}")


def format_pref(pref: np.ndarray | Sequence[float], sep: str = ", "
                ) -> str:
  """A preference `(m,)` as short numbers: `0.333, 0.333, 0.333`."""
  return sep.join(f"{float(x):.3g}" for x in np.asarray(pref).reshape(-1))
