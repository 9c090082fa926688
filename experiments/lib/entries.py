"""What a comparison compares: one entry per method and protocol.

`experiments.compare` builds the entries from its flags; the whole-model
comparison (`comparison.compare_model`) walks each, the layer-level one
(`layer_compare.solve_layer`) solves each on one captured layer.
"""

from __future__ import annotations

from typing import NamedTuple

from mosp_jax.config import SolverConfig


class Entry(NamedTuple):
  """One set of points in a comparison.

  name: its label ('mosp', 'mosp[alpha=0]', 'mosp:W', 'alps-concat',
    'sparsegpt-mixed', 'magnitude').
  method: 'mosp' or one of `baselines.METHODS`.
  protocol: 'pareto' (MOSP's preference models), 'global' (MOSP's stage-1
    model W), 'concat' (one model on the concatenated calibration
    [paper-summary]), 'mixed' (one model per preference on `H_lam`
    [ours]) or 'data-free' (one model, no calibration).
  cfg: the solver hyperparameters of this entry.
  """
  name: str
  method: str
  protocol: str
  cfg: SolverConfig

