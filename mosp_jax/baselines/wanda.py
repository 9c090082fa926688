"""Wanda: keep the largest `|W_jk| * ||X_j||` per output (no weight update).

Sun et al., "A Simple and Effective Pruning Approach for Large Language
Models", ICLR 2024. The score of weight `(j, k)` (input j, output k) is
`|W_jk| * sqrt(G_jj)`, which ranks like Wanda's `|W_jk| * ||X_j||_2` since
`G = X^T X / N`. Weights compete within one output (Wanda's "per output"
comparison group): in this `(n_in, n_out)` layout, within one column. Each
column keeps `n_in - floor(s n_in)` weights, as Wanda prunes
`int(s n_in)` per output; N:M keeps `n` per group of `m` inputs. Ties go to
the lower input index.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from mosp_jax.solvers import projection


def column_keep(pattern: projection.Unstructured, n_in: int) -> int:
  """Weights Wanda keeps per output column at unstructured sparsity."""
  return n_in - int(math.floor(pattern.sparsity * n_in + 1e-9))


@functools.partial(jax.jit, static_argnames=("pattern",))
def wanda_prune(G: jax.Array, W0: jax.Array, *, pattern: projection.Pattern
                ) -> tuple[jax.Array, jax.Array]:
  """Prunes by Wanda's score, per output column.

  Args:
    G: `(n_in, n_in)` input Gram (per-token mean); only its diagonal is
      used, undamped (Wanda has no damping). Dead inputs (diag 0) score 0
      and go first.
    W0: `(n_in, n_out)` dense weights.
    pattern: `Unstructured(s)` or `NM(n, m)`.

  Returns:
    `(W, mask)`: `W (n_in, n_out)` equal to `W0` on `mask`, zero off it.
  """
  n_in, _ = W0.shape
  norm = jnp.sqrt(jnp.maximum(jnp.diagonal(G).astype(jnp.float32), 0.0))
  score = jnp.abs(W0.astype(jnp.float32)) * norm[:, None]
  if isinstance(pattern, projection.NM):
    mask = projection.nm_mask(score, pattern.n, pattern.m)
  else:
    keep = column_keep(pattern, n_in)
    mask = jax.vmap(lambda s: projection.topk_mask(s, keep),
                    in_axes=1, out_axes=1)(score)
  return jnp.where(mask, W0, 0.0).astype(W0.dtype), mask
