"""ADMM for sparse least squares on one Gram (ALPS; MOSP stages 1 and 2).

In scaled variables (`scaling.py`), for a Gram `G (n_in, n_in)` and `c`
channels of iterates that share it (ALPS: one; MOSP's stage 1: the global
model and the core):

  minimise 1/2 tr((B - B0)^T G (B - B0))  s.t.  supp(B) in the allowed set,

split as `B = D` with `D` sparse [ALPS, Meng et al. 2024]:

  B <- (G + rho I)^-1 (G B0 - V + rho D)      # every channel, one solve
  Z <- B + V / rho
  D <- Z on project(Z), zero elsewhere      # the projection may couple
  V <- V + rho (B - D)                      # channels (MOSP's core)

The linear step is a `LinearSolve`: `eig_solve` goes through one
eigendecomposition of `G`, so a new `rho` needs no new factorisation (ALPS,
MOSP stage 1); `fixed_solve` applies `(G + rho I)^-1` formed once from a
Cholesky factor for a fixed `rho` (MOSP stage 2, whose `rho` never
changes).

rho schedule [ALPS; MOSP eq. 50], applied only every `update_every`
iterations to the support change of channel 0, `s = |supp(D_t) symmetric-
difference supp(D_{t-update_every})|`: see `rho_step`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl

# Actions returned by rho_step.
CONTINUE, RESTART, STOP = 0, 1, 2
RHO_MAX = 1e6
# ALPS stops once `i >= 30` (its 0-based iteration index, so after at
# least 31 iterations) when `s < 0.0003 k`.
SWITCH_ITER = 30
SWITCH_FRACTION = 3e-4

# `Z (c, n, n_out) -> (mask (c, n, n_out) bool, aux)`.
Projection = Callable[[jax.Array], tuple[jax.Array, Any]]


class AdmmInfo(NamedTuple):
  """Diagnostics of an ADMM run (all arrays, so usable under jit/vmap).

  iters: iterations performed.
  converged: True when the support criterion stopped the run before the cap.
  rho: final penalty (relative to unit mean diagonal).
  supp_change: the last measured support change `s` of channel 0 (weights).
  restarts: how many times the run restarted with `rho / 5`.
  """
  iters: jax.Array
  converged: jax.Array
  rho: jax.Array
  supp_change: jax.Array
  restarts: jax.Array


def rho_step(rho: jax.Array, s: jax.Array, k: int, raised: jax.Array,
             iters_done: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One application of the support-change rho rule (at a check only).

  Args:
    rho: current penalty.
    s: support change since the last check, in weights.
    k: the budget (weights kept per matrix).
    raised: whether rho was ever multiplied by 1.2 or 1.3 in this run.
    iters_done: iterations completed so far (1-based).

  Returns:
    `(rho, raised, action)` with action CONTINUE, RESTART (start again
    from the initial iterates with `rho / 5`: the support froze before rho
    was ever raised, so rho0 was too large) or STOP (support stable).

  Rule [ALPS; MOSP eq. 50]: stop if `s == 0` after rho was raised, or
  once more than 30 iterations are done (ALPS's 0-based `i >= 30`) and
  `s < 0.0003 k`; else `rho *= 1.3` if `s >= 0.1 k`, `1.2` if
  `s >= 0.005 k`; else restart if rho was never raised, `1.1` otherwise.
  rho is capped at 1e6.
  """
  stop = (raised & (s == 0)) | ((iters_done > SWITCH_ITER) &
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
  """ADMM iterates, each `(c, n_in, n_out)`: dense `B`, sparse `D` (zero
  off `mask`), dual `V`, support `mask`."""
  B: jax.Array
  D: jax.Array
  V: jax.Array
  mask: jax.Array


class _State(NamedTuple):
  it: jax.Array
  rho: jax.Array
  op: Any
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


def eig(G: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`G = Q diag(L) Q^T` for a symmetric `G (..., n, n)`: `(Q, L)`."""
  L, Q = jnp.linalg.eigh(G)
  return Q, L


class LinearSolve(NamedTuple):
  """`(G + rho I)^-1` as an operator: `factor(rho)` builds it (a pytree),
  `apply(op, R)` applies it to every channel of `R (c, n, n_out)`. The
  loop builds it once and again only when `rho` changes."""
  factor: Callable[[jax.Array], Any]
  apply: Callable[[Any, jax.Array], jax.Array]


def _matmul(inv: jax.Array, R: jax.Array) -> jax.Array:
  return jnp.einsum("ij,cjo->cio", inv, R)


def eig_solve(Q: jax.Array, L: jax.Array, n_cols: int,
              update_every: int) -> LinearSolve:
  """`(G + rho I)^-1` through `G = Q diag(L) Q^T` (`Q (n, n)`, `L (n,)`),
  so that a new `rho` needs no new factorisation.

  Applied as `Q ((Q^T R) / (L + rho))` (two matmuls per step), or, when
  forming the explicit inverse `Q diag(1 / (L + rho)) Q^T` (one `n^3`
  matmul per rho change, at most every `update_every` steps) costs less
  than the product saved on the `n_cols` columns of all channels, as
  that inverse (one matmul per step) [ours; ALPS forms the inverse too].
  The choice is static, by shapes.
  """
  n = Q.shape[0]
  if n < update_every * n_cols:
    return LinearSolve(
        factor=lambda rho: (Q * (1.0 / (L + rho))[None, :]) @ Q.T,
        apply=_matmul)

  def apply(scale: jax.Array, R: jax.Array) -> jax.Array:
    QtR = jnp.einsum("ji,cjo->cio", Q, R)
    return jnp.einsum("ij,cjo->cio", Q, QtR * scale[None, :, None])
  return LinearSolve(factor=lambda rho: 1.0 / (L + rho), apply=apply)


def cholesky_inverse(G: jax.Array, rho: jax.Array) -> jax.Array:
  """`(G + rho I)^-1` of one `G (n, n)`, through its Cholesky factor.

  Call it on one matrix at a time (e.g. `lax.map` over tasks): jaxlib's
  batched CPU LAPACK kernels wait on the thread pool that forced host
  devices share and can deadlock on a mesh (`sharding.py`).
  """
  eye = jnp.eye(G.shape[0], dtype=G.dtype)
  return jsl.cho_solve(jsl.cho_factor(G + rho * eye, lower=True), eye)


def fixed_solve(inverse: jax.Array) -> LinearSolve:
  """A linear step for a `rho` that never changes: `inverse (n, n)` is
  `(G + rho I)^-1` formed once (`cholesky_inverse`), one matmul per
  step."""
  return LinearSolve(factor=lambda _: inverse, apply=_matmul)


# Kept whole (80 lines): its while_loop body is ADMM and closes over the args.
def run_admm(solve: LinearSolve, GB0: jax.Array, init: tuple[
    jax.Array, jax.Array, jax.Array], project: Projection, *, k: int,
             rho0: float | jax.Array, adaptive: bool, update_every: int,
             max_iter: int | jax.Array) -> tuple[Iterates, Any, AdmmInfo]:
  """Runs ADMM on one Gram over `c` channels of iterates.

  Longer than 60 lines because the loop's state update, its support
  checks (rho schedule, restart, stop) and the `while_loop`'s condition
  share one carry; as closures over it they read like ALPS's algorithm,
  where split into module functions they would each take the whole state.

  Args:
    solve: the linear step `(G + rho I)^-1` (`eig_solve`; for a fixed
      `rho`, `fixed_solve`).
    GB0: `(n, n_out)`, `G @ B0` (the same for every channel).
    init: `(B, D, V)`, each `(c, n, n_out)`; a restart returns here. `D`
      must already be the projection of `B` (or a warm start).
    project: `Z (c, n, n_out) -> (mask (c, n, n_out) bool, aux)`; `aux` is
      any pytree kept for the caller.
    k: budget of channel 0, for the rho rule.
    rho0: initial penalty.
    adaptive: True for the ALPS schedule (`rho_step`) on channel 0's
      support; False keeps `rho` fixed and stops at the first check where
      channel 0's support did not change.
    update_every: iterations between support checks (3 in ALPS); rho and
      the stop/restart decisions change only at checks.
    max_iter: iteration cap (may be traced).

  Returns:
    `(Iterates, aux, info)` at the last iteration.
  """
  B_init, D_init, V_init = init
  mask_init, aux_init = project(D_init)
  rho0 = jnp.asarray(rho0, jnp.float32)
  op0 = solve.factor(rho0)

  def cond(st: _State) -> jax.Array:
    return ~st.done & (st.it < max_iter)

  def body(st: _State) -> _State:
    B = solve.apply(st.op, GB0[None] - st.V + st.rho * st.D)
    # Divisions by a broadcast are written as products with a reciprocal:
    # XLA may make that rewrite itself in one program and not in another
    # (it did under vmap on one device, not on a mesh), changing last bits.
    Z = B + st.V * (1.0 / st.rho)
    mask, aux = project(Z)
    D = jnp.where(mask, Z, 0.0)
    V = st.V + st.rho * (B - D)
    it = st.it + 1
    check = (it % update_every) == 0
    s = jnp.sum(mask[0] != st.prev_mask).astype(jnp.float32)
    if adaptive:
      rho, raised, action = rho_step(st.rho, s, k, st.raised, it)
    else:
      rho, raised = st.rho, st.raised
      action = jnp.where(s == 0, STOP, CONTINUE)
    # The schedule acts at checks only [ALPS: every `update_iter`].
    rho = jnp.where(check, rho, st.rho)
    raised = jnp.where(check, raised, st.raised)
    action = jnp.where(check, action, CONTINUE)
    restart = action == RESTART
    op = st.op
    if adaptive:
      # Rare events as conditionals, not selects over every iterate.
      B, D, V, mask, aux = jax.lax.cond(
          restart, lambda: (B_init, D_init, V_init, mask_init, aux_init),
          lambda: (B, D, V, mask, aux))
      op = jax.lax.cond(rho != st.rho, solve.factor, lambda _: st.op, rho)
    return _State(
        it=it, rho=rho, op=op, raised=raised,
        restarts=st.restarts + restart.astype(jnp.int32),
        done=action == STOP,
        supp_change=jnp.where(check, s, st.supp_change),
        B=B, D=D, V=V, mask=mask,
        prev_mask=jnp.where(check, mask[0], st.prev_mask), aux=aux)

  st = _State(
      it=jnp.int32(0), rho=rho0, op=op0, raised=jnp.bool_(False),
      restarts=jnp.int32(0), done=jnp.bool_(False),
      supp_change=jnp.float32(jnp.nan), B=B_init, D=D_init, V=V_init,
      mask=mask_init, prev_mask=mask_init[0], aux=aux_init)
  st = jax.lax.while_loop(cond, body, st)
  info = AdmmInfo(iters=st.it, converged=st.done, rho=st.rho,
                  supp_change=st.supp_change, restarts=st.restarts)
  return Iterates(st.B, st.D, st.V, st.mask), st.aux, info
