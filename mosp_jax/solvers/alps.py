"""ALPS: ADMM with the support-change rho schedule, then PCG on the support.

Meng et al., "ALPS: Improved Optimization for Highly Sparse One-Shot Pruning
for Large Language Models", NeurIPS 2024. The single-objective baseline
(one model on one Gram: a task's, the concatenated data's or a preference
mix) and MOSP's stage 1, which is this ADMM carrying the core as a second
channel of iterates (`admm_support(core_count=...)`): the global model is
exactly ALPS on the concatenated Gram [paper-summary].
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from mosp_jax.config import DEFAULT, SolverConfig
from mosp_jax.solvers import admm as admm_lib
from mosp_jax.solvers import pcg as pcg_lib
from mosp_jax.solvers import projection
from mosp_jax.solvers import sharding as sharding_lib
from mosp_jax.solvers.scaling import Scaled, scale_problem


class AlpsInfo(NamedTuple):
  admm: admm_lib.AdmmInfo
  pcg: pcg_lib.PcgInfo


class Support(NamedTuple):
  """What ALPS's ADMM leaves (scaled units).

  mask: `(n_in, n_out)` bool, the support (exactly the budget).
  D: `(n_in, n_out)`, the sparse iterate on `mask` (PCG's warm start).
  core: `(n_in, n_out)` bool, the core channel's support (`core_count`
    per selection unit, inside `mask`); all False without a core.
  """
  mask: jax.Array
  D: jax.Array
  core: jax.Array


def admm_support(sc: Scaled, Q: jax.Array, L: jax.Array, *,
                 pattern: projection.Pattern, rho0: float | jax.Array,
                 update_every: int, max_iter: int, core_count: int = 0
                 ) -> tuple[Support, admm_lib.AdmmInfo]:
  """ALPS's ADMM on one scaled Gram, optionally carrying a core.

  Args:
    sc: the scaled problem (`G (n_in, n_in)`, `B0 (n_in, n_out)`).
    Q, L: eigendecomposition of `sc.G`, `(n_in, n_in)` and `(n_in,)`.
    pattern: the budget per matrix or per N:M group.
    rho0, update_every, max_iter: the schedule (`admm.run_admm`).
    core_count: per selection unit, the size of MOSP's core [paper-
      summary, stage 1]: a second channel `(B_c, D_c, V_c)` updated with
      the same inverse (one matmul on both right-hand sides), projected
      on its top `core_count` inside the global support `supp(D)`. The
      schedule follows the global support only, so channel 0 is ALPS
      whatever the core does. 0 (or the whole budget, where the core is
      `supp(D)` itself) runs ALPS alone.

  Returns:
    `(Support, info)`.
  """
  n_in, n_out = sc.B0.shape
  unit = pattern.unit_keep(n_in, n_out)
  with_core = 0 < core_count < unit

  def project(Z: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    glob = projection.prune_mask(jnp.abs(Z[0]), pattern)
    if not with_core:
      return glob[None], ()
    core = projection.core_select(jnp.abs(Z[1]), pattern, core_count, glob)
    return jnp.stack([glob, core]), ()

  channels = 2 if with_core else 1
  B = jnp.broadcast_to(sc.B0, (channels, n_in, n_out))
  mask0, _ = project(B)
  it, _, info = admm_lib.run_admm(
      # The linear step is chosen by one channel's columns, not all of
      # them: channel 0 must run ALPS's own arithmetic, or the core channel
      # would switch narrow linears (n_in >= 3 n_out > n_in / 2, e.g.
      # SmolLM2's k/v projections, 576 x 192) to the explicit inverse and
      # W would differ from ALPS by rounding that ADMM's top-k amplifies.
      admm_lib.eig_solve(Q, L, n_out, update_every),
      sc.G @ sc.B0,
      (B, jnp.where(mask0, B, 0.0), jnp.zeros_like(B)), project,
      k=pattern.keep(n_in, n_out), rho0=rho0, adaptive=True,
      update_every=update_every, max_iter=max_iter)
  glob = it.mask[0]
  # Without a core channel the core is the rule's edge case: empty, or
  # the whole support.
  core = it.mask[1] if with_core else projection.core_select(
      jnp.abs(it.D[0]), pattern, core_count, glob)
  return Support(mask=glob, D=it.D[0], core=core), info


def scaled_eig(sc: Scaled, layout: sharding_lib.Layout | None
               ) -> tuple[jax.Array, jax.Array]:
  """`admm.eig(sc.G)`, spread over a mesh's devices when there is one."""
  if layout is None:
    return admm_lib.eig(sc.G)
  Q, L = layout.eig(sc.G[None])
  return Q[0], L[0]


def pinned(sc: Scaled, layout: sharding_lib.Layout | None) -> Scaled:
  """`sc` with `B0` split along columns on the mesh (if any)."""
  if layout is None:
    return sc
  return sc._replace(G=layout.constrain(sc.G, layout.replicated),
                     B0=layout.constrain(sc.B0, layout.weights))


@functools.partial(
    jax.jit, static_argnames=("pattern", "update_every", "max_iter",
                              "pcg_iters", "layout"))
def _alps(G: jax.Array, W0: jax.Array, rho0: float | jax.Array,
          damping: float | jax.Array, *, pattern: projection.Pattern,
          update_every: int, max_iter: int, pcg_iters: int,
          layout: sharding_lib.Layout | None = None
          ) -> tuple[jax.Array, jax.Array, AlpsInfo]:
  sc = pinned(scale_problem(G, W0, damping=damping), layout)
  Q, L = scaled_eig(sc, layout)
  sup, info = admm_support(sc, Q, L, pattern=pattern, rho0=rho0,
                           update_every=update_every, max_iter=max_iter)
  X, pinfo = pcg_lib.masked_pcg(sc.G, sc.B0, sup.mask, sup.D,
                                iters=pcg_iters)
  return X * (1.0 / sc.d)[:, None], sup.mask, AlpsInfo(info, pinfo)


def alps_prune(G: jax.Array, W0: jax.Array, *, pattern: projection.Pattern,
               cfg: SolverConfig = DEFAULT, mesh: Mesh | None = None
               ) -> tuple[jax.Array, jax.Array, AlpsInfo]:
  """Prunes one layer for one objective.

  Args:
    G: `(n_in, n_in)` Gram of the layer input (per-token mean), undamped.
    W0: `(n_in, n_out)` dense weights.
    pattern: `Unstructured(sparsity)` or `NM(n, m)`.
    cfg: hyperparameters (`rho0`, `update_every`, `max_iter`, `damping`,
      `pcg_iters` are used).
    mesh: optional `('tasks', 'cols')` device mesh (`sharding.make_mesh`):
      `W0` and the iterates are split along output columns over all its
      devices; `G` is replicated. Same masks as one device.

  Returns:
    `(W, mask, info)`: pruned weights `(n_in, n_out)` (exact zeros off
    `mask`), the support (exactly the budget), and diagnostics. On a mesh,
    `W` and `mask` stay split along columns.
  """
  layout, G, W0 = sharding_lib.place_layer(mesh, G, W0)
  rho0, damping = sharding_lib.scalars((cfg.rho0, cfg.damping), layout)
  return _alps(G, W0, rho0, damping, pattern=pattern,
               update_every=cfg.update_every, max_iter=cfg.max_iter,
               pcg_iters=cfg.pcg_iters, layout=layout)
