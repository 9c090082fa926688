"""experiments.diff_runs: equal runs pass, one changed bit fails."""

import json
import shutil
import subprocess
import sys

import numpy as np

from experiments import diff_runs
from tests.conftest import ROOT


def _copy(tiny_run, tmp_path, name="copy"):
  # Everything, exports included: other tests of the session may have
  # exported into the shared run before this one.
  out = tmp_path / name
  shutil.copytree(tiny_run, out)
  return out


def _edit_json(path, edit):
  d = json.loads(path.read_text())
  edit(d)
  path.write_text(json.dumps(d, indent=2) + "\n")


def test_a_copy_with_other_wall_times_is_equal(tiny_run, tmp_path):
  out = _copy(tiny_run, tmp_path)

  def new_times(d):
    d["timings"] = {k: v + 1.0 for k, v in d["timings"].items()}
    d["layers"][0]["solve_s"] += 1.0

  _edit_json(out / "results.json", new_times)
  assert diff_runs.diff_runs(tiny_run, out) == []


def test_one_changed_array_element_fails_on_the_command_line(
    tiny_run, tmp_path):
  out = _copy(tiny_run, tmp_path)
  path = out / "pareto" / "layer_001.npz"
  with np.load(path) as z:
    arrays = {k: z[k] for k in z.files}
  key = next(k for k in sorted(arrays) if arrays[k].dtype == np.float32)
  flat = arrays[key].reshape(-1)
  flat[0] = np.nextafter(flat[0], np.float32(np.inf))  # One ulp.
  np.savez(path, **arrays)
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.diff_runs", str(tiny_run),
       str(out)], capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert proc.returncode == 1, proc.stderr
  assert proc.stdout.splitlines() == [
      f"pareto/layer_001.npz: {key}: 1 of {flat.size} elements differ",
      "1 difference(s)"]


def test_a_changed_result_and_a_missing_file_are_named(tiny_run, tmp_path):
  out = _copy(tiny_run, tmp_path)

  def new_ppl(d):
    d["models"][2]["ppl"]["math"] *= 1.0 + 1e-15

  _edit_json(out / "results.json", new_ppl)
  (out / "pareto.png").unlink()
  a, b = (json.loads((run / "results.json").read_text())["models"][2]
          ["ppl"]["math"] for run in (tiny_run, out))
  assert a != b
  assert diff_runs.diff_runs(tiny_run, out) == [
      "pareto.png: only in A", f"results.json: .models[2].ppl.math: {a} != {b}"]


def test_usage_and_missing_directory(tmp_path):
  assert diff_runs.main(["diff_runs", str(tmp_path)]) == 2
  assert diff_runs.main(["diff_runs", str(tmp_path),
                         str(tmp_path / "none")]) == 2
