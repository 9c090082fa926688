"""Damping, column scaling and the task losses (docs/METHOD_NOTES.md#units).

The solvers work in ALPS's scaled variables [ALPS; MOSP paper-summary]:
`B = diag(d) W` with `d = sqrt(diag(H + damping))`, where `H` is the Gram
the global model is fitted to (for MOSP the concatenated Gram
`concat_gram`), so the scaled Gram has a unit diagonal and ADMM penalties
`rho` mean the same for every layer. MOSP's task Grams use the same `d`
and are each divided by their mean diagonal, so stage 2's fixed `rho` is
relative to a unit mean diagonal for every task too [ours].
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def damp(G: jax.Array, damping: float | jax.Array) -> jax.Array:
  """Adds `damping * mean(diag(G))` to the diagonal of `G` `(n, n)`.

  A Gram with zero diagonal (no signal at all) gets `damping` itself, so the
  solve stays well posed; inputs that never fire (dead columns) are thereby
  damped like every other input and cost only the ridge to prune.
  """
  mean_diag = jnp.mean(jnp.diagonal(G))
  lam = damping * jnp.where(mean_diag > 0, mean_diag, 1.0)
  return G + lam * jnp.eye(G.shape[0], dtype=G.dtype)


def concat_gram(grams: jax.Array) -> jax.Array:
  """The Gram of the concatenated calibration data [paper-summary].

  `grams (m, n, n)` are per-token means `X_i^T X_i / N_i`; with the same
  token count `N` per task (the walk's calibration sets are `nsamples x
  seqlen` tokens each) `X~^T X~ / (m N)` is their mean. Returns `(n, n)`.
  """
  m = grams.shape[0]
  return jnp.einsum("mij,m->ij", grams.astype(jnp.float32),
                    jnp.full((m,), 1.0 / m, jnp.float32))


def relative_error(G: jax.Array, W0: jax.Array, W: jax.Array) -> jax.Array:
  """`f(W) = tr((W-W0)^T G (W-W0)) / tr(W0^T G W0)` (0 when W0 has no energy).

  Args: `G (n_in, n_in)`, `W0, W (n_in, n_out)`. Returns a scalar.
  """
  E = W - W0
  num = jnp.sum(E * (G @ E))
  den = jnp.sum(W0 * (G @ W0))
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


class Scaled(NamedTuple):
  """One layer's problem in the solvers' scaled variables.

  G: `(n_in, n_in)` the damped Gram divided by `d d^T` (unit diagonal).
  B0: `(n_in, n_out)` scaled dense weights `d[:, None] * W0`.
  d: `(n_in,)` column scale; `W = B / d[:, None]`.
  """
  G: jax.Array
  B0: jax.Array
  d: jax.Array


def scale_problem(G: jax.Array, W0: jax.Array, *,
                  damping: float | jax.Array) -> Scaled:
  """Damps `G (n_in, n_in)` (undamped, per-token mean) and scales it and
  `W0 (n_in, n_out)` by `d = sqrt(diag(damped G))` [ALPS]."""
  G = damp(G.astype(jnp.float32), damping)
  diag = jnp.diagonal(G)
  d = jnp.sqrt(jnp.where(diag > 0, diag, 1.0))
  inv = 1.0 / d
  return Scaled(G=G * (inv[:, None] * inv[None, :]),
                B0=d[:, None] * W0.astype(jnp.float32), d=d)


def scale_tasks(grams: jax.Array, d: jax.Array, *,
                damping: float | jax.Array) -> jax.Array:
  """Task Grams `(m, n, n)` (undamped) in the units of `d`: each damped,
  divided by `d d^T` and by its own mean diagonal. Returns `(m, n, n)`."""
  inv = 1.0 / d
  scale = inv[:, None] * inv[None, :]

  def one(g: jax.Array) -> jax.Array:
    g = damp(g.astype(jnp.float32), damping) * scale
    return g * (1.0 / jnp.mean(jnp.diagonal(g)))
  return jax.vmap(one)(grams)


def mixed_gram(grams: jax.Array, W0: jax.Array, lam: jax.Array) -> jax.Array:
  """The Gram of the preference objective `F_lam` [ours: the mixed
  baselines' objective].

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
