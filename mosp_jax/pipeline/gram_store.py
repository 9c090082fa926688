"""The task Grams in the compact form a Pareto set stores them [ours].

The preference refit (`SolverConfig.pref_refit_iters`) reads the task
Grams of each group of linears, so a Pareto set that can export any
preference later must keep them. Stored as float32 they would take 2.8x
the dense model's linear weights (three tasks, SmolLM2-135M); stored
here they take a quarter of that:

- `diag (m, n)` float32: each Gram's diagonal, exact;
- `corr (m, n (n - 1) / 2)` float16: the strict upper triangle of the
  correlation matrix `D^-1/2 G D^-1/2` (`D = diag(G)`), whose entries lie
  in [-1, 1], so float16 keeps each to 2^-11 of its magnitude (an entry
  below 2^-14, among float16's subnormals, to 2^-25 absolute).

`G_ij = corr_ij sqrt(D_i) sqrt(D_j)` off the diagonal, `D_i` on it; a
zero diagonal entry (an input feature that is always zero) gives a zero
row and column, as in `G` itself.

The run refits on `decode(encode(G))`, the Grams as stored, so that a
preference exported from disk later is the model the run evaluated, bit
for bit; and `encode(decode(s)) == s`, so storing again changes nothing
(float32 rounding moves an entry by a few float32 ulps, far below half a
float16 ulp).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class StoredGrams(NamedTuple):
  """One group's task Grams as stored (numpy or device arrays).

  Attributes:
    diag: `(m, n)` float32 diagonals.
    corr: `(m, n (n - 1) / 2)` float16 strict upper triangles of the
      correlation matrices, row-major (`np.triu_indices(n, 1)` order).
  """
  diag: jax.Array | np.ndarray
  corr: jax.Array | np.ndarray


def _scale(diag: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.maximum(diag, 0.0))


@jax.jit
def encode(grams: jax.Array) -> StoredGrams:
  """`(m, n, n)` float32 symmetric Grams -> `StoredGrams`."""
  n = grams.shape[-1]
  diag = jnp.diagonal(grams, axis1=1, axis2=2).astype(jnp.float32)
  s = _scale(diag)
  inv = jnp.where(s > 0, 1.0 / jnp.where(s > 0, s, 1.0), 0.0)
  iu, ju = np.triu_indices(n, 1)
  corr = grams[:, iu, ju] * inv[:, iu] * inv[:, ju]
  return StoredGrams(diag=diag,
                     corr=jnp.clip(corr, -1.0, 1.0).astype(jnp.float16))


@jax.jit
def decode(stored: StoredGrams) -> jax.Array:
  """`StoredGrams` -> `(m, n, n)` float32 symmetric Grams."""
  diag = jnp.asarray(stored.diag, jnp.float32)
  m, n = diag.shape
  s = _scale(diag)
  iu, ju = np.triu_indices(n, 1)
  upper = (jnp.asarray(stored.corr).astype(jnp.float32)
           * s[:, iu] * s[:, ju])
  G = jnp.zeros((m, n, n), jnp.float32).at[:, iu, ju].set(upper)
  return G + jnp.swapaxes(G, 1, 2) + jax.vmap(jnp.diag)(diag)


def nbytes(n: int, m: int) -> int:
  """Bytes of one group's stored Grams (`m` tasks, `n` inputs)."""
  return m * (4 * n + 2 * (n * (n - 1) // 2))


def to_device(grams: StoredGrams | np.ndarray) -> jax.Array:
  """`(m, n, n)` float32 device Grams of what a Pareto set holds: stored
  Grams decoded, or the float32 Grams of a set written before the
  compact form as they are."""
  if isinstance(grams, StoredGrams):
    return decode(jax.device_put(grams))
  return jax.device_put(np.asarray(grams, np.float32))
