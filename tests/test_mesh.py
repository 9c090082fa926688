"""Solvers on a device mesh: sharded runs equal one-device runs.

The sharded checks need 4 devices, which on CPU means
`XLA_FLAGS=--xla_force_host_platform_device_count=4` before JAX starts, so
they run once in a subprocess (`tests/mesh_worker.py`) that prints JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from experiments.lib import shared_flags
from mosp_jax.solvers import sharding

from .conftest import ROOT

CASES = [(spec, pattern) for spec in ("4", "2x2")
         for pattern in ("unstructured", "2:4")]


@pytest.fixture(scope="module")
def worker() -> dict:
  env = dict(os.environ,
             XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "tests.mesh_worker"],
                        cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _case(worker: dict, spec: str, pattern: str) -> dict:
  (case,) = [c for c in worker["cases"]
             if c["mesh"] == spec and c["pattern"] == pattern]
  return case


@pytest.mark.parametrize("spec,pattern", CASES)
def test_sharded_equals_single_device(worker, spec, pattern):
  c = _case(worker, spec, pattern)
  assert worker["device_count"] == 4
  assert c["devices"] == {"W_tasks": 4, "weights": 4, "alps": 4}
  # MOSP (pareto + materialize): identical masks, same iterations,
  # objectives (relative errors per model and task) to 1e-6.
  assert c["mosp_masks_equal"] and c["core_equal"] and c["global_equal"]
  assert c["nnz"] == [c["budget"]] * (c["m"] + 1)
  assert c["iters"][0] == c["iters"][1]
  assert c["stage2_iters"][0] == c["stage2_iters"][1]
  assert c["mosp_rel_objective_diff"] <= 1e-6
  assert c["alps_masks_equal"]
  assert c["alps_rel_objective_diff"] <= 1e-6


def test_pcg_split_by_columns_equals_one_device(worker):
  """The PCG's per-column step sizes and residual norms do not depend on
  how many columns a device holds (`pcg.column_sums`): bit for bit on
  576 x 256."""
  assert worker["pcg"]["pcg_entries_differing"] == 0
  assert worker["pcg"]["pcg_residuals_differing"] == 0


def test_layouts(worker):
  """Iterates split by columns over every device; on '2x2' the 4 models
  of `mosp_materialize` are also split over the task axis."""
  cols = "P(None, None, 'cols')"
  both = "P(None, None, ('cols', 'tasks'))"
  assert _case(worker, "4", "2:4")["specs"] == {
      "W_tasks": cols, "weights": cols, "alps": "P(None, 'cols')"}
  assert _case(worker, "2x2", "2:4")["specs"] == {
      "W_tasks": both, "weights": "P('tasks', None, 'cols')",
      "alps": "P(None, ('cols', 'tasks'))"}


def test_pipeline_on_mesh(worker):
  """The layer walk with `mesh=`: results come back to the model's device.
  Its layers are narrow (32-128 outputs, 8-32 per device), where XLA:CPU
  rounds matmuls differently by width, so only closeness is asserted: a
  last-bit difference can flip a few top-k picks of one small linear,
  which moves that linear's relative error far more than the model's
  perplexity (on an AMD EPYC: 2 of 56 (model, linear, task) errors off by
  up to 21%, the perplexities within 1e-3)."""
  p = worker["pipeline"]
  assert p["sparsity"][0] == p["sparsity"][1] == [0.5] * 3
  np.testing.assert_allclose(p["ppl"][1], p["ppl"][0], rtol=1e-3)
  np.testing.assert_allclose(p["global_ppl"][1], p["global_ppl"][0],
                             rtol=1e-3)
  mesh_err, one_err = np.asarray(p["rel_error"][1]), np.asarray(
      p["rel_error"][0])
  close = np.isclose(mesh_err, one_err, rtol=0.05, atol=1e-4)
  assert close.mean() >= 0.9, f"{(~close).sum()} of {close.size} differ"
  np.testing.assert_allclose(mesh_err, one_err, rtol=0.5, atol=1e-4)


def test_uneven_columns_raise(worker):
  assert "n_out=6 is not divisible by the 4 devices" in worker[
      "uneven_error"]


@pytest.mark.parametrize("spec,shape", [("", None), ("4", (1, 4)),
                                        ("2x2", (2, 2)), (" 1X3 ", (1, 3))])
def test_parse_mesh_spec(spec, shape):
  assert sharding.parse_mesh_spec(spec) == shape


@pytest.mark.parametrize("spec", ["x", "0", "2x", "2x2x2", "four", "-1"])
def test_bad_mesh_spec_raises(spec):
  with pytest.raises(ValueError, match="mesh spec must be"):
    sharding.parse_mesh_spec(spec)


def test_single_device_mesh_and_layout():
  mesh = sharding.make_mesh("1")
  assert mesh.axis_names == ("tasks", "cols") and mesh.size == 1
  assert sharding.layout_for(mesh, 4).model_axis is None
  with pytest.raises(ValueError, match="needs .* devices"):
    sharding.make_mesh(f"{jax.device_count() + 1}")


@pytest.mark.parametrize("args,message", [
    (["--mesh=2x"], "--mesh: mesh spec must be"),
    (["--num_processes=2"], "--coordinator_address is required"),
    (["--num_processes=2", "--coordinator_address=localhost:1234",
      "--process_id=2"], "--process_id must be in"),
])
@flagsaver.flagsaver
def test_device_flags_name_the_flag(args, message):
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["run", *args])
  with pytest.raises(ValueError, match=message):
    shared_flags.mesh_from_flags()


@flagsaver.flagsaver
def test_default_device_flags_mean_one_device():
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["run"])
  assert shared_flags.mesh_from_flags() is None
