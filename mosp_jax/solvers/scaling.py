"""Damping, column scaling and the per-task objective (METHOD.md section 1).

The solvers work in scaled variables `B = diag(d) W` with
`d = sqrt(diag(mean_i G_i))` shared by every task, and with each task's
scaled Gram normalised to unit mean diagonal, so that ADMM penalties `rho`
mean the same thing for every layer and task (ALPS's convention).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

Replicate = Callable[[jax.Array], jax.Array]


def weight_sum(x: jax.Array, replicate: Replicate | None = None
               ) -> jax.Array:
  """Sum of `x (..., n_in, n_out)` over its last two axes, the same to
  the bit whether or not the output columns are split over devices.

  Rows are summed per column by a contraction with ones (a matmul: the
  same per column at any column split), the `(..., n_out)` column sums
  are passed through `replicate` (on a device mesh: gathered onto every
  device) and then summed. A plain `sum` would add per-device partial
  sums, in an order that differs from one device's.
  """
  col = jnp.einsum("...io,i->...o", x, jnp.ones(x.shape[-2], x.dtype))
  if replicate is not None:
    col = replicate(col)
  return jnp.sum(col, axis=-1)


def damp(G: jax.Array, damping: float | jax.Array) -> jax.Array:
  """Adds `damping * mean(diag(G))` to the diagonal of `G` `(n, n)`.

  A Gram with zero diagonal (no signal at all) gets `damping` itself, so the
  solve stays well posed; inputs that never fire (dead columns) are thereby
  damped like every other input and cost only the ridge to prune.
  """
  mean_diag = jnp.mean(jnp.diagonal(G))
  lam = damping * jnp.where(mean_diag > 0, mean_diag, 1.0)
  return G + lam * jnp.eye(G.shape[0], dtype=G.dtype)


def relative_error(G: jax.Array, W0: jax.Array, W: jax.Array) -> jax.Array:
  """`f(W) = tr((W-W0)^T G (W-W0)) / tr(W0^T G W0)` (0 when W0 has no energy).

  Args: `G (n_in, n_in)`, `W0, W (n_in, n_out)`. Returns a scalar.
  """
  E = W - W0
  num = jnp.sum(E * (G @ E))
  den = jnp.sum(W0 * (G @ W0))
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


class Scaled(NamedTuple):
  """A layer's problem in the solvers' scaled variables.

  G: `(m, n_in, n_in)` damped task Grams in scaled variables, each with unit
    mean diagonal.
  B0: `(n_in, n_out)` scaled dense weights `d[:, None] * W0`.
  d: `(n_in,)` column scale; `W = B / d[:, None]`.
  energy: `(m,)` `tr(B0^T G_i B0)`, the denominators of the relative task
    losses in these units (1 where the layer has no energy for a task).
  """
  G: jax.Array
  B0: jax.Array
  d: jax.Array
  energy: jax.Array


def scale_problem(grams: jax.Array, W0: jax.Array, *,
                  damping: float | jax.Array,
                  replicate: Replicate | None = None) -> Scaled:
  """Damps, scales and normalises the task Grams of one layer.

  Args:
    grams: `(m, n_in, n_in)` per-token mean Grams `X_i^T X_i / N_i`.
    W0: `(n_in, n_out)` dense weights.
    damping: ridge relative to the mean diagonal (paper: 0.01).
    replicate: see `weight_sum` (on a mesh: makes `energy` exact).
  """
  G = jax.vmap(lambda g: damp(g, damping))(grams.astype(jnp.float32))
  diag = jnp.diagonal(jnp.mean(G, axis=0))
  d = jnp.sqrt(jnp.where(diag > 0, diag, 1.0))
  G = G / (d[:, None] * d[None, :])[None]
  unit = jnp.mean(jnp.diagonal(G, axis1=1, axis2=2), axis=1)
  G = G / unit[:, None, None]
  B0 = d[:, None] * W0.astype(jnp.float32)
  energy = weight_sum((G @ B0) * B0[None], replicate)
  energy = jnp.where(energy > 0, energy, 1.0)
  return Scaled(G=G, B0=B0, d=d, energy=energy)


def mixed_gram(grams: jax.Array, W0: jax.Array, lam: jax.Array) -> jax.Array:
  """The Gram of the preference objective `F_lam` (METHOD.md section 1).

  `H_lam = sum_i lam_i G_i / tr(W0^T G_i W0)`, so that
  `tr((W-W0)^T H_lam (W-W0)) = sum_i lam_i f_i(W)`. A task without energy
  (`tr = 0`) enters with weight `lam_i` on an all-zero Gram.

  Args: `grams (m, n_in, n_in)` undamped, `W0 (n_in, n_out)`, `lam (m,)`.
  Returns `(n_in, n_in)`, undamped.
  """
  grams = grams.astype(jnp.float32)
  W0 = W0.astype(jnp.float32)
  energy = jnp.einsum("io,mij,jo->m", W0, grams, W0)
  w = lam.astype(jnp.float32) / jnp.where(energy > 0, energy, 1.0)
  return jnp.tensordot(w, grams, axes=1)
