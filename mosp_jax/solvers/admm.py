"""ADMM for sparse least squares over a batch of tasks (ALPS and MOSP).

For every task `i` (scaled variables, unit-mean-diagonal Gram `G_i`):

  minimise 1/2 tr((B - B0)^T G_i (B - B0))  s.t.  supp(B) in the allowed set,

split as `B_i = D_i` with `D_i` sparse:

  B_i <- (G_i + rho I)^-1 (G_i B0 - V_i + rho D_i)
  Z_i <- B_i + V_i / rho
  D_i <- Z_i on project(Z), zero elsewhere       # projection couples tasks
  V_i <- V_i + rho (B_i - D_i)

The inverse is applied through one eigendecomposition per task,
`Q ((Q^T R) / (L + rho))`, so changing `rho` costs nothing. With one task and
the plain top-k projection this is ALPS (Meng et al., 2024); with the coupled
projection it is MOSP's stage 1, with a frozen core its stage 2.

rho schedule (ALPS, MOSP eq. 50), every `update_every` iterations with
`s = |supp(D_t) symmetric-difference supp(D_{t-update_every})|` averaged over
tasks and `k` the budget: see `rho_step`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

# Actions returned by rho_step.
CONTINUE, RESTART, STOP = 0, 1, 2
RHO_MAX = 1e6
SWITCH_ITER = 30
SWITCH_FRACTION = 3e-4


class AdmmInfo(NamedTuple):
  """Diagnostics of an ADMM run (all arrays, so usable under jit/vmap).

  iters: iterations performed.
  converged: True when the support criterion stopped the run before the cap.
  rho: final penalty (relative to unit mean diagonal).
  supp_change: the last measured support change `s` (weights, task mean).
  restarts: how many times the run restarted with `rho / 5`.
  """
  iters: jax.Array
  converged: jax.Array
  rho: jax.Array
  supp_change: jax.Array
  restarts: jax.Array


def rho_step(rho: jax.Array, s: jax.Array, k: int, raised: jax.Array,
             iters_done: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One application of the support-change rho rule.

  Args:
    rho: current penalty.
    s: support change since the last check (may be a task mean, so real).
    k: the budget (weights kept per matrix).
    raised: whether rho was ever multiplied by 1.2 or 1.3 in this run.
    iters_done: iterations completed so far.

  Returns:
    `(rho, raised, action)` with action CONTINUE, RESTART (start again
    from the initial iterates with `rho / 5`: the support froze before rho
    was ever raised, so rho0 was too large) or STOP (support stable).

  Rule: stop if `s == 0` after rho was raised, or once `iters_done >= 30`
  and `s < 0.0003 k`; else `rho *= 1.3` if `s >= 0.1 k`, `1.2` if
  `s >= 0.005 k`; else restart if rho was never raised, `1.1` otherwise.
  rho is capped at 1e6.
  """
  stop = (raised & (s == 0)) | ((iters_done >= SWITCH_ITER) &
                                (s < SWITCH_FRACTION * k))
  big = s >= 0.1 * k
  mid = s >= 0.005 * k
  restart = ~stop & ~big & ~mid & ~raised
  factor = jnp.where(big, 1.3, jnp.where(mid, 1.2,
                                         jnp.where(restart, 0.2, 1.1)))
  new_rho = jnp.where(stop, rho, jnp.minimum(rho * factor, RHO_MAX))
  action = jnp.where(stop, STOP, jnp.where(restart, RESTART, CONTINUE))
  return new_rho, raised | (~stop & (big | mid)), action


class Iterates(NamedTuple):
  """ADMM iterates, each `(m, n_in, n_out)`: dense `B`, sparse `D` (zero off
  `mask`), dual `V`."""
  B: jax.Array
  D: jax.Array
  V: jax.Array
  mask: jax.Array


class _State(NamedTuple):
  it: jax.Array
  rho: jax.Array
  raised: jax.Array
  restarts: jax.Array
  done: jax.Array
  supp_change: jax.Array
  B: jax.Array
  D: jax.Array
  V: jax.Array
  mask: jax.Array
  prev_mask: jax.Array
  aux: Any


Projection = Callable[[jax.Array], tuple[jax.Array, Any]]


def eig(G: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Batched eigendecomposition `G_i = Q_i diag(L_i) Q_i^T`.

  Args: `G (m, n, n)`. Returns `(Q (m, n, n), L (m, n))`.
  """
  L, Q = jnp.linalg.eigh(G)
  return Q, L


def apply_inverse(Q: jax.Array, L: jax.Array, rho: jax.Array,
                  R: jax.Array) -> jax.Array:
  """`(G_i + rho I)^-1 R_i` for every task. Shapes `(m, n, n)`, `(m, n)`,
  scalar, `(m, n, n_out)`."""
  QtR = jnp.einsum("mji,mjo->mio", Q, R)
  return jnp.einsum("mij,mjo->mio", Q, QtR * (1.0 / (L + rho))[:, :, None])


def run_admm(Q: jax.Array, L: jax.Array, GB0: jax.Array, init: tuple[
    jax.Array, jax.Array, jax.Array], project: Projection, *, k: int,
         rho0: float | jax.Array, adaptive: bool, update_every: int,
         max_iter: int) -> tuple[Iterates, Any, AdmmInfo]:
  """Runs ADMM over a batch of `m` tasks with a (possibly coupled) projection.

  Args:
    Q, L: eigendecomposition of the tasks' Grams, `(m, n, n)` and `(m, n)`.
    GB0: `(m, n, n_out)`, `G_i @ B0`.
    init: `(B, D, V)`, each `(m, n, n_out)`; a restart returns here. `D`
      must already be the projection of `B` (or a warm start).
    project: `Z (m, n, n_out) -> (mask (m, n, n_out) bool, aux)`; `aux` is
      any pytree kept for the caller (e.g. MOSP's core mask).
    k: budget per task matrix, for the rho rule.
    rho0: initial penalty.
    adaptive: True for the ALPS schedule (`rho_step`); False keeps `rho`
      fixed and stops as soon as the support does not change.
    update_every: iterations between support checks (3 in ALPS).
    max_iter: iteration cap.

  Returns:
    `(Iterates, aux, info)` at the last iteration.
  """
  B_init, D_init, V_init = init
  mask_init, aux_init = project(D_init)
  rho0 = jnp.asarray(rho0, jnp.float32)

  def cond(st: _State):
    return ~st.done & (st.it < max_iter)

  def body(st: _State) -> _State:
    B = apply_inverse(Q, L, st.rho, GB0 - st.V + st.rho * st.D)
    # Divisions by a broadcast are written as products with a reciprocal:
    # XLA may make that rewrite itself in one program and not in another
    # (it did under vmap on one device, not on a mesh), changing last bits.
    Z = B + st.V * (1.0 / st.rho)
    mask, aux = project(Z)
    D = jnp.where(mask, Z, 0.0)
    V = st.V + st.rho * (B - D)
    it = st.it + 1
    check = (it % update_every) == 0
    s = jnp.mean(jnp.sum(mask != st.prev_mask, axis=(1, 2)).astype(
        jnp.float32))
    if adaptive:
      rho, raised, action = rho_step(st.rho, s, k, st.raised, it)
    else:
      rho, raised = st.rho, st.raised
      action = jnp.where(s == 0, STOP, CONTINUE)
    action = jnp.where(check, action, CONTINUE)
    restart = action == RESTART
    keep = lambda fresh, cur: jnp.where(restart, fresh, cur)  # noqa: E731
    mask = keep(mask_init, mask)
    return _State(
        it=it, rho=rho, raised=raised,
        restarts=st.restarts + restart.astype(jnp.int32),
        done=action == STOP,
        supp_change=jnp.where(check, s, st.supp_change),
        B=keep(B_init, B), D=keep(D_init, D), V=keep(V_init, V),
        mask=mask, prev_mask=jnp.where(check, mask, st.prev_mask),
        aux=jax.tree.map(keep, aux_init, aux))

  st = _State(
      it=jnp.int32(0), rho=rho0, raised=jnp.bool_(False),
      restarts=jnp.int32(0), done=jnp.bool_(False),
      supp_change=jnp.float32(jnp.nan), B=B_init, D=D_init, V=V_init,
      mask=mask_init, prev_mask=mask_init, aux=aux_init)
  st = jax.lax.while_loop(cond, body, st)
  info = AdmmInfo(iters=st.it, converged=st.done, rho=st.rho,
                  supp_change=st.supp_change, restarts=st.restarts)
  return Iterates(st.B, st.D, st.V, st.mask), st.aux, info
