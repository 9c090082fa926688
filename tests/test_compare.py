"""experiments.compare: front metrics, flags and smoke runs on tiny-llama."""

import json
import subprocess
import sys

import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from experiments import compare
from experiments.lib import comparison, shared_flags

from .conftest import ROOT

SMOKE = "experiments/configs/smoke.flags"
# The three vertices only: a mixed baseline builds 3 models.
FEW = ("--pref_grid=1", "--nopref_centroid")


def parse(*args):
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["compare", f"--flagfile={SMOKE}", *FEW, *args])
  run, solver = shared_flags.configs_from_flags()
  return run, solver, compare.entries_from_flags(solver)


def test_summarize_shares_one_reference():
  pts = {"mosp": np.exp([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]]),
         "alps-mixed": np.exp([[1.0, 3.0], [3.5, 3.5]]),
         "wanda-mixed": np.exp([[2.5, 2.5], [4.0, 0.5]])}
  s = comparison.summarize(pts)
  ref = np.array([4.0, 3.5]) + np.log(1.1)
  np.testing.assert_allclose(s["reference"], ref)
  # mosp: the staircase (1,3), (2,2), (3,1) under ref, by slabs in x.
  r0, r1 = ref
  want = (1 * (r1 - 3) + 1 * (r1 - 2) + (r0 - 3) * (r1 - 1))
  assert s["hypervolume"]["mosp"] == pytest.approx(want)
  assert s["mosp_dominates"] == {"alps-mixed": 1, "wanda-mixed": 1}
  assert s["dominates_mosp"] == {"alps-mixed": 0, "wanda-mixed": 0}
  assert "paper_hypervolume" not in s


def test_paper_reference_is_sparsegpt_concat_ten_percent_worse():
  pts = {"mosp": np.exp([[1.0, 3.0], [3.0, 1.0]]),
         "sparsegpt-concat": np.exp([[2.5, 2.5]])}
  s = comparison.summarize(pts)
  ref = np.array([2.5, 2.5]) + np.log(1.1)
  np.testing.assert_allclose(s["paper_reference"], ref)
  # Only the parts of MOSP's points inside the box count.
  assert s["paper_hypervolume"]["mosp"] == pytest.approx(0.0)
  assert s["paper_hypervolume"]["sparsegpt-concat"] == pytest.approx(
      np.log(1.1) ** 2)


@flagsaver.flagsaver
def test_entries_flags(tmp_path):
  _, _, entries = parse(f"--out_dir={tmp_path}", "--methods=wanda,alps",
                        "--baselines=concat,mixed",
                        "--mosp_variants=alpha=0;p=1,pref_map=normalized")
  assert [e.name for e in entries] == [
      "mosp", "mosp[alpha=0]", "mosp[p=1,pref_map=normalized]",
      "alps-concat", "alps-mixed", "sparsegpt-concat", "wanda-concat",
      "wanda-mixed"]
  assert entries[1].cfg.alpha == 0.0 and entries[2].cfg.p == 1.0
  assert entries[2].cfg.pref_map == "normalized"
  # method-protocol picks one protocol; concat keeps its sparsegpt.
  _, _, entries = parse(f"--out_dir={tmp_path}", "--baselines=concat",
                        "--methods=alps,alps-mixed,magnitude")
  assert [e.name for e in entries] == [
      "mosp", "alps-concat", "alps-mixed", "sparsegpt-concat", "magnitude"]
  for args, message in [(["--methods=obs"], "--methods: unknown"),
                        (["--methods=alps-mix"], "--methods: unknown"),
                        (["--baselines=mixes"], "--baselines: expected"),
                        (["--mosp_variants=beta=1"], "--mosp_variants: "
                         "expected field=value"),
                        (["--mosp_variants=alpha=2"], "--mosp_variants: "
                         "alpha must be in")]:
    with pytest.raises(ValueError, match=message):
      parse(f"--out_dir={tmp_path}", *args)


def test_compare_reads_the_run_flagfile(tmp_path):
  """The README's command: quick.flags also sets experiments.run's own
  --export_pref, which compare accepts; a misspelt flag is still one
  error line. --methods=bogus stops it before any model is loaded, and
  so does --plan_only."""

  def compare_with(*args):
    return subprocess.run(
        [sys.executable, "-m", "experiments.compare",
         "--flagfile=experiments/configs/quick.flags",
         f"--out_dir={tmp_path / 'out'}", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300)

  proc = compare_with("--methods=bogus")
  errors = [s for s in proc.stderr.splitlines() if s.startswith("error:")]
  assert errors and "--methods" in errors[0], proc.stderr[-2000:]
  proc = compare_with("--export_prf=centroid")
  errors = [s for s in proc.stderr.splitlines() if s.startswith("error:")]
  assert errors and "export_prf" in errors[0], proc.stderr[-2000:]
  # --plan_only: MOSP's walk planned, nothing loaded or written.
  proc = compare_with("--plan_only")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.startswith("plan: smollm2-135m on "), proc.stdout
  assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("compare")
  with flagsaver.flagsaver():
    run, _, entries = parse(f"--out_dir={out}", "--baselines=concat,mixed",
                            "--methods=alps,sparsegpt,magnitude")
  return out, run, comparison.compare_model(run, entries, log=lambda s: None)


def test_whole_model_compare_outputs(model_run):
  out, run, res = model_run
  on_disk = json.loads((out / "compare.json").read_text())
  walks = ["mosp", "alps-concat", "alps-mixed", "sparsegpt-concat",
           "sparsegpt-mixed", "magnitude"]
  for key in ("time_s", "walk_s", "cpu_s"):
    assert list(on_disk[key]) == walks
    assert all(np.isfinite(v) and v > 0 for v in on_disk[key].values())
  assert set(on_disk["hypervolume"]) == {*walks, "mosp:W", "mosp+W"}
  assert set(on_disk["paper_hypervolume"]) == set(on_disk["hypervolume"])
  points = {"mosp": 3, "alps-concat": 1, "alps-mixed": 3,
            "sparsegpt-concat": 1, "sparsegpt-mixed": 3, "magnitude": 1,
            "mosp:W": 1, "mosp+W": 4}
  for name, n in points.items():
    ppl = np.asarray(on_disk["ppl"][name])
    assert ppl.shape == (n, 3) and np.all(ppl > 1)
  for name in walks:
    assert on_disk["model_sparsity"][name] == pytest.approx(
        [0.5] * points[name], abs=1e-6)
  # MOSP's global model is ALPS on the concatenated data, and the walk
  # streams run through it: the ALPS-concat walk's model, to rounding.
  np.testing.assert_allclose(on_disk["ppl"]["mosp:W"],
                             on_disk["ppl"]["alps-concat"], rtol=1e-3)
  # At a vertex e_i, the mixed baselines are single-task runs.
  assert list(on_disk["dense_ppl"]) == list(run.tasks)
  md = (out / "compare.md").read_text()
  assert "| magnitude |" in md and "paper ref" in md
  assert "Solver settings" in md
  assert (out / "compare.png").stat().st_size > 10_000


@flagsaver.flagsaver
def test_layer_level_compare(model_run, tmp_path):
  run, _, entries = parse(f"--out_dir={tmp_path}", "--layer=1",
                          "--methods=sparsegpt,magnitude",
                          "--mosp_variants=alpha=1;pref_refit_iters=3")
  res = comparison.compare_layer(run, entries, layer=1,
                              linears=["self_attn.q_proj", "mlp.down_proj"],
                              use_cache=False, log=lambda s: None)
  assert res["layer"] == 1 and res["num_layers"] == 2
  assert set(res["hypervolume"]) == {
      "mosp", "mosp:W", "mosp[alpha=1]", "mosp[alpha=1]:W",
      "mosp[pref_refit_iters=3]", "mosp[pref_refit_iters=3]:W", "mosp+W",
      "sparsegpt-concat", "magnitude"}
  for name, n in (("mosp", 3), ("mosp[alpha=1]", 3),
                  ("mosp[pref_refit_iters=3]", 3), ("sparsegpt-concat", 1),
                  ("magnitude", 1)):
    err = np.asarray(res["rel_error"][name])
    assert err.shape == (n, 3) and np.all((err > 0) & (err < 1))
    assert list(res["rel_error_per_linear"][name]) == [
        "self_attn.q_proj", "mlp.down_proj"]
  # Every MOSP vertex beats data-free magnitude on its own task, and the
  # variant's global model is the default's (alpha does not feed back).
  for i in range(3):
    assert res["rel_error"]["mosp"][i][i] < res["rel_error"]["magnitude"][
        0][i]
  np.testing.assert_allclose(res["rel_error"]["mosp[alpha=1]:W"],
                             res["rel_error"]["mosp:W"], rtol=1e-6)
  md = (tmp_path / "compare.md").read_text()
  assert md.startswith("# MOSP vs baselines on one layer")
  assert "(SolverConfig): mosp[alpha=1]: alpha=1.0; mosp[pref_refit" in md
  assert res["solver"]["mosp[alpha=1]"]["alpha"] == 1.0
