"""Single-objective baselines for one linear layer, same layout and units.

Every method maps a Gram `H (n_in, n_in)` (undamped, per-token mean; for a
preference `lam` the mixed Gram `solvers.mixed_gram`) and dense weights
`W0 (n_in, n_out)` to pruned weights. The damped ones use
`solvers.damp` with `SolverConfig.damping`.

  magnitude  largest |W0| (ignores H)
  wanda      largest |W0| * sqrt(diag H) per output column
  sparsegpt  blocked OBS with lazy batch updates
  alps       ADMM + PCG (`solvers.alps_prune`), the single-objective
             counterpart of MOSP
"""

from __future__ import annotations

import jax

from mosp_jax.baselines.magnitude import magnitude_prune
from mosp_jax.baselines.sparsegpt import sparsegpt_prune
from mosp_jax.baselines.wanda import column_keep, wanda_prune
from mosp_jax.config import DEFAULT, SolverConfig
from mosp_jax.solvers import Pattern, alps_prune

METHODS = ("alps", "sparsegpt", "wanda", "magnitude")
# Methods whose weights do not depend on the calibration data.
DATA_FREE = frozenset({"magnitude"})


def prune_single(method: str, H: jax.Array | None, W0: jax.Array, *,
                 pattern: Pattern, cfg: SolverConfig = DEFAULT) -> jax.Array:
  """Pruned weights `(n_in, n_out)` of baseline `method` (one of
  `METHODS`) for the Gram `H` (None allowed for data-free methods)."""
  if method == "magnitude":
    return magnitude_prune(W0, pattern=pattern)[0]
  if H is None:
    raise ValueError(f"{method} needs a Gram")
  if method == "wanda":
    return wanda_prune(H, W0, pattern=pattern)[0]
  if method == "sparsegpt":
    return sparsegpt_prune(H, W0, pattern=pattern, damping=cfg.damping)[0]
  if method == "alps":
    return alps_prune(H, W0, pattern=pattern, cfg=cfg)[0]
  raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


__all__ = ["DATA_FREE", "METHODS", "column_keep", "magnitude_prune",
           "prune_single", "sparsegpt_prune", "wanda_prune"]
