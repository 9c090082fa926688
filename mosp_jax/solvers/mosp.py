"""MOSP on one linear layer: a Pareto set of pruned weights.

The paper's algorithm (Chen et al., NeurIPS 2025; docs/METHOD_NOTES.md,
"One linear layer"), for `m` tasks with Grams `G_i` and the concatenated Gram
`H = mean_i G_i`:

  stage 1  one dual ADMM on `H` [paper-summary]: the global model `W` (the
           ALPS iterates, `k` weights) and the core `W_c` (`floor(alpha k)`
           weights inside `supp(W)`), both through one eigendecomposition
           of `H`; the rho schedule follows `supp(W)`. Then PCG refines
           `W` on `H`, so `W` is exactly ALPS on the concatenated data.
           Option [ours] (`core_rule='global'`): ALPS alone, the core the
           top `floor(alpha k)` of the refined `|W|`
           (`projection.core_select`).
  stage 2  per task (vmap) [paper-summary]: ADMM on `G_i` from `W`, core
           `S_c` frozen, fixed `rho = 0.5`, one factorisation, at most 10
           iterations.
  stage 3  PCG of every task model on its support [paper], vectorised over
           tasks: the task models `W_i`.
  any lam  `W_lam = P_{k,S_c}(W + sum_i lam'_i (W_i - W))`, `lam' = T_p(lam)`
           [paper-summary]: a weighted sum and a projection, no Gram, no
           solve (`combine_and_project`); optionally refitted on `H_lam`
           [ours, on by default] (`refit`).

The compact Pareto set of a layer is `ParetoLayer(core, W, W_tasks, d)`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mosp_jax.config import DEFAULT, SolverConfig
from mosp_jax.solvers import admm as admm_lib
from mosp_jax.solvers import alps as alps_lib
from mosp_jax.solvers import pcg as pcg_lib
from mosp_jax.solvers import projection
from mosp_jax.solvers import sharding as sharding_lib
from mosp_jax.solvers.scaling import (
  concat_gram,
  mixed_gram,
  scale_problem,
  scale_tasks,
)


class ParetoLayer(NamedTuple):
  """The compact Pareto set of one linear (unscaled units).

  core: `(n_in, n_out)` bool, the shared core support `S_c`.
  W: `(n_in, n_out)`, the global model (ALPS on `H`), zero off its support.
  W_tasks: `(m, n_in, n_out)`, the task models `W_i`, each zero off its
    support, which contains `S_c`.
  d: `(n_in,)`, the column scale `sqrt(diag(H + damping))`; preference
    supports rank `|d_j w_jo|` (ALPS's scaled units).

  The solver returns device arrays; `jax.device_get` of one and
  `pipeline.artifact.load_layer` give numpy arrays.
  """
  core: jax.Array | np.ndarray
  W: jax.Array | np.ndarray
  W_tasks: jax.Array | np.ndarray
  d: jax.Array | np.ndarray


class MospInfo(NamedTuple):
  """Diagnostics of `mosp_pareto`.

  stage1: the dual ADMM (scalars).
  stage2: the task ADMMs, each field `(m,)`.
  pcg: PCG of `W` on `H` (`residual (n_out,)`).
  task_pcg: PCG of the task models (`residual (m, n_out)`).
  """
  stage1: admm_lib.AdmmInfo
  stage2: admm_lib.AdmmInfo
  pcg: pcg_lib.PcgInfo
  task_pcg: pcg_lib.PcgInfo


class MospResult(NamedTuple):
  """Models of one layer: rows 0..m-1 are the task vertices `e_i` (the
  task models), then the requested preferences.

  prefs: `(P, m)` the preferences of the rows below.
  masks: `(P, n_in, n_out)` bool supports, each exactly the budget.
  weights: `(P, n_in, n_out)` pruned weights, zero off the masks.
  pareto: the compact `ParetoLayer`.
  info: `MospInfo`.
  """
  prefs: jax.Array
  masks: jax.Array
  weights: jax.Array
  pareto: ParetoLayer
  info: MospInfo


def stage2(G: jax.Array, B0: jax.Array, core: jax.Array, X: jax.Array, *,
           pattern: projection.Pattern, alpha: float, rho: jax.Array,
           max_iter: int) -> tuple[admm_lib.Iterates, admm_lib.AdmmInfo]:
  """Task-specific ADMM, vmapped over tasks [paper-summary].

  For each task `i`: minimise `tr((B - B0)^T G_i (B - B0))` with at most
  `k` weights and `core` inside the support, from the global model `X`
  (`B = D = X`, `V = 0` [ours: the summary says only "from W"]), at the
  fixed penalty `rho` (one factorisation of `G_i + rho I`), stopping when
  the support no longer changes or after `max_iter` iterations. Its
  projection is `P_{k,S_c}`: the core plus the top `k - |S_c|` of `|Z|`
  outside it.

  Args:
    G: `(m, n_in, n_in)` scaled task Grams (`scaling.scale_tasks`).
    B0, X: `(n_in, n_out)` scaled dense and global weights.
    core: `(n_in, n_out)` bool.

  Returns:
    `(Iterates with (m, n_in, n_out) fields, info with (m,) fields)`.
  """
  n_in, n_out = B0.shape
  count = pattern.unit_keep(n_in, n_out) - projection.core_count(
      pattern, n_in, n_out, alpha)

  def project(Z: jax.Array) -> tuple[jax.Array, tuple[()]]:
    return projection.task_masks(Z, core, pattern, count) | core[None], ()

  # One factorisation per task, one after another (`cholesky_inverse`).
  inverses = jax.lax.map(lambda g: admm_lib.cholesky_inverse(g, rho), G)

  def one(Gi: jax.Array, inverse: jax.Array
          ) -> tuple[admm_lib.Iterates, admm_lib.AdmmInfo]:
    B = X[None]
    mask, _ = project(B)
    it, _, info = admm_lib.run_admm(
        admm_lib.fixed_solve(inverse), Gi @ B0,
        (B, jnp.where(mask, B, 0.0), jnp.zeros_like(B)), project,
        k=pattern.keep(n_in, n_out), rho0=rho, adaptive=False,
        update_every=1, max_iter=max_iter)
    return jax.tree.map(lambda a: a[0], it), info

  return jax.vmap(one)(G, inverses)


def pref_map(prefs: jax.Array, *, p: float, kind: str = "power"
             ) -> jax.Array:
  """`T_p`: preferences `(P, m)` -> interpolation weights `(P, m)`.

  'power' `lam_i^(1/p)` [ours; the paper's form is not known]: vertices
  map to themselves, interior points shrink toward the global model
  (`p < 1`); 'normalized' divides that by its sum (interior points stay
  between the task models). `p = 1` with 'power' is the identity.
  """
  lam = prefs.astype(jnp.float32)
  if p != 1.0:
    lam = jnp.where(lam > 0, lam, 0.0) ** (1.0 / p)
  if kind == "normalized":
    total = jnp.sum(lam, axis=1, keepdims=True)
    lam = lam * (1.0 / jnp.where(total > 0, total, 1.0))
  return lam


def combine_and_project(pareto: ParetoLayer, prefs: jax.Array, *,
                        pattern: projection.Pattern, alpha: float, p: float,
                        kind: str = "power") -> tuple[jax.Array, jax.Array]:
  """The models of preferences `prefs (P, m)` [paper-summary].

  `W_lam = P_{k,S_c}(W + sum_i lam'_i (W_i - W))` with `lam' = T_p(lam)`,
  written `(1 - sum_i lam'_i) W + sum_i lam'_i W_i` so that a vertex
  `e_i` gives `W_i` exactly. `P_{k,S_c}` keeps the core and the top
  `k - |S_c|` of `|d_j w_jo|` outside it per selection unit; the values
  are the mix's, unrefitted. Elementwise work and one top-k per model
  (a batch of another size may round the mix differently in the last
  bit: XLA fuses it differently).

  Returns:
    `(weights (P, n_in, n_out), masks (P, n_in, n_out) bool)`.
  """
  mix = weighted_sum(pareto, prefs, p=p, kind=kind)
  score = mix * pareto.d[None, :, None]
  masks = projection.task_masks(score, pareto.core, pattern,
                                outside_count(pattern, pareto, alpha)) | \
      pareto.core[None]
  return jnp.where(masks, mix, 0.0), masks


def weighted_sum(pareto: ParetoLayer, prefs: jax.Array, *, p: float,
                 kind: str = "power") -> jax.Array:
  """`(P, n_in, n_out)` mixes `(1 - sum_i lam'_i) W + sum_i lam'_i W_i`
  of preferences `prefs (P, m)`, `lam' = T_p(lam)`, before projection."""
  lam = pref_map(prefs, p=p, kind=kind)[:, :, None, None]   # (P, m, 1, 1)
  mix = (1.0 - jnp.sum(lam, axis=1)) * pareto.W[None]
  for i in range(pareto.W_tasks.shape[0]):
    mix = mix + lam[:, i] * pareto.W_tasks[i][None]
  return mix


def outside_count(pattern: projection.Pattern, pareto: ParetoLayer,
                  alpha: float) -> int:
  """Weights a preference model keeps outside the core, per unit."""
  n_in, n_out = pareto.W.shape
  return pattern.unit_keep(n_in, n_out) - projection.core_count(
      pattern, n_in, n_out, alpha)


class Reselect(NamedTuple):
  """What choosing a preference's support on its own Gram needs: the
  unprojected mixes `(P, n_in, n_out)`, the core, the pattern and the
  weights kept outside the core per unit (`outside_count`)."""
  mix: jax.Array
  core: jax.Array | np.ndarray
  pattern: projection.Pattern
  keep: int


def refit(grams: jax.Array, W0: jax.Array, weights: jax.Array,
          masks: jax.Array, prefs: jax.Array, *, damping: jax.Array,
          iters: int, reselect: Reselect | None = None
          ) -> tuple[jax.Array, jax.Array]:
  """[ours] Each interior preference model's values refitted on its
  support: `iters` PCG steps on `H_lam` (`scaling.mixed_gram`, the Gram
  of `F_lam = sum_i lam_i f_i`, damped and scaled as ALPS's), from the
  projected mix. Vertices `e_i` keep the task models unchanged.

  With `reselect` the support outside the core is first chosen again:
  the top of the mix's `|w_jo|` in `H_lam`'s own scale `sqrt(H_lam,jj)`
  instead of the concatenated Gram's (`cfg.pref_support='own'`).

  Args: `grams (m, n_in, n_in)`, `W0 (n_in, n_out)`, `weights, masks
  (P, n_in, n_out)` (the projected mixes), `prefs (P, m)`.
  Returns `(weights, masks)`, each `(P, n_in, n_out)`.
  """
  def one(W: jax.Array, mask: jax.Array, lam: jax.Array,
          mix: jax.Array) -> tuple[jax.Array, jax.Array]:
    sc = scale_problem(mixed_gram(grams, W0, lam), W0, damping=damping)
    if reselect is not None:
      mask = projection.task_masks(
          (mix * sc.d[:, None])[None], reselect.core, reselect.pattern,
          reselect.keep)[0] | reselect.core
      W = jnp.where(mask, mix, 0.0)
    X, _ = pcg_lib.masked_pcg(sc.G, sc.B0, mask, W * sc.d[:, None],
                              iters=iters)
    return X * (1.0 / sc.d)[:, None], mask

  vertex = (jnp.max(prefs, axis=1) >= 1.0)[:, None, None]
  mixes = weights if reselect is None else reselect.mix
  W, M = jax.vmap(one)(weights, masks, prefs, mixes)
  return jnp.where(vertex, weights, W), jnp.where(vertex, masks, M)


@functools.partial(
    jax.jit, static_argnames=("pattern", "alpha", "update_every",
                              "max_iter", "stage2_max_iter", "pcg_iters",
                              "core_rule", "layout"))
def _pareto(grams: jax.Array, W0: jax.Array, rho0: float | jax.Array,
            stage2_rho: jax.Array, damping: float | jax.Array, *,
            pattern: projection.Pattern, alpha: float, update_every: int,
            max_iter: int, stage2_max_iter: int, pcg_iters: int,
            core_rule: str = "dual",
            layout: sharding_lib.Layout | None = None
            ) -> tuple[ParetoLayer, MospInfo]:
  n_in, n_out = W0.shape
  sc = alps_lib.pinned(scale_problem(concat_gram(grams), W0,
                                     damping=damping), layout)
  Q, L = alps_lib.scaled_eig(sc, layout)
  count = projection.core_count(pattern, n_in, n_out, alpha)
  dual = core_rule == "dual"
  sup, info1 = alps_lib.admm_support(
      sc, Q, L, pattern=pattern, rho0=rho0, update_every=update_every,
      max_iter=max_iter, core_count=count if dual else 0)
  X, pinfo = pcg_lib.masked_pcg(sc.G, sc.B0, sup.mask, sup.D,
                                iters=pcg_iters)
  if not dual:
    # [ours] The core from the refined |W| (scaled units) inside supp(W).
    sup = sup._replace(core=projection.core_select(jnp.abs(X), pattern,
                                                   count, sup.mask))
  G = scale_tasks(grams, sc.d, damping=damping)
  if layout is not None:
    G = layout.constrain(G, layout.replicated)
  it2, info2 = stage2(G, sc.B0, sup.core, X, pattern=pattern, alpha=alpha,
                      rho=stage2_rho, max_iter=stage2_max_iter)
  Xt, tinfo = jax.vmap(
      lambda g, mask, D: pcg_lib.masked_pcg(g, sc.B0, mask, D,
                                            iters=pcg_iters))(
      G, it2.mask, it2.D)
  inv = (1.0 / sc.d)[:, None]
  pareto = ParetoLayer(core=sup.core, W=X * inv, W_tasks=Xt * inv[None],
                       d=sc.d)
  if layout is not None:
    pareto = ParetoLayer(
        core=layout.constrain(pareto.core, layout.weights),
        W=layout.constrain(pareto.W, layout.weights),
        W_tasks=layout.constrain(pareto.W_tasks, layout.per_task),
        d=layout.constrain(pareto.d, layout.replicated))
  return pareto, MospInfo(info1, info2, pinfo, tinfo)


@functools.partial(jax.jit,
                   static_argnames=("pattern", "alpha", "p", "kind",
                                    "refit_iters", "support", "layout"))
def _preference_models(pareto: ParetoLayer, prefs: jax.Array,
                       grams: jax.Array, W0: jax.Array, damping: jax.Array,
                       *, pattern: projection.Pattern, alpha: float,
                       p: float, kind: str, refit_iters: int,
                       support: str = "mix",
                       layout: sharding_lib.Layout | None = None
                       ) -> tuple[jax.Array, jax.Array]:
  W, masks = combine_and_project(pareto, prefs, pattern=pattern,
                                 alpha=alpha, p=p, kind=kind)
  if refit_iters > 0:
    reselect = None if support == "mix" else Reselect(
        weighted_sum(pareto, prefs, p=p, kind=kind), pareto.core, pattern,
        outside_count(pattern, pareto, alpha))
    # A batch of vertices alone (a run materialises one preference at a
    # time) skips the refit's work, which `refit` would discard.
    W, masks = jax.lax.cond(
        jnp.all(jnp.max(prefs, axis=1) >= 1.0),
        lambda: (W, masks),
        lambda: refit(grams, W0, W, masks, prefs, damping=damping,
                      iters=refit_iters, reselect=reselect))
  if layout is not None:
    W = layout.constrain(W, layout.per_model)
    masks = layout.constrain(masks, layout.per_model)
  return W, masks


@jax.jit
def with_vertices(prefs: jax.Array) -> jax.Array:
  """`(K, m)` preferences -> `(m + K, m)`: the vertices `e_i` first."""
  m = prefs.shape[1]
  return jnp.concatenate([jnp.eye(m, dtype=jnp.float32),
                          prefs.astype(jnp.float32)], axis=0)


def _check_shapes(grams: jax.Array, W0: jax.Array) -> None:
  if grams.ndim != 3 or grams.shape[1:] != (W0.shape[0],) * 2:
    raise ValueError(f"grams must be (m, {W0.shape[0]}, {W0.shape[0]}), "
                     f"got {grams.shape}")


def _check_prefs(prefs: jax.Array, m: int) -> None:
  if prefs.ndim != 2 or prefs.shape[1] != m:
    raise ValueError(f"prefs must be (K, {m}), got {prefs.shape}")


def mosp_pareto(grams: jax.Array, W0: jax.Array, *,
                pattern: projection.Pattern, cfg: SolverConfig = DEFAULT,
                mesh: Mesh | None = None) -> tuple[ParetoLayer, MospInfo]:
  """Stages 1-3: the compact Pareto set of one layer.

  Args:
    grams: `(m, n_in, n_in)` per-token mean Grams `X_i^T X_i / N_i`,
      undamped, one per task (the same token count `N_i` for every task:
      their mean is the concatenated Gram).
    W0: `(n_in, n_out)` dense weights.
    pattern: `Unstructured(sparsity)` or `NM(n, m)`.
    cfg: hyperparameters.
    mesh: optional `('tasks', 'cols')` device mesh (`sharding.make_mesh`):
      the iterates are split along output columns over all its devices;
      same masks as on one device.

  Returns:
    `(ParetoLayer, MospInfo)`; on a mesh the Pareto set stays split.
  """
  _check_shapes(grams, W0)
  layout, grams, W0 = sharding_lib.place_layer(mesh, grams, W0)
  # Explicit transfers: solvers run under jax.transfer_guard("disallow").
  scalars = sharding_lib.scalars((cfg.rho0, cfg.stage2_rho, cfg.damping),
                                 layout)
  return _pareto(grams, W0, *scalars, pattern=pattern, alpha=cfg.alpha,
                 update_every=cfg.update_every, max_iter=cfg.max_iter,
                 stage2_max_iter=cfg.stage2_max_iter,
                 pcg_iters=cfg.pcg_iters, core_rule=cfg.core_rule,
                 layout=layout)


def mosp_materialize(pareto: ParetoLayer, prefs: jax.Array, *,
                     pattern: projection.Pattern, cfg: SolverConfig = DEFAULT,
                     mesh: Mesh | None = None,
                     grams: jax.Array | None = None,
                     W0: jax.Array | None = None
                     ) -> tuple[jax.Array, jax.Array]:
  """The models of preferences `prefs (P, m)` from a layer's Pareto set
  alone (no Gram, no solve; see `combine_and_project`).

  With `cfg.pref_refit_iters > 0` [ours, the default] the interior
  models are then refitted (`refit`), which needs the task `grams (m,
  n_in, n_in)` and the dense `W0 (n_in, n_out)`; with `cfg=PAPER` (the
  paper's construction) they are ignored and no Gram is read.

  Returns `(weights (P, n_in, n_out), masks (P, n_in, n_out) bool)`; on
  a `mesh` they are split along columns, and along models over the
  mesh's task axis when its size divides `P`.
  """
  _check_prefs(prefs, pareto.W_tasks.shape[0])
  if cfg.pref_refit_iters > 0:
    if grams is None or W0 is None:
      raise ValueError("pref_refit_iters > 0 refits on the task Grams: "
                       "pass grams and W0, or cfg=config.PAPER for the "
                       "paper's construction (no Gram)")
    _check_shapes(grams, W0)
  else:
    grams = W0 = None
  layout = None
  if mesh is not None:
    layout = sharding_lib.layout_for(mesh, prefs.shape[0])
    sharding_lib.check_layer(mesh, pareto.W.shape[1])
    pareto = ParetoLayer(
        core=sharding_lib.place(pareto.core, layout.weights),
        W=sharding_lib.place(pareto.W, layout.weights),
        W_tasks=sharding_lib.place(pareto.W_tasks, layout.per_task),
        d=sharding_lib.place(pareto.d, layout.replicated))
    prefs = sharding_lib.place(prefs, layout.replicated)
    if grams is not None and W0 is not None:  # both or neither, as above
      _, grams, W0 = sharding_lib.place_layer(mesh, grams, W0)
  (damping,) = sharding_lib.scalars((cfg.damping,), layout)
  return _preference_models(pareto, prefs, grams, W0, damping,
                            pattern=pattern, alpha=cfg.alpha, p=cfg.p,
                            kind=cfg.pref_map,
                            refit_iters=cfg.pref_refit_iters,
                            support=cfg.pref_support, layout=layout)


def mosp_prune(grams: jax.Array, W0: jax.Array, prefs: jax.Array, *,
               pattern: projection.Pattern, cfg: SolverConfig = DEFAULT,
               mesh: Mesh | None = None) -> MospResult:
  """Prunes one layer for `m` tasks: `mosp_pareto`, then `mosp_materialize`
  of the task vertices `e_i` followed by `prefs (K, m)` (may be `(0, m)`).

  Returns:
    `MospResult` with `m + K` models: the task models, then `prefs`
    (split over `mesh` if one is given, see `mosp_pareto`).
  """
  _check_shapes(grams, W0)
  _check_prefs(prefs, grams.shape[0])
  pareto, info = mosp_pareto(grams, W0, pattern=pattern, cfg=cfg, mesh=mesh)
  all_prefs = with_vertices(prefs)
  weights, masks = mosp_materialize(pareto, all_prefs, pattern=pattern,
                                    cfg=cfg, mesh=mesh, grams=grams, W0=W0)
  return MospResult(prefs=all_prefs, masks=masks, weights=weights,
                    pareto=pareto, info=info)
