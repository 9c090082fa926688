"""SparseGPT: blocked OBS pruning with lazy batch updates.

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot", ICML 2023 (IST-DASLab/sparsegpt, `fasterprune`).
Transposed to the `(n_in, n_out)` layout: the original walks the input
columns of a `(n_out, n_in)` matrix; here it walks the input rows.

  H = damp(G)                 (0.01 * mean diag, as every solver here)
  U = chol(H^-1)^T            upper triangular, U^T U = H^-1
  for each block of `blocksize` inputs, in order:
    choose the block's mask from the current weights and U's diagonal:
      unstructured: the block's top round((1-s) * size * n_out) of
        w^2 / U_jj^2, over all outputs of the block at once (the
        original's quantile per block);
      N:M: at the first input of each group, its top n of the m inputs.
    for each input j of the block: q_j = kept part of row w_j,
      e_j = (w_j - q_j) / U_jj, and every later row l of the block gets
      w_l -= U_jl e_j (the OBS update; U_jl = 0 for l < j);
    later blocks receive all of the block's updates at once
      (W[rest] -= U[block, rest]^T E).

Deviations from the original, all in the selection rule: the kept count
per block is exact (`projection.topk_mask`, ties to the lower index)
instead of the original `score <= quantile` (which prunes one more weight
and every tie); dead inputs (`G_jj = 0`) get diagonal 1 and zero weights
as in the original.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mosp_jax.solvers import projection
from mosp_jax.solvers.scaling import damp


def _block(W: jax.Array, keep_all: jax.Array, U: jax.Array,
           start: int | jax.Array, *, size: int, pattern: projection.Pattern
           ) -> tuple[jax.Array, jax.Array]:
  """Prunes inputs `start .. start+size` of `W (n_in, n_out)`, then pushes
  their errors onto the later inputs. `start` may be traced."""
  n_in, n_out = W.shape
  W1 = jax.lax.dynamic_slice(W, (start, 0), (size, n_out))
  rows = jax.lax.dynamic_slice(U, (start, 0), (size, n_in))   # U[blk, :]
  U1 = jax.lax.dynamic_slice(rows, (0, start), (size, size))  # U[blk, blk]
  d = jnp.diagonal(U1)

  def prune_row(j: int | jax.Array, carry: tuple[jax.Array, ...]
                ) -> tuple[jax.Array, ...]:
    W1, keep, E = carry
    w = W1[j]
    q = jnp.where(keep[j], w, 0.0)
    e = (w - q) / d[j]
    W1 = W1 - U1[j][:, None] * e[None, :]
    return W1, keep, E.at[j].set(e)

  E = jnp.zeros((size, n_out), W.dtype)
  if isinstance(pattern, projection.NM):
    m = pattern.m

    def group(g: int | jax.Array, carry: tuple[jax.Array, ...]
              ) -> tuple[jax.Array, ...]:
      W1, keep, E = carry
      j0 = g * m
      wg = jax.lax.dynamic_slice(W1, (j0, 0), (m, n_out))
      dg = jax.lax.dynamic_slice(d, (j0,), (m,))
      kg = projection.nm_mask(jnp.square(wg / dg[:, None]), pattern.n, m)
      keep = jax.lax.dynamic_update_slice(keep, kg, (j0, 0))
      return jax.lax.fori_loop(j0, j0 + m, prune_row, (W1, keep, E))

    keep = jnp.zeros((size, n_out), bool)
    W1, keep, E = jax.lax.fori_loop(0, size // m, group, (W1, keep, E))
  else:
    count = pattern.keep(size, n_out)
    keep = projection.topk_mask(jnp.square(W1 / d[:, None]), count)
    W1, keep, E = jax.lax.fori_loop(0, size, prune_row, (W1, keep, E))
  # Rows before the block get nothing (U is upper triangular); the block's
  # own rows are overwritten with their final values below.
  W = W - rows.T @ E
  W = jax.lax.dynamic_update_slice(W, jnp.where(keep, W1, 0.0), (start, 0))
  keep_all = jax.lax.dynamic_update_slice(keep_all, keep, (start, 0))
  return W, keep_all


@functools.partial(jax.jit, static_argnames=("pattern", "blocksize"))
def _sparsegpt(G: jax.Array, W0: jax.Array, damping: float | jax.Array, *,
               pattern: projection.Pattern, blocksize: int
               ) -> tuple[jax.Array, jax.Array]:
  n_in, n_out = W0.shape
  G = G.astype(jnp.float32)
  dead = jnp.diagonal(G) == 0
  G = G + jnp.diag(dead.astype(G.dtype))
  W = jnp.where(dead[:, None], 0.0, W0.astype(jnp.float32))
  H = damp(G, damping)
  eye = jnp.eye(n_in, dtype=H.dtype)
  Hinv = jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(H), True), eye)
  Hinv = 0.5 * (Hinv + Hinv.T)
  U = jnp.triu(jnp.linalg.cholesky(Hinv).T)
  keep = jnp.zeros((n_in, n_out), bool)
  step = functools.partial(_block, size=blocksize, pattern=pattern)
  full, rest = divmod(n_in, blocksize)
  W, keep = jax.lax.fori_loop(
      0, full, lambda b, c: step(c[0], c[1], U, b * blocksize), (W, keep))
  if rest:
    W, keep = _block(W, keep, U, full * blocksize, size=rest,
                     pattern=pattern)
  return W.astype(W0.dtype), keep


def sparsegpt_prune(G: jax.Array, W0: jax.Array, *,
                    pattern: projection.Pattern, damping: float = 0.01,
                    blocksize: int = 128) -> tuple[jax.Array, jax.Array]:
  """Prunes one layer with SparseGPT.

  Args:
    G: `(n_in, n_in)` input Gram (per-token mean), undamped.
    W0: `(n_in, n_out)` dense weights.
    pattern: `Unstructured(s)` or `NM(n, m)`; for N:M, `blocksize` must be
      a multiple of `m`.
    damping: ridge relative to the mean diagonal (0.01, as SparseGPT's
      `percdamp` and the other solvers here).
    blocksize: inputs per lazy-update block (SparseGPT: 128); a last,
      shorter block takes the remainder.

  Returns:
    `(W, mask)`: `W (n_in, n_out)` zero off `mask`. Unstructured: exactly
    `round((1-s) * size * n_out)` kept per block, which is the matrix
    budget when `blocksize` divides `n_in` and that count is an integer.
  """
  if blocksize < 1:
    raise ValueError(f"blocksize must be >= 1, got {blocksize}")
  if isinstance(pattern, projection.NM):
    pattern.keep(W0.shape[0], W0.shape[1])  # checks n_in % m
    if blocksize % pattern.m:
      raise ValueError(f"blocksize {blocksize} must be a multiple of the "
                       f"N:M group size {pattern.m}")
  blocksize = min(blocksize, W0.shape[0])
  return _sparsegpt(G, W0, jax.device_put(damping), pattern=pattern,
                    blocksize=blocksize)
