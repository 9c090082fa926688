"""Exact sparsity projections with deterministic tie-breaking.

Every solver stage chooses supports through this module: plain top-k per
matrix, N:M along the input dimension, and MOSP's projections with a
frozen core (`task_masks`). Ties are always broken towards the lower flat
(row-major) index, so equal scores (common with quantised weights) give
the same mask on every run and backend.

Layout: a weight matrix is `(n_in, n_out)` (the Flax `Dense` kernel). An N:M
group is `m` consecutive inputs of one output column.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Unstructured:
  """Keep `round((1 - sparsity) * n_in * n_out)` weights per matrix."""
  sparsity: float

  def __post_init__(self) -> None:
    if not 0.0 <= self.sparsity < 1.0:
      raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")

  def keep(self, n_in: int, n_out: int) -> int:
    """Weights kept per matrix (the budget k)."""
    return int(round((1.0 - self.sparsity) * n_in * n_out))

  def unit_keep(self, n_in: int, n_out: int) -> int:
    """Weights kept per selection unit (here the whole matrix)."""
    return self.keep(n_in, n_out)

  def __str__(self) -> str:
    return f"unstructured {self.sparsity:g}"


@dataclasses.dataclass(frozen=True)
class NM:
  """Keep `n` of every `m` consecutive inputs of each output column."""
  n: int
  m: int

  def __post_init__(self) -> None:
    if not 0 < self.n < self.m:
      raise ValueError(f"N:M needs 0 < N < M, got {self.n}:{self.m}")

  @property
  def sparsity(self) -> float:
    return 1.0 - self.n / self.m

  def keep(self, n_in: int, n_out: int) -> int:
    self._check(n_in)
    return n_in // self.m * self.n * n_out

  def unit_keep(self, n_in: int, n_out: int) -> int:
    """Weights kept per group of `m` (the budget per selection unit)."""
    self._check(n_in)
    return self.n

  def _check(self, n_in: int) -> None:
    if n_in % self.m:
      raise ValueError(f"N:M {self.n}:{self.m} needs n_in divisible by "
                       f"{self.m}, got n_in={n_in}")

  def __str__(self) -> str:
    return f"{self.n}:{self.m}"


Pattern = Union[Unstructured, NM]


# Rows per uint8 partial count in `topk_mask`'s bisection (at most 255,
# the largest count a uint8 holds).
_COUNT_BLOCK = 64


def _as_bits(scores: jax.Array) -> jax.Array:
  """Order-preserving int32 view of non-negative float32 scores.

  For IEEE floats >= +0 the bit pattern, read as an int, is monotone in the
  value. -0.0 and NaN are mapped to +0 so that they rank last.
  """
  clean = jnp.where(scores > 0, scores.astype(jnp.float32), 0.0)
  return jax.lax.bitcast_convert_type(clean, jnp.int32)


def topk_mask(scores: jax.Array, k: int,
              eligible: jax.Array | None = None) -> jax.Array:
  """Mask of the `k` largest entries of `scores`, exactly `k` True.

  Args:
    scores: any shape, non-negative (negative, -0.0 and NaN rank as 0).
    k: static number of entries to keep, `0 <= k <= scores.size`.
    eligible: optional bool mask of the same shape; only eligible entries
      are chosen (caller guarantees at least `k` are eligible).

  Returns:
    bool array shaped like `scores`. Ties at the k-th value go to the lower
    flat index.

  The k-th value is found by a 31-step bisection on the int32 bit patterns
  (each step one pass over the scores) instead of a full sort, so the cost is
  linear in the number of weights. The matrix is never flattened: counts
  are sums (uint8 within blocks of rows, then int32), and the ties are
  cut in row-major order from per-row counts and the cumulative count
  along the one row where the cut falls.
  On a device mesh with the last axis (output columns) sharded, everything
  but that one row stays sharded; the sums become all-reduces of integers,
  so the mask is exact there too.
  """
  shape = scores.shape
  rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
  bits = _as_bits(scores).reshape(rows, shape[-1] if shape else 1)
  if eligible is not None:
    bits = jnp.where(eligible.reshape(bits.shape), bits, -1)
  if k <= 0:
    return jnp.zeros(shape, bool)
  if k >= bits.size:
    return (bits >= 0).reshape(shape) if eligible is not None else \
        jnp.ones(shape, bool)

  # Each pass counts in two steps [ours]: uint8 sums over blocks of at
  # most `_COUNT_BLOCK` rows (no overflow: a block holds at most that many
  # ones), then one int32 sum of the much smaller block counts. Summing
  # the bools straight into int32 made every pass memory-bound on the
  # wide type.
  # Blocks split rows only: a mesh shards the last axis. Padding rows are
  # -1, below every threshold the bisection tries (mid >= 0).
  block = min(_COUNT_BLOCK, rows)
  blocks = jnp.pad(bits, ((0, -rows % block), (0, 0)),
                   constant_values=-1).reshape(-1, block, bits.shape[1])

  def count_at_least(t: jax.Array) -> jax.Array:
    per_block = jnp.sum(blocks >= t, axis=1, dtype=jnp.uint8)
    return jnp.sum(per_block, dtype=jnp.int32)

  # Largest t with count(bits >= t) >= k is the k-th largest bit pattern.
  def body(_: jax.Array, lo_hi: tuple[jax.Array, jax.Array]
           ) -> tuple[jax.Array, jax.Array]:
    lo, hi = lo_hi
    mid = lo + (hi - lo + 1) // 2
    ok = count_at_least(mid) >= k
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

  lo, _ = jax.lax.fori_loop(0, 32, body,
                            (jnp.int32(0), jnp.int32(0x7F800000)))
  mask = (bits > lo) | _first_ties(bits == lo, k - jnp.sum(bits > lo))
  return mask.reshape(shape)


def _first_ties(ties: jax.Array, room: jax.Array) -> jax.Array:
  """The first `room` True entries of `ties (rows, cols)` in row-major
  order (the flat `cumsum(ties) <= room` without flattening)."""
  per_row = jnp.sum(ties, axis=1, dtype=jnp.int32)
  before = jnp.cumsum(per_row) - per_row        # ties in earlier rows
  # The row where the cut falls: the last row whose earlier ties fit.
  cut = jnp.sum(before < room) - 1
  row = jnp.arange(ties.shape[0])[:, None]
  in_cut_row = jnp.cumsum(jax.lax.dynamic_index_in_dim(
      ties, jnp.maximum(cut, 0), axis=0, keepdims=False), dtype=jnp.int32)
  take_cut = in_cut_row[None, :] <= room - before[jnp.maximum(cut, 0)]
  return ties & ((row < cut) | ((row == cut) & take_cut))


def nm_mask(scores: jax.Array, n: int, m: int,
            eligible: jax.Array | None = None) -> jax.Array:
  """Keeps the `n` largest of every `m` consecutive rows, per column.

  Args:
    scores: `(n_in, n_out)`, non-negative; `n_in % m == 0`.
    n, m: static; `n` kept per group (may be 0 or m).
    eligible: optional bool `(n_in, n_out)`; only eligible entries are kept
      (caller guarantees at least `n` eligible per group).

  Returns:
    bool `(n_in, n_out)`; ties go to the lower input index.
  """
  n_in, n_out = scores.shape
  s = _as_bits(scores)
  if eligible is not None:
    s = jnp.where(eligible, s, -1)
  g = s.reshape(n_in // m, m, n_out)
  a = g[:, :, None, :]  # candidate j
  b = g[:, None, :, :]  # competitor l
  idx = jnp.arange(m)
  before = (idx[None, :] < idx[:, None])[None, :, :, None]  # l < j
  beats = (b > a) | ((b == a) & before)
  rank = jnp.sum(beats, axis=2)
  keep = rank < n
  if eligible is not None:
    keep = keep & (g >= 0)
  return keep.reshape(n_in, n_out)


def select(scores: jax.Array, pattern: Pattern, count: int,
           eligible: jax.Array | None = None) -> jax.Array:
  """Top-`count` per selection unit of `pattern` (matrix, or N:M group)."""
  if isinstance(pattern, NM):
    return nm_mask(scores, count, pattern.m, eligible)
  return topk_mask(scores, count, eligible)


def prune_mask(scores: jax.Array, pattern: Pattern) -> jax.Array:
  """The support a single-objective pruner keeps: `pattern`'s full budget."""
  n_in, n_out = scores.shape
  return select(scores, pattern, pattern.unit_keep(n_in, n_out))


def core_select(scores: jax.Array, pattern: Pattern, count: int,
                support: jax.Array) -> jax.Array:
  """MOSP's core inside a support: the top `count` of `scores` per
  selection unit of `pattern`, among the entries of `support`.

  Args:
    scores: `(n_in, n_out)`, non-negative.
    pattern: the budget per matrix or per N:M group.
    count: static, the core's size per unit (`core_count`).
    support: `(n_in, n_out)` bool, the unit's whole budget (`prune_mask`).

  Returns:
    bool `(n_in, n_out)`: empty for `count <= 0`, `support` itself when
    `count` is the whole budget (no selection is run in either case).
  """
  n_in, n_out = scores.shape
  if count <= 0:
    return jnp.zeros(scores.shape, bool)
  if count >= pattern.unit_keep(n_in, n_out):
    return support
  return select(scores, pattern, count, support)


def core_count(pattern: Pattern, n_in: int, n_out: int, alpha: float) -> int:
  """Size of the shared core per selection unit: `floor(alpha * budget)`."""
  return int(math.floor(alpha * pattern.unit_keep(n_in, n_out)))


def task_masks(Z: jax.Array, core: jax.Array | np.ndarray, pattern: Pattern,
               count: int) -> jax.Array:
  """The support outside a frozen core: top-`count` of `|Z_i|` per unit.

  `P_{k,S_c}` of MOSP's stage 2 and preference models keeps `core` plus
  this [paper-summary]. Args: `Z: (c, n_in, n_out)` (tasks or
  preferences), `core: (n_in, n_out)` bool, `count` per selection unit.
  Returns bool `(c, n_in, n_out)`, disjoint from `core`.
  """
  outside = jnp.logical_not(core)
  # |z| ranks like z^2 and skips a multiply.
  return jax.vmap(lambda z: select(jnp.abs(z), pattern, count, outside))(Z)
