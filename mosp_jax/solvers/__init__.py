"""Pure, jitted solvers for one linear layer (no model, data or I/O)."""

from mosp_jax.solvers.admm import AdmmInfo, Iterates, rho_step, run_admm
from mosp_jax.solvers.alps import AlpsInfo, alps_prune
from mosp_jax.solvers.mosp import (
  MospInfo,
  MospResult,
  ParetoLayer,
  combine_and_project,
  mosp_materialize,
  mosp_pareto,
  mosp_prune,
  pref_map,
  with_vertices,
)
from mosp_jax.solvers.pcg import PcgInfo, masked_pcg
from mosp_jax.solvers.projection import (
  NM,
  Pattern,
  Unstructured,
  nm_mask,
  prune_mask,
  task_masks,
  topk_mask,
)
from mosp_jax.solvers.scaling import (
  Scaled,
  concat_gram,
  damp,
  mixed_gram,
  relative_error,
  scale_problem,
)
from mosp_jax.solvers.sharding import Layout, make_mesh

__all__ = [
  "AdmmInfo", "AlpsInfo", "Iterates", "Layout", "MospInfo", "MospResult",
  "NM", "ParetoLayer", "Pattern", "PcgInfo", "Scaled", "Unstructured",
  "alps_prune", "concat_gram", "damp", "make_mesh", "masked_pcg",
  "combine_and_project", "mixed_gram", "mosp_materialize", "mosp_pareto",
  "mosp_prune", "nm_mask", "pref_map", "prune_mask", "relative_error",
  "rho_step", "run_admm", "scale_problem", "task_masks", "topk_mask",
  "with_vertices",
]
