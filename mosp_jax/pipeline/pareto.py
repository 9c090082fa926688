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


def format_pref(pref: np.ndarray, sep: str = ", ") -> str:
  """A preference `(m,)` as short numbers: `0.333, 0.333, 0.333`."""
  return sep.join(f"{float(x):.3g}" for x in np.asarray(pref).reshape(-1))


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


def front_2d(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Indices of the points `(x[i], y[i])` no other point dominates in
  these two objectives (minimisation), sorted by `x`."""
  order = np.lexsort((y, x))
  keep, best = [], np.inf
  for i in order:
    if y[i] < best:
      keep.append(i)
      best = y[i]
  return np.asarray(keep, np.int64)


def _pref_label(pref: np.ndarray) -> str:
  """A compact point label: '1,0,0', '.5,.5,0', '.33,.33,.33'."""
  short = (f"{float(x):.2g}" for x in pref)
  return ",".join(x[1:] if x.startswith("0.") else x for x in short)


# Where a point's label may go, in points from the point (tried in order,
# nearest ring first): (dx, dy, horizontal, vertical alignment).
_LABEL_SPOTS = [(dx * r, dy * r, ha, va) for r in (1.0, 2.6)
                for dx, dy, ha, va in (
                    (4, 3, "left", "bottom"), (4, -3, "left", "top"),
                    (-4, 3, "right", "bottom"), (-4, -3, "right", "top"),
                    (0, 6, "center", "bottom"), (0, -6, "center", "top"),
                    (6, 0, "left", "center"), (-6, 0, "right", "center"))]


def _overlap(a, b) -> float:
  w = min(a.x1, b.x1) - max(a.x0, b.x0)
  h = min(a.y1, b.y1) - max(a.y0, b.y0)
  return max(w, 0.0) * max(h, 0.0)


def _staircase(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """`(2n - 1, 2)` vertices of the steps-post line through `(x, y)`."""
  pts = [(x[0], y[0])]
  for i in range(1, len(x)):
    pts += [(x[i], y[i - 1]), (x[i], y[i])]
  return np.asarray(pts, np.float64)


def _place_labels(ax, xy: np.ndarray, texts: list[str],
                  obstacles: np.ndarray, lines: list[np.ndarray]) -> None:
  """Labels each point `xy (n, 2)` (data coordinates) at the first spot of
  `_LABEL_SPOTS` where it overlaps no placed label, no marker of
  `obstacles (k, 2)`, no segment of the polylines `lines` and stays
  inside the axes (else the least overlapping spot, with a leader
  line)."""
  from matplotlib.text import Text
  from matplotlib.transforms import Bbox

  fig = ax.figure
  renderer = fig.canvas.get_renderer()
  frame = ax.get_window_extent(renderer)
  r = 5.0 * fig.dpi / 72.0  # Marker half-size in pixels.
  taken = [Bbox.from_extents(px - r, py - r, px + r, py + r)
           for px, py in ax.transData.transform(obstacles)]
  for line in lines:  # Thin boxes along every segment.
    pix = ax.transData.transform(line)
    for p, q in zip(pix[:-1], pix[1:], strict=True):
      for t in np.linspace(0.0, 1.0, 16):
        cx, cy = p + t * (q - p)
        taken.append(Bbox.from_extents(cx - 1.5, cy - 1.5, cx + 1.5,
                                       cy + 1.5))
  for (x, y), text in zip(xy, texts, strict=True):
    best = None
    for dx, dy, ha, va in _LABEL_SPOTS:
      leader = (dict(arrowstyle="-", lw=0.5, color="0.45", shrinkA=0,
                     shrinkB=3) if max(abs(dx), abs(dy)) > 8 else None)
      t = ax.annotate(text, (x, y), xytext=(dx, dy),
                      textcoords="offset points", ha=ha, va=va, fontsize=7,
                      arrowprops=leader, zorder=5)
      t.update_positions(renderer)  # Where the offset puts the text.
      box = Text.get_window_extent(t, renderer).expanded(1.04, 1.08)
      inside = (box.x0 >= frame.x0 and box.x1 <= frame.x1
                and box.y0 >= frame.y0 and box.y1 <= frame.y1)
      cost = sum(_overlap(box, o) for o in taken) + (0 if inside else 1e6)
      if best is None or cost < best[0]:
        if best is not None:
          best[1].remove()
        best = (cost, t, box)
      else:
        t.remove()
      if cost == 0:
        break
    taken.append(best[2])


def _style_axis(axis) -> None:
  """Plain tick labels (no offset or scientific notation), at most 5."""
  from matplotlib.ticker import MaxNLocator, ScalarFormatter

  axis.set_major_locator(MaxNLocator(nbins=5))
  fmt = ScalarFormatter(useOffset=False)
  fmt.set_scientific(False)
  axis.set_major_formatter(fmt)


def plot_fronts(path: str | os.PathLike, tasks: list[str], prefs: np.ndarray,
                ppl: np.ndarray, dense_ppl: np.ndarray | None, *,
                title: str = "", extra: dict[str, np.ndarray] | None = None,
                metric: str = "PPL") -> None:
  """Fronts in log space, one panel per task pair, for a paper.

  Each method's points and its front in that pair (the points no other
  point of the method beats on both tasks, as a staircase); MOSP's points
  are labelled with their preference, placed so labels do not collide;
  the dense model is a hollow star drawn under the models. A single task
  has no front: the figure says so and shows the values on one axis.

  Args:
    path: PNG to write (atomically).
    tasks: the m task names.
    prefs: `(P, m)`; ppl: `(P, m)` the MOSP models.
    dense_ppl: `(m,)`, or None (no dense point).
    extra: other methods' points `{name: (Q, m) values}` (baselines).
    metric: what the values are (axis labels say `log <metric>`).
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  m = len(tasks)
  methods = {"MOSP": np.log(np.asarray(ppl, np.float64)).reshape(-1, m)}
  for name, pts in (extra or {}).items():
    methods[name] = np.log(np.asarray(pts, np.float64)).reshape(-1, m)
  colors = {"MOSP": "C3"}
  for j, name in enumerate(n for n in methods if n != "MOSP"):
    colors[name] = f"C{j if j < 3 else j + 1}"  # C3 is MOSP's.
  dense = (None if dense_ppl is None
           else np.log(np.asarray(dense_ppl, np.float64)).reshape(m))
  pairs = list(itertools.combinations(range(m), 2))
  cols = max(1, min(3, len(pairs)))
  rows = max(1, math.ceil(len(pairs) / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 4.0 * rows + 0.4),
                           squeeze=False)
  if not pairs:  # One task: no trade-off, so no front; a dot plot.
    ax = axes[0, 0]
    rows_ = list(methods.items())
    for k, (name, v) in enumerate(rows_):
      ax.scatter(v[:, 0], np.full(len(v), k), s=30, c=colors[name],
                 label=name, zorder=3)
    if dense is not None:
      ax.scatter(dense, [len(rows_)], marker="*", s=140, facecolors="none",
                 edgecolors="k", label="dense", zorder=3)
    names = [n for n, _ in rows_] + (["dense"] if dense is not None else [])
    ax.set_yticks(range(len(names)), names)
    ax.set_ylim(-0.7, len(names) - 0.3)
    ax.grid(alpha=0.3, axis="x")
    ax.set_xlabel(f"log {metric} {tasks[0]}")
    ax.set_title("one task: no Pareto front to draw", fontsize=10)
    _style_axis(ax.xaxis)
  fronts: dict[tuple[int, int], list[np.ndarray]] = {}
  for ax, (a, b) in zip(axes.ravel(), pairs, strict=False):
    for name, v in methods.items():
      mosp = name == "MOSP"
      ax.scatter(v[:, a], v[:, b], s=34 if mosp else 20, c=colors[name],
                 alpha=1.0 if mosp else 0.75, label=name,
                 zorder=4 if mosp else 3, edgecolors="none")
      if len(v) > 1:
        f = front_2d(v[:, a], v[:, b])
        line = _staircase(v[f, a], v[f, b])
        ax.plot(line[:, 0], line[:, 1], c=colors[name],
                lw=1.6 if mosp else 1.0, alpha=0.9, zorder=2)
        fronts.setdefault((a, b), []).append(line)
    if dense is not None:
      ax.scatter([dense[a]], [dense[b]], marker="*", s=140,
                 facecolors="none", edgecolors="k", linewidths=1.0,
                 label="dense", zorder=1)
    ax.set_xlabel(f"log {metric} {tasks[a]}")
    ax.set_ylabel(f"log {metric} {tasks[b]}")
    ax.grid(alpha=0.3)
    ax.margins(0.15)
    _style_axis(ax.xaxis)
    _style_axis(ax.yaxis)
  for ax in axes.ravel()[max(len(pairs), 1):]:
    ax.axis("off")
  handles, labels = axes[0, 0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6),
             fontsize=8, frameon=False)
  if title:
    fig.suptitle(title)
  fig.tight_layout(rect=(0, 0.4 / (4.0 * rows + 0.4), 1, 1))
  fig.canvas.draw()  # Fixes the layout the labels are placed in.
  everything = np.concatenate(list(methods.values()))
  if dense is not None:
    everything = np.concatenate([everything, dense[None]])
  for ax, (a, b) in zip(axes.ravel(), pairs, strict=False):
    ax.set_xlim(ax.get_xlim())
    ax.set_ylim(ax.get_ylim())
    _place_labels(ax, methods["MOSP"][:, [a, b]],
                  [_pref_label(p) for p in prefs], everything[:, [a, b]],
                  fronts.get((a, b), []))
  tmp = f"{path}.tmp.png"
  fig.savefig(tmp, dpi=130)
  plt.close(fig)
  os.replace(tmp, path)
