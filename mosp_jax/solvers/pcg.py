"""Vectorised masked preconditioned conjugate gradient (docs/METHOD_NOTES.md).

Refines weights on a fixed support: for every output column `c`,

  minimise (w - w0)^T H (w - w0)   subject to  w_j = 0 for j not in S_c,

i.e. `H[S_c, S_c] w_S = (H w0)[S_c]`. All columns are solved at once with the
masked operator `A(X) = M * (H @ (M * X))`, right side `M * (H @ W0)`, the
Jacobi preconditioner `diag(H)` and per-column step sizes. A fixed number of
iterations (`fori_loop`); `vmap` it over tasks and preferences.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class PcgInfo(NamedTuple):
  """Diagnostics of one PCG run.

  residual: `(n_out,)` final masked residual norm per column, relative to the
    norm of the masked right-hand side (0 where that is 0).
  """
  residual: jax.Array


def column_sums(x: jax.Array) -> jax.Array:
  """`(n, o) -> (o,)`: the sum of each column, as `ones(n) @ x` [ours].

  `jnp.sum(x, axis=0)` sums in an order that depends on how many columns
  the array has, so a column split over a device mesh changed the last
  bit of 140-1130 of the sums on 576-11008 x 256-2048 arrays, and the
  PCG's step sizes with them; the product with a vector of ones gave
  each column's sum bit for bit the same on one device and on four.
  `HIGHEST`: a GPU would otherwise be free to round the inputs to TF32.
  """
  return jnp.matmul(jnp.ones((x.shape[0],), x.dtype), x,
                    precision=jax.lax.Precision.HIGHEST)


def masked_pcg(H: jax.Array, W0: jax.Array, mask: jax.Array, X0: jax.Array, *,
        iters: int) -> tuple[jax.Array, PcgInfo]:
  """Least-squares refit of `W0` on the support `mask`.

  Args:
    H: `(n_in, n_in)` symmetric positive definite Gram (damped).
    W0: `(n_in, n_out)` dense weights being approximated.
    mask: `(n_in, n_out)` bool support; weights off it are exactly zero.
    X0: `(n_in, n_out)` warm start (its values off `mask` are ignored).
    iters: static number of PCG iterations.

  Returns:
    `(X, info)`: `X (n_in, n_out)` zero off `mask`, and `PcgInfo`.

  Each iteration never raises the objective in exact arithmetic (CG is
  monotone in the energy norm); where a column has converged its step is
  zero rather than 0/0.
  """
  m = mask.astype(H.dtype)
  b = m * (H @ W0)
  X = m * X0
  R = b - m * (H @ X)
  diag = jnp.diagonal(H)
  minv = jnp.where(diag > 0, 1.0 / jnp.where(diag > 0, diag, 1.0), 0.0)
  Z = minv[:, None] * R
  rz = column_sums(R * Z)

  def body(_: jax.Array, carry: tuple[jax.Array, ...]
           ) -> tuple[jax.Array, ...]:
    X, R, P, rz = carry
    AP = m * (H @ P)
    pap = column_sums(P * AP)
    alpha = jnp.where(pap > 0, rz / jnp.where(pap > 0, pap, 1.0), 0.0)
    X = X + alpha * P
    R = R - alpha * AP
    Z = minv[:, None] * R
    rz_new = column_sums(R * Z)
    beta = jnp.where(rz > 0, rz_new / jnp.where(rz > 0, rz, 1.0), 0.0)
    return X, R, Z + beta * P, rz_new

  X, R, _, _ = jax.lax.fori_loop(0, iters, body, (X, R, Z, rz))
  # Norms from `column_sums` too: the diagnostics then match on a mesh.
  bnorm = jnp.sqrt(column_sums(b * b))
  rnorm = jnp.sqrt(column_sums(R * R))
  rel = jnp.where(bnorm > 0, rnorm / jnp.where(bnorm > 0, bnorm, 1.0), 0.0)
  return X, PcgInfo(residual=rel)
