"""MOSP on one linear layer: a Pareto set of pruned weights (METHOD.md 2-5).

  stage 1  joint ADMM over the m tasks with the coupled projection: a shared
           core S0 (floor(alpha k) weights) + each task's own support;
  stage 2  each task alone (vmap) with S0 frozen, from rho = 0.5;
  assemble for every preference lam (and every vertex e_i): the core plus
           the top of the preference-weighted saliency outside it, started
           from the lam-mix of the stage-2 iterates, refined by PCG on H_lam.

Deviations [ours], measured in docs/METHOD_NOTES.md: stage 2 starts at the
paper's rho = 0.5 but then follows the support-change schedule (a fixed 0.5
never lets the support settle in these units). The saliency and the warm
start of a preference use the stage-2 sparse iterates `D_i`, not PCG-refined
task weights; the task models are then exactly the preference models at the
vertices `e_i` (one code path, one PCG per model).
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
from mosp_jax.solvers.scaling import Replicate, Scaled, scale_problem


class ParetoLayer(NamedTuple):
  """The compact Pareto set of one layer (unscaled units).

  core: `(n_in, n_out)` bool, the shared support S0.
  task_sparse: `(m, n_in, n_out)`, stage-2 iterates `D_i / d` on S0 | S_i;
    with the Grams, any preference can be assembled from these.
  """
  core: jax.Array
  task_sparse: jax.Array


class MospInfo(NamedTuple):
  stage1: admm_lib.AdmmInfo      # scalars
  stage2: admm_lib.AdmmInfo      # each field `(m,)`
  pcg: pcg_lib.PcgInfo           # residual `(P, n_out)`


class MospResult(NamedTuple):
  """Models of one layer: rows 0..m-1 are the task vertices `e_i`, then the
  requested preferences.

  prefs: `(P, m)` the preferences of the rows below.
  masks: `(P, n_in, n_out)` bool supports, each exactly the budget.
  weights: `(P, n_in, n_out)` pruned weights, zero off the masks.
  pareto: the compact `ParetoLayer`.
  """
  prefs: jax.Array
  masks: jax.Array
  weights: jax.Array
  pareto: ParetoLayer
  info: MospInfo


def stage1(sc: Scaled, Q: jax.Array, L: jax.Array, *,
           pattern: projection.Pattern, alpha: float, p: float,
           rho0: jax.Array, update_every: int, max_iter: int,
           replicate: Replicate | None = None):
  """Joint ADMM over tasks. Returns `(core, Iterates, info)`.
  `replicate`: see `projection.mosp_masks` (on a device mesh)."""
  m, n_in, n_out = sc.G.shape[0], *sc.B0.shape

  def project(Z):
    core, masks = projection.mosp_masks(Z, pattern, alpha=alpha, p=p,
                                        replicate=replicate)
    return masks, core

  B = jnp.broadcast_to(sc.B0, (m, n_in, n_out))
  masks0, _ = project(B)
  D = jnp.where(masks0, B, 0.0)
  GB0 = sc.G @ sc.B0
  it, core, info = admm_lib.run_admm(
      Q, L, GB0, (B, D, jnp.zeros_like(B)), project,
      k=pattern.keep(n_in, n_out), rho0=rho0, adaptive=True,
      update_every=update_every, max_iter=max_iter)
  return core, it, info


def stage2(sc: Scaled, Q: jax.Array, L: jax.Array, core: jax.Array,
           warm: admm_lib.Iterates, *, pattern: projection.Pattern,
           alpha: float, rho: jax.Array, adaptive: bool, update_every: int,
           max_iter: int):
  """Each task alone with the core frozen (vmap over tasks).

  Args: `warm`, stage 1's iterates `(m, n_in, n_out)` (the dual carries
  over: it is the unscaled multiplier, valid for any rho); `rho`, the
  starting penalty; `adaptive`, whether it then follows the support-change
  schedule (ours, default) or stays fixed (paper). Returns
  `(Iterates with (m, n_in, n_out) fields, info with (m,) fields)`.
  """
  _, n_in, n_out = warm.B.shape
  count = pattern.unit_keep(n_in, n_out) - projection.core_count(
      pattern, n_in, n_out, alpha)

  def project(Z):
    own = projection.task_masks(Z, core, pattern, count)
    return own | core[None], ()

  def one(Qi, Li, GB0i, Bi, Di, Vi):
    it, _, info = admm_lib.run_admm(
        Qi[None], Li[None], GB0i[None], (Bi[None], Di[None], Vi[None]),
        project, k=pattern.keep(n_in, n_out), rho0=rho, adaptive=adaptive,
        update_every=update_every if adaptive else 1, max_iter=max_iter)
    return jax.tree.map(lambda a: a[0], it), info

  return jax.vmap(one)(Q, L, sc.G @ sc.B0, warm.B, warm.D, warm.V)


def assemble(sc: Scaled, core: jax.Array, D: jax.Array, prefs: jax.Array, *,
             pattern: projection.Pattern, alpha: float, pcg_iters: int,
             admm_iters: int = 0, rho: jax.Array | float = 0.5,
             update_every: int = 3, swap_rounds: int = 0):
  """Models for preferences `prefs (P, m)` from the stage-2 iterates.

  Support: core | top of `sum_i lam_i D_i^2 G_i[jj] / energy_i` outside the
  core; warm start `sum_i lam_i D_i`; `pcg_iters` PCG steps on
  `H_lam = sum_i lam_i G_i / energy_i`. With `admm_iters > 0` [ours] the
  support outside the core is then re-chosen by at most that many ADMM
  iterations on `H_lam` (core frozen, as stage 2; starting penalty `rho`
  relative to `H_lam`'s mean diagonal, the stage-2 schedule), started at
  the PCG model with its own multiplier `H_lam (B0 - X)`, so the first
  step is a gradient step; `pcg_iters` more PCG steps follow. Returns
  scaled `(X, masks, info)` (info: the last PCG's).
  """
  _, n_in, n_out = D.shape
  count = pattern.unit_keep(n_in, n_out) - projection.core_count(
      pattern, n_in, n_out, alpha)
  w = prefs * (1.0 / sc.energy)[None]             # (P, m)
  diag = jnp.diagonal(sc.G, axis1=1, axis2=2)     # (m, n_in)
  sal_i = jnp.square(D) * diag[:, :, None]        # (m, n_in, n_out)
  outside = jnp.logical_not(core)

  def one(lam, wl):
    sal = jnp.tensordot(wl, sal_i, axes=1)
    mask = core | projection.select(sal, pattern, count, outside)
    H = jnp.tensordot(wl, sc.G, axes=1)
    X0 = jnp.tensordot(lam, D, axes=1)
    X, info = pcg_lib.masked_pcg(H, sc.B0, mask, X0, iters=pcg_iters)
    if admm_iters > 0:
      X, mask, info = _refine_support(H, sc.B0, core, X, pattern=pattern,
                                      count=count, rho=rho,
                                      update_every=update_every,
                                      admm_iters=admm_iters,
                                      pcg_iters=pcg_iters)
    if swap_rounds > 0:
      X, mask, info = _swap_support(H, sc.B0, core, X, mask, info,
                                    pattern=pattern, count=count,
                                    rounds=swap_rounds, pcg_iters=pcg_iters)
    return X, mask, info

  return jax.vmap(one)(prefs, w)


def _swap_support(H, B0, core, X, mask, info, *, pattern, count, rounds,
                  pcg_iters):
  """Support swaps on one Gram: each round takes a Jacobi-scaled gradient
  step from `X`, keeps the core and the top `count` of its saliency
  outside it, and re-solves that support with PCG; returns the best
  model seen."""
  diag = jnp.diagonal(H)
  outside = jnp.logical_not(core)

  def objective(X):
    E = X - B0
    return jnp.sum(E * (H @ E))

  def body(_, carry):
    X, mask, best = carry
    Z = X + (H @ (B0 - X)) * (1.0 / diag)[:, None]
    new = core | projection.select(jnp.square(Z) * diag[:, None], pattern,
                                   count, outside)
    Xn, info = pcg_lib.masked_pcg(H, B0, new, jnp.where(new, Z, 0.0),
                                  iters=pcg_iters)
    better = objective(Xn) < objective(best[0])
    best = jax.tree.map(lambda a, b: jnp.where(better, a, b),
                        (Xn, new, info), best)
    return Xn, new, best

  _, _, best = jax.lax.fori_loop(0, rounds, body,
                                 (X, mask, (X, mask, info)))
  return best


def _refine_support(H, B0, core, X, *, pattern, count, rho, update_every,
                    admm_iters, pcg_iters):
  """ADMM on one Gram `H (n_in, n_in)` with `core` frozen, warm-started at
  `X` (optimal on its support), then PCG. See `assemble`."""
  n_in, n_out = B0.shape
  # rho is relative to a unit mean diagonal; H_lam's is sum_i w_i.
  Hn = H * (1.0 / jnp.mean(jnp.diagonal(H)))
  Q, L = admm_lib.eig(Hn[None])

  def project(Z):
    return projection.task_masks(Z, core, pattern, count) | core[None], ()

  V = Hn @ (B0 - X)  # The multiplier at which X is an ADMM fixed point.
  it, _, _ = admm_lib.run_admm(
      Q, L, (Hn @ B0)[None], (X[None], X[None], V[None]), project,
      k=pattern.keep(n_in, n_out), rho0=rho, adaptive=True,
      update_every=update_every, max_iter=admm_iters)
  X, info = pcg_lib.masked_pcg(Hn, B0, it.mask[0], it.D[0], iters=pcg_iters)
  return X, it.mask[0], info


@functools.partial(
    jax.jit, static_argnames=("pattern", "alpha", "p", "update_every",
                              "max_iter", "stage2_adaptive",
                              "stage2_max_iter", "layout"))
def _pareto(grams, W0, rho0, stage2_rho, damping, *, pattern, alpha, p,
            update_every, max_iter, stage2_adaptive, stage2_max_iter,
            layout=None):
  sc = _scaled(grams, W0, damping, layout)
  Q, L = admm_lib.eig(sc.G) if layout is None else layout.eig(sc.G)
  replicate = None if layout is None else layout.replicate
  core, it1, info1 = stage1(sc, Q, L, pattern=pattern, alpha=alpha, p=p,
                            rho0=rho0, update_every=update_every,
                            max_iter=max_iter, replicate=replicate)
  it2, info2 = stage2(sc, Q, L, core, it1, pattern=pattern, alpha=alpha,
                      rho=stage2_rho, adaptive=stage2_adaptive,
                      update_every=update_every, max_iter=stage2_max_iter)
  pareto = ParetoLayer(core=core,
                       task_sparse=it2.D * (1.0 / sc.d)[None, :, None])
  if layout is not None:
    pareto = ParetoLayer(
        core=layout.constrain(core, layout.weights),
        task_sparse=layout.constrain(pareto.task_sparse, layout.per_task))
  return pareto, (info1, info2)


def _scaled(grams, W0, damping, layout) -> Scaled:
  """`scale_problem`, with its outputs pinned to `layout` if any."""
  sc = scale_problem(grams, W0, damping=damping,
                     replicate=None if layout is None else layout.replicate)
  if layout is None:
    return sc
  return sc._replace(G=layout.constrain(sc.G, layout.replicated),
                     B0=layout.constrain(sc.B0, layout.weights))


@functools.partial(jax.jit,
                   static_argnames=("pattern", "alpha", "pcg_iters",
                                    "admm_iters", "update_every",
                                    "swap_rounds",
                                    "layout"))
def _materialize(grams, W0, pareto, prefs, damping, rho, *, pattern, alpha,
                 pcg_iters, admm_iters, update_every, swap_rounds,
                 layout=None):
  sc = _scaled(grams, W0, damping, layout)
  D = pareto.task_sparse * sc.d[None, :, None]
  X, masks, info = assemble(sc, pareto.core, D, prefs.astype(jnp.float32),
                            pattern=pattern, alpha=alpha,
                            pcg_iters=pcg_iters, admm_iters=admm_iters,
                            rho=rho, update_every=update_every,
                            swap_rounds=swap_rounds)
  X = X * (1.0 / sc.d)[None, :, None]
  if layout is not None:
    X = layout.constrain(X, layout.per_model)
    masks = layout.constrain(masks, layout.per_model)
  return X, masks, info


@jax.jit
def with_vertices(prefs: jax.Array) -> jax.Array:
  """`(K, m)` preferences -> `(m + K, m)`: the vertices `e_i` first."""
  m = prefs.shape[1]
  return jnp.concatenate([jnp.eye(m, dtype=jnp.float32),
                          prefs.astype(jnp.float32)], axis=0)


def _check_shapes(grams: jax.Array, W0: jax.Array,
                  prefs: jax.Array | None = None) -> None:
  if grams.ndim != 3 or grams.shape[1:] != (W0.shape[0],) * 2:
    raise ValueError(f"grams must be (m, {W0.shape[0]}, {W0.shape[0]}), "
                     f"got {grams.shape}")
  if prefs is not None and (prefs.ndim != 2 or
                            prefs.shape[1] != grams.shape[0]):
    raise ValueError(f"prefs must be (K, {grams.shape[0]}), got "
                     f"{prefs.shape}")


def _on_mesh(mesh: Mesh | None, grams, W0, n_models: int | None = None):
  """`(layout, grams, W0)`, the inputs placed on `mesh` (unchanged and
  `layout = None` without one)."""
  if mesh is None:
    return None, grams, W0
  layout = sharding_lib.layout_for(mesh, n_models)
  sharding_lib.check_layer(mesh, W0.shape[1])
  return (layout, sharding_lib.place(grams, layout.replicated),
          sharding_lib.place(W0, layout.weights))


def mosp_pareto(grams: jax.Array, W0: jax.Array, *,
                pattern: projection.Pattern, cfg: SolverConfig = PAPER,
                mesh: Mesh | None = None
                ) -> tuple[ParetoLayer, tuple[admm_lib.AdmmInfo,
                                              admm_lib.AdmmInfo]]:
  """Stages 1 and 2: the compact Pareto set of one layer.

  Args:
    grams: `(m, n_in, n_in)` per-token mean Grams `X_i^T X_i / N_i`,
      undamped.
    W0: `(n_in, n_out)` dense weights.
    pattern: `Unstructured(sparsity)` or `NM(n, m)`.
    cfg: hyperparameters.
    mesh: optional `('tasks', 'cols')` device mesh (`sharding.make_mesh`):
      the iterates are split along output columns over all its devices;
      same masks as on one device.

  Returns:
    `(ParetoLayer, (stage-1 info, stage-2 info with (m,) fields))`; on a
    mesh the Pareto set stays split over it.
  """
  _check_shapes(grams, W0)
  layout, grams, W0 = _on_mesh(mesh, grams, W0)
  # Explicit transfers: solvers run under jax.transfer_guard("disallow").
  scalars = sharding_lib.scalars((cfg.rho0, cfg.stage2_rho, cfg.damping),
                                 layout)
  return _pareto(grams, W0, *scalars, pattern=pattern, alpha=cfg.alpha,
                 p=cfg.p, update_every=cfg.update_every,
                 max_iter=cfg.max_iter, stage2_adaptive=cfg.stage2_adaptive,
                 stage2_max_iter=cfg.stage2_max_iter, layout=layout)


def mosp_materialize(grams: jax.Array, W0: jax.Array, pareto: ParetoLayer,
                     prefs: jax.Array, *, pattern: projection.Pattern,
                     cfg: SolverConfig = PAPER, mesh: Mesh | None = None
                     ) -> tuple[jax.Array, jax.Array, pcg_lib.PcgInfo]:
  """The models of preferences `prefs (P, m)` from a layer's Pareto set.

  The same inputs always give the same weights, so a run and a later
  export of one preference agree exactly. Returns `(weights (P, n_in,
  n_out), masks (P, n_in, n_out) bool, PcgInfo)`; on a `mesh` (as in
  `mosp_pareto`) weights and masks are split along columns, and along
  models over the mesh's task axis when its size divides `P`.
  """
  _check_shapes(grams, W0, prefs)
  layout, grams, W0 = _on_mesh(mesh, grams, W0, prefs.shape[0])
  if layout is not None:
    pareto = ParetoLayer(
        core=sharding_lib.place(pareto.core, layout.weights),
        task_sparse=sharding_lib.place(pareto.task_sparse,
                                       layout.per_task))
    prefs = sharding_lib.place(prefs, layout.replicated)
  damping, rho = sharding_lib.scalars((cfg.damping, cfg.stage2_rho), layout)
  return _materialize(grams, W0, pareto, prefs, damping, rho,
                      pattern=pattern, alpha=cfg.alpha,
                      pcg_iters=cfg.pcg_iters,
                      admm_iters=cfg.pref_admm_iters,
                      update_every=cfg.update_every,
                      swap_rounds=cfg.pref_swap_rounds, layout=layout)


def mosp_prune(grams: jax.Array, W0: jax.Array, prefs: jax.Array, *,
               pattern: projection.Pattern,
               cfg: SolverConfig = PAPER,
               mesh: Mesh | None = None) -> MospResult:
  """Prunes one layer for `m` tasks: `mosp_pareto` then `mosp_materialize`
  of the task vertices `e_i` followed by `prefs (K, m)` (may be `(0, m)`).

  Returns:
    `MospResult` with `m + K` models: the task vertices, then `prefs`
    (split over `mesh` if one is given, see `mosp_pareto`).
  """
  _check_shapes(grams, W0, prefs)
  layout, grams, W0 = _on_mesh(mesh, grams, W0)
  if layout is not None:
    prefs = sharding_lib.place(prefs, layout.replicated)
  pareto, (info1, info2) = mosp_pareto(grams, W0, pattern=pattern, cfg=cfg,
                                       mesh=mesh)
  all_prefs = with_vertices(prefs)
  weights, masks, pinfo = mosp_materialize(grams, W0, pareto, all_prefs,
                                           pattern=pattern, cfg=cfg,
                                           mesh=mesh)
  return MospResult(prefs=all_prefs, masks=masks, weights=weights,
                    pareto=pareto, info=MospInfo(info1, info2, pinfo))
