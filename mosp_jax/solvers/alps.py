"""Single-objective ALPS: ADMM with the rho schedule, then PCG on the support.

Used for one task's best case and for the mixed-Gram baseline (one run per
preference with `H_lam`). Meng et al., "ALPS: Improved Optimization for Highly
Sparse One-Shot Pruning for Large Language Models", NeurIPS 2024.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from mosp_jax.config import PAPER, SolverConfig
from mosp_jax.solvers import admm as admm_lib
from mosp_jax.solvers import pcg as pcg_lib
from mosp_jax.solvers import projection
from mosp_jax.solvers import sharding as sharding_lib
from mosp_jax.solvers.scaling import scale_problem


class AlpsInfo(NamedTuple):
  admm: admm_lib.AdmmInfo
  pcg: pcg_lib.PcgInfo


@functools.partial(
    jax.jit, static_argnames=("pattern", "update_every", "max_iter",
                              "pcg_iters", "layout"))
def _alps(G, W0, rho0, damping, *, pattern, update_every, max_iter,
          pcg_iters, layout=None):
  n_in, n_out = W0.shape
  sc = scale_problem(G[None], W0, damping=damping,
                     replicate=None if layout is None else layout.replicate)
  if layout is not None:
    sc = sc._replace(B0=layout.constrain(sc.B0, layout.weights))
  Q, L = admm_lib.eig(sc.G) if layout is None else layout.eig(sc.G)

  def project(Z):
    return jax.vmap(lambda z: projection.prune_mask(jnp.square(z),
                                                    pattern))(Z), ()

  B = sc.B0[None]
  mask0, _ = project(B)
  it, _, info = admm_lib.run_admm(
      Q, L, sc.G @ sc.B0, (B, jnp.where(mask0, B, 0.0), jnp.zeros_like(B)),
      project, k=pattern.keep(n_in, n_out), rho0=rho0, adaptive=True,
      update_every=update_every, max_iter=max_iter)
  X, pinfo = pcg_lib.masked_pcg(sc.G[0], sc.B0, it.mask[0], it.D[0],
                         iters=pcg_iters)
  return X * (1.0 / sc.d)[:, None], it.mask[0], AlpsInfo(info, pinfo)


def alps_prune(G: jax.Array, W0: jax.Array, *, pattern: projection.Pattern,
         cfg: SolverConfig = PAPER, mesh: Mesh | None = None
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
  layout = None
  if mesh is not None:
    layout = sharding_lib.layout_for(mesh)
    sharding_lib.check_layer(mesh, W0.shape[1])
    G = sharding_lib.place(G, layout.replicated)
    W0 = sharding_lib.place(W0, layout.weights)
  rho0, damping = sharding_lib.scalars((cfg.rho0, cfg.damping), layout)
  return _alps(G, W0, rho0, damping, pattern=pattern,
               update_every=cfg.update_every, max_iter=cfg.max_iter,
               pcg_iters=cfg.pcg_iters, layout=layout)
