"""The hyperparameter dataclass: paper defaults and named validation."""

import dataclasses

import pytest

from mosp_jax.config import SolverConfig


def test_paper_defaults():
  c = SolverConfig()
  assert (c.alpha, c.p, c.rho0, c.update_every, c.stage2_rho, c.damping,
          c.pcg_iters, c.max_iter) == (0.5, 0.5, 0.1, 3, 0.5, 0.01, 10, 300)


def test_frozen():
  with pytest.raises(dataclasses.FrozenInstanceError):
    SolverConfig().alpha = 0.3


@pytest.mark.parametrize("field,value", [
    ("alpha", 1.5), ("p", -1.0), ("rho0", 0.0), ("update_every", 0),
    ("max_iter", 0), ("stage2_rho", -0.5), ("stage2_max_iter", 0),
    ("damping", -0.01), ("pcg_iters", -1),
    ("pref_admm_iters", -1), ("pref_swap_rounds", -2)])
def test_bad_values_name_the_field(field, value):
  with pytest.raises(ValueError, match=f"^{field} must be"):
    SolverConfig(**{field: value})
