"""One linear of one decoder layer: its problem, solved by any method.

The field's model is SparseGPT's one object per linear (it holds the
linear's Gram and prunes it); here the object is a frozen value
[ours]: `LinearProblem(name, W0, grams, pattern)` holds the dense kernel,
the task Grams of its group and the sparsity pattern, and every caller
solves and measures through it:

  for prob in layer_problems(adapter, dense, gram_of, pattern=pattern):
    pareto, info = prob.pareto(cfg)                 # MOSP, stages 1-3
    W, masks = prob.preference_models(pareto, prefs, cfg)
    W_sgpt = prob.baseline("sparsegpt", "concat", cfg)
    errors, zeros = prob.errors(W)

MOSP's walk (`prune.py`), the baselines' walk (`single_objective.py`),
the export (`bridge/pruned.py`) and the layer-level comparison
(`experiments/lib/layer_compare.py`) all use it, so a rule (which Gram a
protocol prunes on, when a preference needs the Grams) is written once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp

from mosp_jax import baselines
from mosp_jax.config import SolverConfig
from mosp_jax.models.base import Adapter, Params
from mosp_jax.solvers import (
  MospInfo,
  ParetoLayer,
  Pattern,
  concat_gram,
  mixed_gram,
  mosp_materialize,
  mosp_pareto,
  sharding,
)

# Baseline protocols (`single_objective.py`): the Gram a baseline prunes
# on. 'concat' [paper-summary]: the concatenated data's `mean_i G_i`;
# 'mixed' [ours]: `H_lam` of one preference; 'data-free': none.
PROTOCOLS = ("concat", "mixed", "data-free")

# Gram combinations of the baselines, jitted once for every caller.
mixed_gram_jit = jax.jit(mixed_gram)
concat_gram_jit = jax.jit(concat_gram)


def needs_grams(cfg: SolverConfig) -> bool:
  """Whether materialising a preference needs the task Grams (and so a
  run keeps them with its Pareto set): exactly under the preference
  refit (`cfg.pref_refit_iters > 0`) [ours]; the paper's weighted sum and
  projection reads none."""
  return cfg.pref_refit_iters > 0


@jax.jit
def model_stats(grams: jax.Array, W0: jax.Array,
                W: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`(P, m)` relative reconstruction error of each of the models
  `W (P, n, o)` on each task's Gram `grams (m, n, n)` against the dense
  `W0 (n, o)`, and `(P,)` exact zeros per model."""
  E = W - W0[None]                                        # (P, n, o)
  num = jnp.einsum("pio,mij,pjo->pm", E, grams, E)
  den = jnp.einsum("io,mij,jo->m", W0, grams, W0)
  return (num / jnp.where(den > 0, den, 1.0)[None],
          jnp.sum(W == 0, axis=(1, 2)))


@dataclasses.dataclass(frozen=True)
class LinearProblem:
  """What pruning one linear needs; every array on the device.

  Attributes:
    name: the linear's name in its layer ('self_attn.q_proj').
    W0: `(n_in, n_out)` float32 dense kernel.
    grams: `(m, n_in, n_in)` float32 per-token mean task Grams of the
      linear's input (shared by its group), undamped; None where no data
      is used (a data-free baseline, or a preference materialised
      without the refit).
    pattern: the sparsity pattern, i.e. the budget
      (`pattern.keep(n_in, n_out)` weights kept).
  """

  name: str
  W0: jax.Array
  grams: jax.Array | None
  pattern: Pattern

  def _task_grams(self) -> jax.Array:
    if self.grams is None:
      raise ValueError(f"{self.name}: this solve needs the task Grams")
    return self.grams

  def pareto(self, cfg: SolverConfig, *,
             mesh: jax.sharding.Mesh | None = None
             ) -> tuple[ParetoLayer, MospInfo]:
    """MOSP's compact Pareto set and diagnostics (`mosp_pareto`); on a
    `mesh` solved split over its devices and returned on `W0`'s."""
    out = mosp_pareto(self._task_grams(), self.W0, pattern=self.pattern,
                      cfg=cfg, mesh=mesh)
    return out if mesh is None else sharding.to_local(out, self.W0)

  def preference_models(self, pareto: ParetoLayer, prefs: jax.Array,
                        cfg: SolverConfig) -> tuple[jax.Array, jax.Array]:
    """The models of preferences `prefs (P, m)` from the linear's Pareto
    set (`mosp_materialize`): `(weights, masks)`, each `(P, n_in,
    n_out)`; the Grams are read exactly when `needs_grams(cfg)`."""
    refit = needs_grams(cfg)
    return mosp_materialize(
        pareto, prefs, pattern=self.pattern, cfg=cfg,
        grams=self._task_grams() if refit else None,
        W0=self.W0 if refit else None)

  def baseline_gram(self, protocol: str,
                    lam: jax.Array | None = None) -> jax.Array | None:
    """The Gram a baseline prunes on under `protocol` (`PROTOCOLS`):
    'concat' `mean_i G_i`, 'mixed' `H_lam` of `lam (m,)`, 'data-free'
    None."""
    if protocol == "data-free":
      return None
    if protocol == "concat":
      return concat_gram_jit(self._task_grams())
    if protocol == "mixed":
      if lam is None:
        raise ValueError("the 'mixed' protocol needs a preference lam")
      return mixed_gram_jit(self._task_grams(), self.W0, lam)
    raise ValueError(f"protocol must be one of {PROTOCOLS}, got "
                     f"{protocol!r}")

  def baseline(self, method: str, protocol: str, cfg: SolverConfig, *,
               lam: jax.Array | None = None) -> jax.Array:
    """`(n_in, n_out)` weights of baseline `method`
    (`baselines.METHODS`) on `baseline_gram(protocol, lam)`."""
    return baselines.prune_single(method, self.baseline_gram(protocol, lam),
                                  self.W0, pattern=self.pattern, cfg=cfg)

  def errors(self, W: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`model_stats` of models `W (P, n_in, n_out)` on the task Grams:
    `(P, m)` relative errors and `(P,)` exact zeros."""
    return model_stats(self._task_grams(), self.W0, W)


def layer_problems(adapter: Adapter, layer_params: Params,
                   grams: Callable[[str], jax.Array | None], *,
                   pattern: Pattern) -> Iterator[LinearProblem]:
  """The problems of one decoder layer's linears, in the adapter's order
  (`linear_groups`), each kernel read when its problem is reached.

  Args:
    adapter: the family adapter.
    layer_params: the layer's dense parameter subtree (device or host
      arrays; the kernels are put on the device as float32).
    grams: `key -> (m, n_in, n_in)` device Grams of a group or None,
      called once per group when the group is reached (key: the group's
      first linear), so a caller can move or free a group's Grams then.
    pattern: the sparsity pattern of every linear.
  """
  for group in adapter.linear_groups():
    G = grams(group[0])
    for name in group:
      W0 = jax.device_put(adapter.get_layer_kernel(layer_params, name))
      yield LinearProblem(name, W0.astype(jnp.float32), G, pattern)
