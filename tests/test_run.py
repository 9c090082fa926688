"""The runner: flags -> configs, and a real end-to-end smoke run."""

import dataclasses
import json

import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from experiments.lib import runner, shared_flags
from mosp_jax.config import SolverConfig
from mosp_jax.pipeline import artifact, run_record
from mosp_jax.solvers import NM, Unstructured

SMOKE = "experiments/configs/smoke.flags"


def parse(*args):
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["run", f"--flagfile={SMOKE}", *args])
  return shared_flags.configs_from_flags()


@flagsaver.flagsaver
def test_every_solver_flag_reaches_its_field(tmp_path):
  values = {"alpha": 0.3, "p": 1.0, "pref_map": "normalized",
            "core_rule": "global", "rho0": 0.2,
            "update_every": 4, "max_iter": 50, "stage2_rho": 0.7,
            "stage2_max_iter": 4, "damping": 0.05, "pcg_iters": 5,
            "pref_refit_iters": 3, "pref_support": "own"}
  assert set(values) == {f.name for f in dataclasses.fields(SolverConfig)}
  args = [f"--{k}={v}" if not isinstance(v, bool) else
          (f"--{k}" if v else f"--no{k}") for k, v in values.items()]
  run, solver = parse(f"--out_dir={tmp_path}", *args)
  assert dataclasses.asdict(solver) == values
  assert run.pattern == Unstructured(0.5) and run.nsamples == 4
  assert len(run.prefs) == 7 and run.prefs[:3] == ((1.0, 0.0, 0.0),
                                                   (0.0, 1.0, 0.0),
                                                   (0.0, 0.0, 1.0))


@flagsaver.flagsaver
def test_run_flags_map_to_typed_values(tmp_path):
  run, _ = parse(f"--out_dir={tmp_path}", "--nm=2:4",
                 "--prefs=0.5,0.25,0.25")
  assert run.pattern == NM(2, 4)
  # The explicit preference plus the three vertices every run needs.
  assert run.prefs == ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0),
                       (0.5, 0.25, 0.25))


@pytest.mark.parametrize("args,message", [
    (["--sparsity=1.0"], "--sparsity: sparsity must be in"),
    (["--nm=4:2"], "--nm: N:M needs 0 < N < M"),
    (["--nm=two:four"], "--nm: expected 'N:M'"),
    (["--prefs=0.5,0.5"], "--prefs: expected preferences of 3"),
    (["--prefs=0.6,0.6,0.1"], "--prefs: each preference must sum to 1"),
    (["--alpha=2"], "--alpha must be in"),
    (["--nsamples=0"], "nsamples must be > 0"),
    (["--tasks=math,math"], "tasks: duplicate"),
])
@flagsaver.flagsaver
def test_bad_flags_name_the_flag(tmp_path, args, message):
  with pytest.raises(ValueError, match=message):
    parse(f"--out_dir={tmp_path}", *args)


@flagsaver.flagsaver
def test_out_dir_rules(tmp_path):
  (tmp_path / "keep.txt").write_text("x")
  rec = run_record.ConfigRecord(*parse(f"--out_dir={tmp_path}"))
  with pytest.raises(ValueError, match="not empty and holds no run"):
    run_record.prepare_run_dir(rec, overwrite=False)
  # --overwrite deletes only a run's own outputs.
  run_dir = run_record.prepare_run_dir(rec, overwrite=True)
  assert not run_dir.resuming and (tmp_path / "keep.txt").read_text() == "x"
  # The same configuration resumes; another is refused, naming the field.
  assert run_record.prepare_run_dir(rec, overwrite=False).resuming
  rec2 = run_record.ConfigRecord(*parse(f"--out_dir={tmp_path}",
                                         "--sparsity=0.6", "--alpha=0.4"))
  with pytest.raises(ValueError, match="differs in: pattern, solver"):
    run_record.prepare_run_dir(rec2, overwrite=False)


@flagsaver.flagsaver
def test_unknown_task_and_long_seqlen_fail_fast(tmp_path):
  with pytest.raises(ValueError, match="--tasks: unknown task 'poetry'"):
    parse(f"--out_dir={tmp_path}", "--tasks=general,poetry")
  with pytest.raises(ValueError, match="--tasks: no file"):
    parse(f"--out_dir={tmp_path}", f"--tasks=general,{tmp_path}/x.txt")
  run, _ = parse(f"--out_dir={tmp_path}", "--model=smollm2-135m",
                 "--seqlen=9000", "--test_tokens=9000")
  with pytest.raises(ValueError, match="--seqlen 9000 exceeds the context "
                     "of smollm2-135m \\(8192"):
    runner.check_model_fits(run)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("smoke")
  with flagsaver.flagsaver():
    run, solver = parse(f"--out_dir={out}")
  return out, run, runner.run_experiment(run, solver, log=lambda s: None)


def test_smoke_run_outputs(smoke_run):
  out, run, res = smoke_run
  on_disk = json.loads((out / "results.json").read_text())
  assert on_disk["tasks"] == ["general", "math", "pycode"]
  assert set(on_disk) >= {"model", "sparsity", "tasks", "dense_ppl",
                          "models", "timings"}
  assert len(on_disk["models"]) == 7
  for mdl in on_disk["models"]:
    assert sum(mdl["preference"]) == pytest.approx(1.0)
    assert set(mdl["ppl"]) == set(run.tasks)
    assert all(np.isfinite(v) and v > 1 for v in mdl["ppl"].values())
    # Exact budgets: zeros are exactly half of every pruned linear (a kept
    # weight is never exactly zero in a random float model).
    assert mdl["sparsity"] == pytest.approx(0.5, abs=1e-6)
  assert (out / "report.md").read_text().startswith("# MOSP run")
  assert (out / "pareto.png").stat().st_size > 10_000
  meta = json.loads((out / "pareto" / "meta.json").read_text())
  assert meta["num_layers"] == 2 and meta["tasks"] == list(run.tasks)
  linears = artifact.load_layer(out / "pareto", 1)
  assert len(linears) == 7
  for par in linears.values():
    k = par.core.size // 2
    assert par.core.sum() == k // 2  # floor(alpha k), alpha = 0.5
    assert (par.W != 0).sum() == k and not (par.core & (par.W == 0)).any()
    assert ((par.W_tasks != 0) | par.core[None]).sum(axis=(1, 2)).max() <= k
  # The global model's PPL is recorded beside the preference models'.
  assert set(on_disk["global_model"]["ppl"]) == set(run.tasks)


@flagsaver.flagsaver
def test_sparsity_zero_models_equal_dense(tmp_path):
  run, solver = parse(f"--out_dir={tmp_path}", "--sparsity=0",
                      "--pref_grid=1", "--nopref_centroid")
  res = runner.run_experiment(run, solver, log=lambda s: None)
  dense = np.array([res.dense_ppl[t] for t in run.tasks])
  for mdl in res.models:
    np.testing.assert_allclose([mdl.ppl[t] for t in run.tasks], dense,
                               rtol=1e-4)


@flagsaver.flagsaver
def test_pickled_model_needs_trust_pickle_then_runs_and_exports(
    tmp_path, monkeypatch):
  import os

  from bridge import hf_import, model_files, torch_convert, torch_export
  from bridge.model_files import ModelLoadError
  from mosp_jax import fetch

  from .conftest import TINY_RUN_FLAGS
  from .tiny_models import tiny_torch

  # A model cache of its own for the converted model; the tasks' data and
  # tokenizers come from the usual cache.
  real = fetch.cache_dir()
  cache = tmp_path / "cache"
  cache.mkdir()
  for entry in real.iterdir():
    if entry.name != "models":
      os.symlink(entry, cache / entry.name)
  monkeypatch.setenv("MOSP_JAX_CACHE", str(cache))
  d = tmp_path / "pickled"
  tokenizer = hf_import.load_tokenizer(model_files.SMOLLM2)
  tiny_torch("llama", vocab_size=len(tokenizer)).save_pretrained(
      d, safe_serialization=False)
  tokenizer.save_pretrained(d)
  args = [*TINY_RUN_FLAGS, f"--model={d}", "--pref_grid=1"]
  refused = tmp_path / "refused"
  run, solver = parse(*args, f"--out_dir={refused}")
  with pytest.raises(ModelLoadError, match="--trust_pickle"):
    runner.run_experiment(run, solver, log=lambda s: None)
  assert not refused.exists()
  out = tmp_path / "trusted"

  def no_torch(*args, **kwargs):
    raise AssertionError("the PyTorch model must not be built")

  monkeypatch.setattr(torch_convert, "load_torch", no_torch)
  run, solver = parse(*args, f"--out_dir={out}", "--trust_pickle")
  res = runner.run_experiment(run, solver, log=lambda s: None)
  assert all(np.isfinite(list(res.global_ppl.values())))
  assert run_record.read_config(out).run.trust_pickle
  # Converted tensor by tensor (no PyTorch model) into the cache, once.
  assert len(list((cache / "models").glob("pt-pickled-*"))) == 1
  # The export reloads the dense model with the run's permission.
  info = torch_export.export_preference(out, "centroid", tmp_path / "export")
  assert info is not None
