"""The solver benchmark's MOSP-against-ALPS record on a small layer.

The timings themselves are machine-dependent and not asserted; what is
asserted are the facts docs/benchmarks.md reads off the record: stage 1 of MOSP
runs exactly ALPS's iterations on the concatenated Gram (its global model
is ALPS's solution), every stage of the breakdown was timed, and each
ratio is the quotient of its two times. The benchmark runs in its own
process: its flags share names with experiments.run's.
"""

from __future__ import annotations

import json
import subprocess
import sys

from .conftest import ROOT

_RECORD = """
import json
import numpy as np
from experiments import bench_solvers
from mosp_jax.solvers import Unstructured
print(json.dumps(bench_solvers.bench_mosp_vs_alps(
    48, 40, 3, 2, np.random.default_rng(0), 1, Unstructured(0.5))))
print(json.dumps(bench_solvers.bench_mosp_vs_alps(
    48, 40, 3, 2, np.random.default_rng(0), 1, Unstructured(0.5),
    paper=False, breakdown=False)))
"""

_RATE = """
import json
import numpy as np
from experiments import bench_solvers
from mosp_jax.solvers import Unstructured
print(json.dumps(bench_solvers.bench_shape(
    48, 40, np.random.default_rng(0), 2, 1, Unstructured(0.5))))
"""


def test_mosp_against_alps_record():
  proc = subprocess.run([sys.executable, "-c", _RECORD], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  r, bare = (json.loads(line)
             for line in proc.stdout.strip().splitlines()[-2:])
  assert (r["n_in"], r["n_out"], r["m"], r["K"]) == (48, 40, 3, 2)
  assert r["alps_iters"] > 0
  assert r["mosp_stage1_iters"] == r["alps_iters"]
  assert len(r["mosp_stage2_iters"]) == 3
  assert list(r["mosp_breakdown_s"]) == [
      "scale_eig", "stage1_admm", "stage1_pcg", "core", "stage2",
      "stage3_pcg", "materialize", "refit"]
  assert all(t > 0 for t in r["mosp_breakdown_s"].values())
  assert r["alps_s"] > 0
  assert r["ratio"] == r["mosp_s"] / r["alps_s"]
  assert r["ratio_refit"] == r["mosp_refit_s"] / r["alps_s"]
  assert r["ratio_paper"] == r["mosp_paper_s"] / r["alps_s"]
  # --nopaper --nobreakdown: the same solves (same inputs, same
  # iterations), without the optional timings.
  assert "mosp_paper_s" not in bare
  assert "mosp_breakdown_s" not in bare
  assert bare["mosp_stage1_iters"] == r["mosp_stage1_iters"]
  assert bare["mosp_stage2_iters"] == r["mosp_stage2_iters"]
  assert bare["ratio"] == bare["mosp_s"] / bare["alps_s"]


def test_admm_rate_record():
  proc = subprocess.run([sys.executable, "-c", _RATE], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  assert (r["n_in"], r["n_out"]) == (48, 40)
  assert r["step_s"] > 0 and r["projection_s"] > 0
  assert r["projection_to_step"] == r["projection_s"] / r["step_s"]
  assert r["ratio_to_matmul"] == r["admm_gflops"] / r["matmul_gflops"]
