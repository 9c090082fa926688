"""Magnitude pruning: keep the largest `|W0|` (no calibration data).

Per matrix for unstructured sparsity (the layer-wise magnitude baseline of
SparseGPT and ALPS), per group of `m` inputs of an output column for N:M.
Ties go to the lower flat index (`projection.prune_mask`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mosp_jax.solvers import projection


@functools.partial(jax.jit, static_argnames=("pattern",))
def magnitude_prune(W0: jax.Array, *, pattern: projection.Pattern
                    ) -> tuple[jax.Array, jax.Array]:
  """Zeroes the smallest-magnitude weights.

  Args:
    W0: `(n_in, n_out)` dense weights.
    pattern: `Unstructured(s)` (exactly `round((1-s) n_in n_out)` kept per
      matrix) or `NM(n, m)` (`n` kept per group).

  Returns:
    `(W, mask)`: `W (n_in, n_out)` equal to `W0` on `mask` and zero off it.
  """
  mask = projection.prune_mask(jnp.abs(W0), pattern)
  return jnp.where(mask, W0, 0.0).astype(W0.dtype), mask
