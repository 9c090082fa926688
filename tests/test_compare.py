"""experiments.compare: front metrics, flags and smoke runs on tiny-llama."""

import json

import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from experiments import compare
from experiments import run as run_lib

SMOKE = "experiments/configs/smoke.flags"
# The three vertices only: each baseline builds 3 models.
FEW = ("--pref_grid=1", "--nopref_centroid")


def parse(*args):
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["compare", f"--flagfile={SMOKE}", *FEW, *args])
  run, solver = run_lib.configs_from_flags()
  return run, solver, compare.methods_from_flags()


def test_summarize_shares_one_reference():
  pts = {"mosp": np.exp([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]]),
         "alps": np.exp([[1.0, 3.0], [3.5, 3.5]]),
         "wanda": np.exp([[2.5, 2.5], [4.0, 0.5]])}
  s = compare.summarize(pts)
  ref = np.array([4.0, 3.5]) + np.log(1.1)
  np.testing.assert_allclose(s["reference"], ref)
  # mosp: the staircase (1,3), (2,2), (3,1) under ref, by slabs in x.
  r0, r1 = ref
  want = (1 * (r1 - 3) + 1 * (r1 - 2) + (r0 - 3) * (r1 - 1))
  assert s["hypervolume"]["mosp"] == pytest.approx(want)
  assert s["mosp_dominates"] == {"alps": 1, "wanda": 1}
  assert s["dominates_mosp"] == {"alps": 0, "wanda": 0}


@flagsaver.flagsaver
def test_methods_flag(tmp_path):
  _, _, methods = parse(f"--out_dir={tmp_path}", "--methods=wanda,alps")
  assert methods == ("mosp", "alps", "wanda")
  with pytest.raises(ValueError, match="--methods: unknown"):
    parse(f"--out_dir={tmp_path}", "--methods=obs")


@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("compare")
  with flagsaver.flagsaver():
    run, solver, methods = parse(f"--out_dir={out}")
  return out, run, compare.compare_model(run, solver, methods,
                                         log=lambda s: None)


def test_whole_model_compare_outputs(model_run):
  out, run, res = model_run
  on_disk = json.loads((out / "compare.json").read_text())
  methods = ["mosp", "alps", "sparsegpt", "wanda", "magnitude"]
  for key in ("hypervolume", "time_s", "cpu_s"):
    assert list(on_disk[key]) == methods
    assert all(np.isfinite(v) and v > 0 for v in on_disk[key].values())
  assert list(on_disk["mosp_dominates"]) == methods[1:]
  for name in methods:
    ppl = np.asarray(on_disk["ppl"][name])
    assert ppl.shape == (3, 3) and np.all(ppl > 1)
    assert on_disk["model_sparsity"][name] == pytest.approx([0.5] * 3,
                                                            abs=1e-6)
  # Magnitude ignores the data: one model for every preference.
  assert len({tuple(r) for r in on_disk["ppl"]["magnitude"]}) == 1
  # Dense PPL is the same for every walk (checked inside) and reported.
  assert list(on_disk["dense_ppl"]) == list(run.tasks)
  md = (out / "compare.md").read_text()
  assert "| magnitude |" in md and "hypervolume" in md
  assert "Solver settings" in md
  assert (out / "compare.png").stat().st_size > 10_000


@flagsaver.flagsaver
def test_layer_level_compare(model_run, tmp_path):
  run, solver, methods = parse(f"--out_dir={tmp_path}", "--layer=1",
                               "--methods=sparsegpt,magnitude",
                               "--pref_swap_rounds=1")
  res = compare.compare_layer(run, solver, methods, layer=1,
                              linears=["self_attn.q_proj", "mlp.down_proj"],
                              use_cache=False, log=lambda s: None)
  assert res["layer"] == 1 and res["num_layers"] == 2
  assert set(res["hypervolume"]) == {"mosp", "sparsegpt", "magnitude"}
  for name in methods:
    err = np.asarray(res["rel_error"][name])
    assert err.shape == (3, 3) and np.all((err > 0) & (err < 1))
    assert list(res["rel_error_per_linear"][name]) == [
        "self_attn.q_proj", "mlp.down_proj"]
  # At a vertex e_i, task i's error is the objective each method
  # minimises (MOSP and SparseGPT both beat data-free magnitude there).
  for i in range(3):
    assert res["rel_error"]["mosp"][i][i] < res["rel_error"]["magnitude"][
        i][i]
  md = (tmp_path / "compare.md").read_text()
  assert md.startswith("# MOSP vs baselines on one layer")
  assert "differ from the defaults (SolverConfig): pref_swap_rounds=1." in md
  assert res["solver"]["pref_swap_rounds"] == 1
