"""mosp_jax.pipeline.run_record: typed records of a run directory."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bridge import pruned
from mosp_jax.config import DEFAULT, PAPER, RunConfig, SolverConfig
from mosp_jax.pipeline import artifact, run_record
from mosp_jax.solvers import NM, Unstructured


@pytest.mark.parametrize("pattern", [Unstructured(0.5), Unstructured(0.0),
                                     NM(2, 4), NM(1, 8)])
def test_pattern_round_trips(pattern):
  d = run_record.pattern_to_dict(pattern)
  assert d["kind"] == type(pattern).__name__
  assert run_record.pattern_from_dict(json.loads(json.dumps(d))) == pattern


def test_unknown_pattern_is_refused():
  with pytest.raises(run_record.RunRecordError, match="unknown sparsity "
                     "pattern 'Blocks'"):
    run_record.pattern_from_dict({"kind": "Blocks", "size": 4})


def test_config_record_round_trips_and_ignores_out_dir():
  run = RunConfig(model="tiny-llama", tasks=("general", "math"),
                  pattern=NM(2, 4), nsamples=4, seqlen=64, test_tokens=256,
                  prefs=((1.0, 0.0), (0.0, 1.0), (0.5, 0.5)), batch_size=4,
                  seed=3, out_dir="/a", streams="task")
  rec = run_record.ConfigRecord(run, SolverConfig(alpha=0.25))
  d = json.loads(json.dumps(rec.to_dict()))
  assert "out_dir" not in d and d["pattern"] == {"kind": "NM", "n": 2,
                                                 "m": 4}
  back = run_record.ConfigRecord.from_dict(d, out_dir="/a")
  assert back == rec
  moved = run_record.ConfigRecord(
      RunConfig(**{**run.__dict__, "out_dir": "/b"}), rec.solver)
  assert moved.to_dict() == rec.to_dict()  # A run dir may move.


def test_a_run_written_before_a_solver_field_existed_resumes(tmp_path):
  """A config.json without fields added later (`core_rule`,
  `pref_refit_iters`, `pref_support`) is the configuration of their
  paper values, whatever today's defaults, and only that."""
  from mosp_jax import cli
  out = tmp_path / "run"
  out.mkdir()
  run = RunConfig(model="tiny-llama", tasks=("general", "math"),
                  pattern=Unstructured(0.5), nsamples=4, seqlen=64,
                  test_tokens=256, prefs=((1.0, 0.0), (0.0, 1.0)),
                  batch_size=4, seed=0, out_dir=str(out))
  old = run_record.ConfigRecord(run, PAPER).to_dict()
  for field in ("core_rule", "pref_refit_iters", "pref_support"):
    del old["solver"][field]
  (out / run_record.CONFIG_FILE).write_text(json.dumps(old))
  same = run_record.ConfigRecord(run, PAPER)
  assert run_record.check_run_dir(same, overwrite=False) == (out, True,
                                                             False)
  other = run_record.ConfigRecord(run, DEFAULT)
  with pytest.raises(cli.UsageError, match=r"differs in: solver\)"):
    run_record.check_run_dir(other, overwrite=False)


def test_records_of_a_run_read_back_exactly(tiny_run):
  """What the runner wrote parses into the typed records and serialises
  back to the same JSON, key for key."""
  for name, read in ((run_record.RESULTS_FILE, run_record.read_results),
                     (run_record.CONFIG_FILE, run_record.read_config)):
    on_disk = json.loads((tiny_run / name).read_text())
    # Another test may have added the export report: it reads back too.
    assert read(tiny_run).to_dict() == on_disk, name
  meta_disk = json.loads((tiny_run / "pareto" / artifact.META).read_text())
  meta = run_record.read_meta(tiny_run)
  assert meta.to_dict() == meta_disk
  results = run_record.read_results(tiny_run)
  assert meta.prefs.dtype == np.float32 and meta.prefs.shape == (7, 3)
  assert [m.preference for m in results.models] == [
      tuple(p) for p in meta.prefs.tolist()]
  assert meta.dense_sha256 == pruned.preference_model(
      pruned.read_run(tiny_run), meta.prefs[0]).dense_sha256


@pytest.mark.parametrize("name, damage, match", [
    ("results.json", "{", "not valid JSON"),
    ("results.json", '{"model": "x"}', "not a run's results.json"),
    ("config.json", '{"model": "x"}', "not a run's config.json"),
    ("pareto/meta.json", "[]", "not the meta.json of a run"),
])
def test_damaged_records_name_the_file(tiny_run, tmp_path, name, damage,
                                       match):
  import shutil
  out = tmp_path / "run"
  shutil.copytree(tiny_run, out)
  (out / name).write_text(damage)
  with pytest.raises(pruned.RunDirError, match=match) as e:
    pruned.read_run(out)
  assert str(out / name) in str(e.value)


def test_a_finished_run_is_found_finished(tiny_run):
  rec = run_record.read_config(tiny_run)
  assert run_record.check_run_dir(rec, overwrite=False) == (tiny_run, True,
                                                            True)
  assert run_record.check_run_dir(rec, overwrite=True).finished is False


def test_layer_and_export_records_read_back_old_and_new_json():
  """A layer record of a run older than the evaluate phase, a baseline's
  (no linears), one with the materialising seconds and an export report
  serialise back to the same JSON."""
  linear = {"stage1_iters": 33, "stage2_iters": [10, 1],
            "rel_error": [[0.1, 0.25], [0.5, 1e-7]]}
  for d in ({"layer": 0, "capture_s": 0.5, "solve_s": 2.0,
             "propagate_s": 0.25, "evaluate_s": 1.0,
             "linears": {"mlp.up_proj": linear}},
            {"layer": 1, "capture_s": 0.5, "solve_s": 2.0,
             "propagate_s": 0.25, "linears": {"mlp.up_proj": linear}},
            {"layer": 2, "capture_s": 0.5, "solve_s": 2.0,
             "propagate_s": 0.25, "evaluate_s": 1.0},
            {"layer": 3, "capture_s": 0.5, "solve_s": 2.0,
             "propagate_s": 0.25, "evaluate_s": 1.0, "materialise_s": 0.5}):
    rec = run_record.LayerRecord.from_dict(d)
    assert rec.to_dict() == d and list(rec.to_dict()) == list(d)
  assert rec.linears == {} and rec.materialise_s == 0.5
  export = {"checkpoint": "/r/export_centroid", "dtype": "float32",
            "preference": [0.5, 0.5], "ok": False,
            "ppl": [{"task": "math", "torch": 2.0, "jax": 2.0,
                     "rel_diff": 0.0, "run": None, "run_rel_diff": None}],
            "max_rel_diff": 0.0, "sparsity": None,
            "problems": ["ppl: math"]}
  got = run_record.ExportRecord.from_dict(export)
  assert not got.ok and got.to_dict() == export
  assert list(got.to_dict()) == list(export)
  results = {"model": "m", "sparsity": 0.5, "pattern": "p", "tasks": ["a"],
             "dense_ppl": {"a": 1.0}, "models": [],
             "global_model": {"ppl": {"a": 1.0}}, "timings": {},
             "layers": [{"layer": 0}], "solver": {}}
  with pytest.raises(run_record.RunRecordError, match="capture_s"):
    run_record.Results.from_dict(results)
