"""Bad input on every command: one `error:` line that names the flag or
file, exit 2 (usage) or 1 (run time), no traceback, nothing written
before damaged (`mosp_jax.cli`).

Each command runs all its cases in one process (`tests/cli_worker.py`,
through `cli.run` as its `__main__` does); `test_entry_points` runs each
command's real `python -m` once.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from experiments.lib import shared_flags
from mosp_jax import cli
from mosp_jax.pipeline import artifact, front_plot, preferences, run_record
from mosp_jax.pipeline.walk import eta_text

from . import cli_worker
from .conftest import ROOT, TINY_RUN_FLAGS

SMOKE = "--flagfile=experiments/configs/smoke.flags"
RUN, COMPARE, BENCH = ("experiments.run", "experiments.compare",
                       "experiments.bench_solvers")
EXPORT, PARITY = "bridge.export", "bridge.parity"
CONVERT = "experiments.bench_convert"
USAGE, FAILURE = cli.EXIT_USAGE, cli.EXIT_FAILURE

# (command, case, argv, exit status, what the error line must name).
# {fresh} is an --out_dir no case may create; the other placeholders are
# the files of the `inputs` fixture.
CASES = [
    # Non-finite numbers.
    (RUN, "nan_prefs", [SMOKE, "--out_dir={fresh}", "--prefs=nan,0.5,0.5"],
     USAGE, ["--prefs", "finite"]),
    (RUN, "nan_sparsity", [SMOKE, "--out_dir={fresh}", "--sparsity=nan"],
     USAGE, ["--sparsity", "finite"]),
    (RUN, "inf_alpha", [SMOKE, "--out_dir={fresh}", "--alpha=inf"], USAGE,
     ["--alpha"]),
    (RUN, "nan_export_pref", [SMOKE, "--out_dir={fresh}",
                              "--export_pref=nan,0.5,0.5"], USAGE,
     ["--export_pref"]),
    (COMPARE, "nan_prefs", [SMOKE, "--out_dir={fresh}",
                            "--prefs=0.5,nan,0.5"], USAGE, ["--prefs"]),
    (EXPORT, "nan_preference", ["--run_dir={run}", "--out={fresh}",
                                "--preference=nan,0.5,0.5"], USAGE,
     ["--preference", "finite"]),
    (PARITY, "nan_rtol", ["--checkpoint={export}", "--rtol=nan"], USAGE,
     ["--rtol"]),
    (PARITY, "nan_preference", ["--checkpoint={export}",
                                "--preference=inf,0,0"], USAGE,
     ["--preference"]),
    (BENCH, "nan_sparsity", ["--out={fresh}/b.json", "--sparsity=nan"],
     USAGE, ["--sparsity"]),
    # Paths of the wrong kind.
    (RUN, "out_dir_is_a_file", [SMOKE, "--out_dir={file}"], USAGE,
     ["--out_dir", "{file}", "is a file"]),
    (RUN, "out_dir_under_a_file", [SMOKE, "--out_dir={file}/sub"], USAGE,
     ["--out_dir", "is a file"]),
    (RUN, "task_is_a_folder", [SMOKE, "--out_dir={fresh}",
                               "--tasks=general,{folder_txt}"], USAGE,
     ["--tasks", "folder.txt"]),
    (RUN, "task_missing", [SMOKE, "--out_dir={fresh}",
                           "--tasks=general,{missing}.txt"], USAGE,
     ["--tasks", "no file"]),
    (RUN, "model_missing", [SMOKE, "--out_dir={fresh}",
                            "--model={missing}.gguf"], USAGE, ["--model"]),
    (COMPARE, "out_dir_is_a_file", [SMOKE, "--out_dir={file}"], USAGE,
     ["--out_dir", "is a file"]),
    (EXPORT, "out_is_a_file", ["--run_dir={run}", "--out={file}",
                               "--preference=centroid"], USAGE,
     ["--out", "is a file"]),
    (EXPORT, "run_dir_is_a_file", ["--run_dir={file}", "--out={fresh}",
                                   "--preference=centroid"], USAGE,
     ["--run_dir", "is a file"]),
    (EXPORT, "run_dir_missing", ["--run_dir={missing}", "--out={fresh}",
                                 "--preference=centroid"], USAGE,
     ["--run_dir", "no such folder"]),
    (PARITY, "checkpoint_is_a_file", ["--checkpoint={file}"], USAGE,
     ["--checkpoint", "is a file"]),
    (PARITY, "checkpoint_missing", ["--checkpoint={missing}"], USAGE,
     ["--checkpoint"]),
    (PARITY, "report_is_a_folder", ["--checkpoint={export}",
                                    "--report={folder_txt}"], USAGE,
     ["--report", "is a folder"]),
    (BENCH, "out_is_a_folder", ["--out={folder_txt}"], USAGE,
     ["--out", "is a folder"]),
    (BENCH, "out_under_a_file", ["--out={file}/b.json"], USAGE,
     ["--out", "is a file"]),
    # Files that cannot be read as expected.
    (RUN, "binary_task", [SMOKE, "--out_dir={fresh}",
                          "--tasks=general,{binary}"], FAILURE,
     ["binary.txt", "UTF-8"]),
    (COMPARE, "binary_task", [SMOKE, "--out_dir={fresh}",
                              "--tasks=general,{binary}"], FAILURE,
     ["binary.txt", "UTF-8"]),
    (EXPORT, "truncated_npz", ["--run_dir={truncated}", "--out={fresh}",
                               "--preference=centroid"], FAILURE,
     ["layer_001.npz", "truncated"]),
    (EXPORT, "not_a_run", ["--run_dir={empty}", "--out={fresh}",
                           "--preference=centroid"], FAILURE,
     ["meta.json", "missing"]),
    (PARITY, "truncated_npz", ["--checkpoint={export}",
                               "--run_dir={truncated}"], FAILURE,
     ["layer_001.npz"]),
    (PARITY, "export_without_config", ["--checkpoint={no_config}"], FAILURE,
     ["config.json is missing"]),
    (PARITY, "export_without_tokenizer", ["--checkpoint={no_tokenizer}"],
     FAILURE, ["no tokenizer files"]),
    # Limits checked in every command.
    (RUN, "seqlen_over_context", [SMOKE, "--out_dir={fresh}",
                                  "--seqlen=4096", "--test_tokens=8192"],
     USAGE, ["--seqlen 4096", "2048"]),
    (COMPARE, "seqlen_over_context", [SMOKE, "--out_dir={fresh}",
                                      "--seqlen=4096",
                                      "--test_tokens=8192"], USAGE,
     ["--seqlen 4096", "2048"]),
    (RUN, "one_document_task", [SMOKE, "--out_dir={fresh}",
                                "--tasks=general,{one_doc}"], FAILURE,
     ["one_doc.txt", "1 document"]),
    (COMPARE, "one_document_task", [SMOKE, "--out_dir={fresh}",
                                    "--tasks=general,{one_doc}"], FAILURE,
     ["one_doc.txt", "1 document"]),
    (RUN, "too_few_tokens", [SMOKE, "--out_dir={fresh}",
                             "--tasks={small_a},{small_b}"], FAILURE,
     ["small_a.txt", "too few calibration tokens"]),
    (COMPARE, "too_few_tokens", [SMOKE, "--out_dir={fresh}",
                                 "--tasks={small_a},{small_b}"], FAILURE,
     ["small_a.txt", "too few calibration tokens"]),
    (COMPARE, "layer_out_of_range", [SMOKE, "--out_dir={fresh}",
                                     "--layer_level", "--layer=9"], USAGE,
     ["--layer 9", "2 layers"]),
    (COMPARE, "layer_level_bfloat16", [SMOKE, "--out_dir={fresh}",
                                       "--layer_level",
                                       "--dtype=bfloat16"], USAGE,
     ["--dtype", "layer-level"]),
    (RUN, "unknown_dtype", [SMOKE, "--out_dir={fresh}", "--dtype=float16"],
     USAGE, ["--dtype", "float32"]),
    (BENCH, "sparsity_out_of_range", ["--out={fresh}/b.json",
                                      "--sparsity=1.5"], USAGE,
     ["--sparsity"]),
    (BENCH, "zero_iterations", ["--out={fresh}/b.json", "--iters=0"],
     USAGE, ["--iters"]),
    (BENCH, "bad_mesh_layer", ["--out={fresh}/b.json", "--mesh_layer=12"],
     USAGE, ["--mesh_layer"]),
    (BENCH, "bad_solve_shape", ["--out={fresh}/b.json",
                                "--solve_shapes=576x1536,4096x0"], USAGE,
     ["--solve_shapes", "'4096x0'"]),
    (BENCH, "mesh_too_large", ["--out={fresh}/b.json", "--mesh=64"], USAGE,
     ["--mesh=64", "64 devices"]),
    (PARITY, "negative_rtol", ["--checkpoint={export}", "--rtol=-1"], USAGE,
     ["--rtol"]),
    # The wrong run, other flags, and outputs that would be overwritten.
    (PARITY, "wrong_run", ["--checkpoint={export}", "--run_dir={other_run}"],
     FAILURE, ["--run_dir", "not the run", "tasks"]),
    (EXPORT, "wrong_weight_count", ["--run_dir={run}", "--out={fresh}",
                                    "--preference=0.5,0.5"], USAGE,
     ["--preference", "3 weights"]),
    (EXPORT, "out_not_empty", ["--run_dir={run}", "--out={nonempty}",
                               "--preference=centroid"], USAGE,
     ["--out", "not empty"]),
    (EXPORT, "missing_out", ["--run_dir={run}", "--preference=centroid"],
     USAGE, ["--out is required"]),
    (EXPORT, "bad_dtype", ["--run_dir={run}", "--out={fresh}",
                           "--preference=centroid", "--dtype=int8"], USAGE,
     ["--dtype"]),
    (RUN, "unparsable_float", [SMOKE, "--out_dir={fresh}",
                               "--sparsity=abc"], USAGE, ["--sparsity"]),
    (RUN, "unknown_flag", [SMOKE, "--out_dir={fresh}", "--nope"], USAGE,
     ["nope"]),
    (RUN, "positional_argument", [SMOKE, "--out_dir={fresh}", "extra"],
     USAGE, ["extra"]),
    (RUN, "missing_flagfile", ["--flagfile={missing}.flags"], USAGE,
     ["flagfile"]),
    (RUN, "missing_out_dir", [SMOKE], USAGE, ["--out_dir is required"]),
    (RUN, "another_configuration", [*TINY_RUN_FLAGS, "--out_dir={run}",
                                    "--sparsity=0.6"], USAGE,
     ["--out_dir", "another configuration", "pattern"]),
    (RUN, "overwrite_with_a_bad_flag", [*TINY_RUN_FLAGS, "--out_dir={run}",
                                        "--overwrite",
                                        "--prefs=nan,0.5,0.5"], USAGE,
     ["--prefs"]),
    (COMPARE, "unknown_method", [SMOKE, "--out_dir={fresh}",
                                 "--methods=bogus"], USAGE, ["--methods"]),
    (COMPARE, "unknown_linear", [SMOKE, "--out_dir={fresh}",
                                 "--layer_level", "--layer=1",
                                 "--linears=self_attn.bogus",
                                 "--nogram_cache"], USAGE,
     ["--linears", "self_attn.bogus"]),
    (COMPARE, "bad_variant", [SMOKE, "--out_dir={fresh}",
                              "--mosp_variants=alpha=x"], USAGE,
     ["--mosp_variants"]),
    (RUN, "plan_for_gpu_without_plan_only", [
        SMOKE, "--out_dir={fresh}", "--plan_for_gpu",
        "--device_memory_gb=48"], USAGE, ["--plan_for_gpu", "--plan_only"]),
    (COMPARE, "plan_does_not_fit", [SMOKE, "--out_dir={fresh}",
                                    "--device_memory_gb=1e-6"], USAGE,
     ["the plan needs", "0.00 GiB available"]),
    (COMPARE, "out_dir_not_empty", [SMOKE, "--out_dir={nonempty}"], USAGE,
     ["--out_dir", "not empty"]),
    (PARITY, "missing_checkpoint_flag", [], USAGE, ["--checkpoint"]),
    (BENCH, "missing_out", [], USAGE, ["--out is required"]),
    (CONVERT, "missing_out", [], USAGE, ["--out is required"]),
    (CONVERT, "hidden_not_heads", ["--out={fresh}/c.json", "--hidden=40"],
     USAGE, ["--hidden", "16"]),
    (BENCH, "bad_mesh", ["--out={fresh}/b.json", "--mesh=abc"], USAGE,
     ["--mesh"]),
]
# Commands that succeed: an identical rerun of a finished run.
RERUN = (RUN, "identical_rerun", [*TINY_RUN_FLAGS, "--out_dir={run}"])


def _tree(root: pathlib.Path) -> dict[str, tuple[int, str]]:
  """`{relative path: (mode, sha256)}` of every file under `root`."""
  out = {}
  for p in sorted(root.rglob("*")):
    if p.is_file():
      out[str(p.relative_to(root))] = (
          p.stat().st_mode, hashlib.sha256(p.read_bytes()).hexdigest())
  return out


def _inputs(tmp: pathlib.Path, run: pathlib.Path,
            export: pathlib.Path) -> dict[str, str]:
  """The files the cases name."""
  files = tmp / "files"
  files.mkdir()
  (files / "binary.txt").write_bytes(b"text\x00\xff\xfe\x80 more")
  (files / "one_doc.txt").write_text("A single document, no blank line.\n")
  (files / "small_a.txt").write_text("a b c\n\nd e f\n")
  (files / "small_b.txt").write_text("g h\n\ni j\n")
  (files / "folder.txt").mkdir()
  (files / "a_file").write_text("x\n")
  (files / "nonempty").mkdir()
  (files / "nonempty" / "keep.txt").write_text("keep\n")
  (files / "empty").mkdir()
  no_exports = shutil.ignore_patterns("export*", "exported")
  truncated = tmp / "truncated_run"
  shutil.copytree(run, truncated, ignore=no_exports)
  npz = truncated / "pareto" / "layer_001.npz"
  npz.write_bytes(npz.read_bytes()[:npz.stat().st_size // 2])
  other = tmp / "other_run"  # Two tasks: not the run of the export.
  shutil.copytree(run, other, ignore=no_exports)
  meta = json.loads((other / "pareto" / "meta.json").read_text())
  meta |= {"tasks": ["general", "math"], "prefs": [[1, 0], [0, 1]]}
  (other / "pareto" / "meta.json").write_text(json.dumps(meta))
  no_config, no_tokenizer = tmp / "no_config", tmp / "no_tokenizer"
  shutil.copytree(export, no_config)
  (no_config / "config.json").unlink()
  shutil.copytree(export, no_tokenizer)
  for p in no_tokenizer.iterdir():
    if p.name.startswith(("tokenizer", "special_tokens", "vocab")):
      p.unlink()
  names = {"binary": "binary.txt", "one_doc": "one_doc.txt",
           "small_a": "small_a.txt", "small_b": "small_b.txt",
           "folder_txt": "folder.txt", "file": "a_file",
           "nonempty": "nonempty", "empty": "empty"}
  return {**{k: str(files / v) for k, v in names.items()},
          "run": str(run), "export": str(export), "truncated": str(truncated),
          "other_run": str(other), "no_config": str(no_config),
          "no_tokenizer": str(no_tokenizer), "fresh": str(tmp / "fresh"),
          "missing": str(tmp / "missing"), "files": str(files)}


@pytest.fixture(scope="module")
def outcomes(tiny_run, tiny_export, tmp_path_factory):
  """Every case run once; the trees written before, checked after."""
  tmp = tmp_path_factory.mktemp("cli")
  paths = _inputs(tmp, tiny_run, tiny_export[0])
  guarded = [tiny_run, pathlib.Path(paths["files"])]
  before = [_tree(p) for p in guarded]
  results = {}
  for module in (RUN, COMPARE, EXPORT, PARITY, BENCH, CONVERT):
    todo = [(case, argv) for mod, case, argv, *_ in [*CASES, RERUN]
            if mod == module]
    argvs = [[a.format(**paths) for a in argv] for _, argv in todo]
    for (case, _), res in zip(todo, cli_worker.run_cases(module, argvs, tmp),
                              strict=True):
      results[(module, case)] = res
  after = [_tree(p) for p in guarded]
  return {"results": results, "paths": paths, "before": before,
          "after": after}


@pytest.mark.parametrize("module,case,argv,status,names", CASES,
                         ids=[f"{m.split('.')[-1]}-{c}"
                              for m, c, *_ in CASES])
def test_bad_input_is_one_error_line(outcomes, module, case, argv, status,
                                     names):
  del argv
  res = outcomes["results"][(module, case)]
  err = res["stderr"]
  assert "Traceback" not in err, err[-3000:]
  assert res["status"] == status, err[-3000:]
  lines = [s for s in err.splitlines() if s.startswith("error:")]
  assert len(lines) == 1, err[-3000:]
  for name in names:
    assert name.format(**outcomes["paths"]) in lines[0], lines[0]
  # Nothing but that line (and its indented continuation) on stderr.
  assert all(s.startswith(("error:", "  ")) for s in err.splitlines()), err


def test_bad_input_damages_nothing(outcomes):
  assert outcomes["after"] == outcomes["before"]
  # No case created the --out_dir / --out it named ...
  assert not pathlib.Path(outcomes["paths"]["fresh"]).exists()
  # ... and the wrong-run parity blamed the run, not a --preference that
  # was never passed.
  err = outcomes["results"][(PARITY, "wrong_run")]["stderr"]
  assert "--preference" not in err


def test_identical_rerun_says_nothing_was_redone(outcomes):
  res = outcomes["results"][RERUN[:2]]
  assert res["status"] == 0 and res["stderr"] == "", res["stderr"]
  assert "nothing was redone" in res["stdout"]
  assert "wrote" not in res["stdout"]


@pytest.mark.parametrize("module", [RUN, COMPARE, BENCH, EXPORT, PARITY])
def test_entry_points(module, tmp_path):
  proc = subprocess.run([sys.executable, "-m", module, "--no_such_flag=1"],
                        cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == USAGE, proc.stderr[-2000:]
  assert proc.stderr.splitlines() == [
      "error: Unknown command line flag 'no_such_flag' (--helpfull lists "
      "every flag)"]


def test_overwrite_deletes_every_output_of_the_previous_run(tiny_run,
                                                            tmp_path):
  out = tmp_path / "run"
  shutil.copytree(tiny_run, out)
  (out / "export_centroid").mkdir(exist_ok=True)
  (out / "export_0.5-0.25-0.25").mkdir()
  (out / "notes.txt").write_text("mine\n")
  rec = run_record.ConfigRecord(*_configs(out, "--sparsity=0.6"))
  with pytest.raises(cli.UsageError, match="another configuration"):
    run_record.check_run_dir(rec, overwrite=False)
  assert run_record.check_run_dir(rec, overwrite=True)[1] is False
  run_record.start_run_dir(rec, overwrite=True, resuming=False)
  others = {p.name for p in tiny_run.iterdir()
            if p.name not in run_record.RUN_OUTPUTS
            and not p.name.startswith(run_record.EXPORT_PREFIX)}
  assert {p.name for p in out.iterdir()} == {"config.json", "notes.txt",
                                             *others}
  rec = json.loads((out / "config.json").read_text())
  assert rec["pattern"]["sparsity"] == 0.6


def test_compare_overwrite_deletes_the_previous_comparison(tmp_path):
  from experiments.lib import comparison

  out = tmp_path / "cmp"
  out.mkdir()
  for name in (*comparison.COMPARE_OUTPUTS, "notes.txt"):
    (out / name).write_text("old\n")
  run, _ = _configs(out)
  with pytest.raises(cli.UsageError, match="not empty"):
    comparison.check_out_dir(run, overwrite=False)
  comparison.prepare_out_dir(run, overwrite=True)
  assert [p.name for p in out.iterdir()] == ["notes.txt"]


def _configs(out_dir, *extra):
  from absl import flags
  from absl.testing import flagsaver

  with flagsaver.flagsaver():
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["run", *TINY_RUN_FLAGS, f"--out_dir={out_dir}", *extra])
    return shared_flags.configs_from_flags()


def test_outputs_have_the_usual_permissions(tmp_path):
  umask = os.umask(0)
  os.umask(umask)
  artifact.write_json(tmp_path / "r.json", {"a": 1})
  artifact.write_text(tmp_path / "r.md", "x")
  for name in ("r.json", "r.md"):
    assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_eta_leaves_the_compiling_first_layer_out():
  assert eta_text([30.0], 29).startswith("ETA after the next layer")
  assert eta_text([30.0, 2.0, 4.0], 10) == "ETA 30s"
  assert eta_text([30.0, 20.0], 30) == "ETA 10m00s"
  assert eta_text([30.0], 0) == "ETA 0s"


def test_preferences_print_short():
  assert preferences.format_pref(np.full(3, 1 / 3, np.float32)) == (
      "0.333, 0.333, 0.333")
  assert preferences.format_pref([1.0, 0.0, 0.5]) == "1, 0, 0.5"


def test_front_2d_and_single_task_plot(tmp_path):
  x = np.array([3.0, 1.0, 2.0, 2.5, 1.0])
  y = np.array([1.0, 3.0, 2.0, 2.5, 4.0])
  np.testing.assert_array_equal(front_plot.front_2d(x, y), [1, 2, 0])
  png = tmp_path / "one.png"
  front_plot.plot_fronts(png, ["general"], np.ones((1, 1)), np.array([[9.0]]),
                     np.array([5.0]))
  assert png.stat().st_size > 5_000


def test_plot_merges_entries_with_equal_points(tmp_path):
  w = np.array([[105.89, 4.23, 16.59]])
  merged = front_plot.merge_identical({
      "alps-concat": w, "sparsegpt-concat": w * 1.2, "mosp:W": w.copy(),
      "mosp[x]:W": w.copy(), "one-off": w * (1 + 1e-7)})
  assert list(merged) == ["alps-concat = mosp:W = mosp[x]:W",
                          "sparsegpt-concat", "one-off"]
  np.testing.assert_array_equal(merged["alps-concat = mosp:W = mosp[x]:W"],
                                w)
  png = tmp_path / "fronts.png"
  prefs = np.eye(3, dtype=np.float32)
  front_plot.plot_fronts(png, ["a", "b", "c"], prefs, 100 + 10 * prefs,
                         np.full(3, 90.0), extra={"x": w, "y": w.copy()})
  assert png.stat().st_size > 5_000
