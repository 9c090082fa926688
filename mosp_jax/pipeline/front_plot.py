"""The figure of a Pareto set: fronts in log space, one panel per task pair."""

from __future__ import annotations

import itertools
import math
import os
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
  from matplotlib.axes import Axes
  from matplotlib.axis import Axis
  from matplotlib.transforms import Bbox


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


def _overlap(a: Bbox, b: Bbox) -> float:
  w = min(a.x1, b.x1) - max(a.x0, b.x0)
  h = min(a.y1, b.y1) - max(a.y0, b.y0)
  return max(w, 0.0) * max(h, 0.0)


def _staircase(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """`(2n - 1, 2)` vertices of the steps-post line through `(x, y)`."""
  pts = [(x[0], y[0])]
  for i in range(1, len(x)):
    pts += [(x[i], y[i - 1]), (x[i], y[i])]
  return np.asarray(pts, np.float64)


def _place_labels(ax: Any, xy: np.ndarray, texts: list[str],
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
    assert best is not None  # _LABEL_SPOTS is not empty.
    taken.append(best[2])


def _style_axis(axis: Axis) -> None:
  """Plain tick labels (no offset or scientific notation), at most 5."""
  from matplotlib.ticker import MaxNLocator, ScalarFormatter

  axis.set_major_locator(MaxNLocator(nbins=5))
  fmt = ScalarFormatter(useOffset=False)
  fmt.set_scientific(False)
  axis.set_major_formatter(fmt)


def merge_identical(points: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Entries whose point sets are equal (same shape and values), drawn
  once under their names joined by ' = ', in first-seen order [ours].

  A comparison often holds one model under several names (ALPS-concat is
  MOSP's global model `W`, bit for bit); drawn apart, the later marker
  hides the earlier one and the legend names a colour no point shows.
  """
  groups: list[tuple[list[str], np.ndarray]] = []
  for name, pts in points.items():
    pts = np.asarray(pts)
    same = next((names for names, v in groups
                 if v.shape == pts.shape and np.array_equal(v, pts)), None)
    if same is None:
      groups.append(([name], pts))
    else:
      same.append(name)
  return {" = ".join(names): pts for names, pts in groups}


def _log_points(ppl: np.ndarray, extra: dict[str, np.ndarray] | None,
                m: int) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """`{method: (n, m) log values}` with MOSP first, and each one's colour
  (C3 is MOSP's)."""
  methods = {"MOSP": np.log(np.asarray(ppl, np.float64)).reshape(-1, m)}
  for name, pts in merge_identical(extra or {}).items():
    methods[name] = np.log(np.asarray(pts, np.float64)).reshape(-1, m)
  colors = {"MOSP": "C3"}
  for j, name in enumerate(n for n in methods if n != "MOSP"):
    colors[name] = f"C{j if j < 3 else j + 1}"
  return methods, colors


def _dot_panel(ax: Axes, methods: dict[str, np.ndarray], colors: dict[str, str],
               dense: np.ndarray | None, task: str, metric: str) -> None:
  """One task: no trade-off, so no front; each method's values on a row."""
  rows = list(methods.items())
  for k, (name, v) in enumerate(rows):
    ax.scatter(v[:, 0], np.full(len(v), k), s=30, c=colors[name],
               label=name, zorder=3)
  if dense is not None:
    ax.scatter(dense, [len(rows)], marker="*", s=140, facecolors="none",
               edgecolors="k", label="dense", zorder=3)
  names = [n for n, _ in rows] + (["dense"] if dense is not None else [])
  ax.set_yticks(range(len(names)), names)
  ax.set_ylim(-0.7, len(names) - 0.3)
  ax.grid(alpha=0.3, axis="x")
  ax.set_xlabel(f"log {metric} {task}")
  ax.set_title("one task: no Pareto front to draw", fontsize=10)
  _style_axis(ax.xaxis)


def _pair_panel(ax: Axes, a: int, b: int, methods: dict[str, np.ndarray],
                colors: dict[str, str], dense: np.ndarray | None,
                tasks: list[str], metric: str) -> list[np.ndarray]:
  """Tasks `a` against `b`: every method's points and front staircase,
  the dense star; returns the staircases drawn (label obstacles)."""
  fronts = []
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
      fronts.append(line)
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
  return fronts


def _label_preferences(axes: np.ndarray, pairs: list[tuple[int, int]],
                       methods: dict[str, np.ndarray],
                       dense: np.ndarray | None, prefs: np.ndarray,
                       fronts: dict[tuple[int, int], Any]) -> None:
  """Labels MOSP's points with their preferences in every pair's panel,
  avoiding every drawn point (`methods`' `(Q, m)` log values and the dense
  `(m,)`); the axis limits are frozen first."""
  everything = np.concatenate(list(methods.values()))
  if dense is not None:
    everything = np.concatenate([everything, dense[None]])
  for ax, (a, b) in zip(axes.ravel(), pairs, strict=False):
    ax.set_xlim(ax.get_xlim())
    ax.set_ylim(ax.get_ylim())
    _place_labels(ax, methods["MOSP"][:, [a, b]],
                  [_pref_label(p) for p in prefs], everything[:, [a, b]],
                  fronts[(a, b)])


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
    extra: other methods' points `{name: (Q, m) values}` (baselines);
      entries with equal points are drawn once (`merge_identical`).
    metric: what the values are (axis labels say `log <metric>`).
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  m = len(tasks)
  methods, colors = _log_points(ppl, extra, m)
  dense = (None if dense_ppl is None
           else np.log(np.asarray(dense_ppl, np.float64)).reshape(m))
  pairs = list(itertools.combinations(range(m), 2))
  cols = max(1, min(3, len(pairs)))
  rows = max(1, math.ceil(len(pairs) / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 4.0 * rows + 0.4),
                           squeeze=False)
  if not pairs:
    _dot_panel(axes[0, 0], methods, colors, dense, tasks[0], metric)
  fronts = {(a, b): _pair_panel(ax, a, b, methods, colors, dense, tasks,
                                metric)
            for ax, (a, b) in zip(axes.ravel(), pairs, strict=False)}
  for ax in axes.ravel()[max(len(pairs), 1):]:
    ax.axis("off")
  handles, labels = axes[0, 0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6),
             fontsize=8, frameon=False)
  if title:
    fig.suptitle(title)
  fig.tight_layout(rect=(0, 0.4 / (4.0 * rows + 0.4), 1, 1))
  fig.canvas.draw()  # Fixes the layout the labels are placed in.
  _label_preferences(axes, pairs, methods, dense, prefs, fronts)
  tmp = f"{path}.tmp.png"
  fig.savefig(tmp, dpi=130)
  plt.close(fig)
  os.replace(tmp, path)
