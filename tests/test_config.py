"""The hyperparameter dataclass: paper defaults and named validation."""

import dataclasses

import pytest
from absl import flags
from absl.testing import flagsaver

from mosp_jax.config import DEFAULT, PAPER, SolverConfig


def test_paper_settings():
  c = PAPER
  assert (c.alpha, c.p, c.rho0, c.update_every, c.stage2_rho,
          c.stage2_max_iter, c.damping, c.pcg_iters, c.max_iter) == (
              0.5, 0.5, 0.1, 3, 0.5, 10, 0.01, 10, 300)
  assert c.pref_map == "power" and c.pref_refit_iters == 0
  assert c.core_rule == "dual"


def test_defaults_differ_from_the_paper_in_three_fields_of_ours():
  assert DEFAULT == SolverConfig()
  differ = {f.name: getattr(DEFAULT, f.name)
            for f in dataclasses.fields(SolverConfig)
            if getattr(DEFAULT, f.name) != getattr(PAPER, f.name)}
  assert differ == {"core_rule": "global", "stage2_max_iter": 5,
                    "pref_refit_iters": 5}


def test_paper_flagfile_gives_the_papers_solver():
  from experiments.lib import shared_flags
  with flagsaver.flagsaver():
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["run", "--flagfile=experiments/configs/paper.flags",
                 "--out_dir=/nonexistent"])
    _, solver = shared_flags.configs_from_flags()
  assert solver == PAPER


def test_frozen():
  with pytest.raises(dataclasses.FrozenInstanceError):
    SolverConfig().alpha = 0.3


@pytest.mark.parametrize("field,value", [
    ("alpha", 1.5), ("alpha", float("nan")), ("p", 0.0), ("p", -1.0),
    ("pref_map", "softmax"), ("core_rule", "mean"), ("rho0", 0.0),
    ("update_every", 0),
    ("max_iter", 0), ("stage2_rho", -0.5), ("stage2_max_iter", -1),
    ("damping", -0.01), ("pcg_iters", -1), ("pref_refit_iters", -1)])
def test_bad_values_name_the_field(field, value):
  with pytest.raises(ValueError, match=f"^{field} must be"):
    SolverConfig(**{field: value})
