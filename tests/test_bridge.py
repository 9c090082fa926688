"""Flax -> PyTorch export and parity (bridge.torch_export,
bridge.parity_check)."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from absl import flags
from absl.testing import flagsaver
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from bridge import (
  hf_import,
  model_files,
  parity_check,
  perplexity,
  pruned,
  rename,
  torch_convert,
  torch_export,
)
from experiments.lib import runner, shared_flags
from mosp_jax import cli, config, models
from mosp_jax.pipeline import artifact, gram_store, run_record
from mosp_jax.solvers import mosp_materialize

from .conftest import rel_err
from .tiny_models import VOCAB, tiny_tokenizer, tiny_torch

FAMILIES = [("llama", {}), ("llama", {"tie_word_embeddings": False}),
            ("opt", {}), ("opt-proj", {}), ("gpt2", {}),
            ("qwen2", {}), ("qwen3", {}), ("mistral", {})]
IDS = np.random.default_rng(0).integers(3, VOCAB, (3, 9)).astype(np.int32)


def _export_flax(tmp_path, family, overrides, dtype="float32"):
  """A random tiny PyTorch model -> Flax -> an exported checkpoint."""
  tm = tiny_torch(family, **overrides)
  fm, params = torch_convert.torch_to_flax(tm)
  out = tmp_path / f"export-{family}-{dtype}"
  state = torch_export.to_torch_state(fm.config, params, what=str(out))
  torch_export.write_checkpoint(out, fm.config, state, tiny_tokenizer(),
                            dtype=dtype, provenance={})
  return tm, fm, params, out


@pytest.mark.parametrize("family,overrides", FAMILIES,
                         ids=[f"{f}{'-untied' if o else ''}"
                              for f, o in FAMILIES])
def test_flax_torch_flax_round_trip_is_exact(tmp_path, family, overrides):
  tm, fm, params, out = _export_flax(tmp_path, family, overrides)
  # Stock transformers, no custom code: the same PyTorch model, bitwise.
  loaded = AutoModelForCausalLM.from_pretrained(out)
  assert type(loaded) is type(tm) and loaded.dtype == torch.float32
  want, got = tm.state_dict(), loaded.state_dict()
  assert sorted(got) == sorted(want)
  for k in want:
    assert torch.equal(got[k], want[k]), k
  with torch.no_grad():
    ids = torch.tensor(IDS, dtype=torch.long)
    assert torch.equal(loaded(ids).logits, tm(ids).logits)
  # And back through the import path: the same Flax tree, bitwise.
  _, back, _ = hf_import.load_model(str(out), cache=False)
  flat, flat_back = rename.flatten(params), rename.flatten(back)
  assert sorted(flat) == sorted(flat_back)
  for k in flat:
    np.testing.assert_array_equal(np.asarray(flat_back[k]), flat[k],
                                  err_msg="/".join(k))
  # A tied model stores no head; the config names the stock class.
  stored = load_file(str(out / torch_export.WEIGHTS))
  assert ("lm_head.weight" in stored) == (not tm.config.tie_word_embeddings)
  cfg = json.loads((out / "config.json").read_text())
  assert cfg["architectures"] == [type(tm).__name__]
  assert cfg["torch_dtype"] == "float32"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_exports_round_once_and_keep_zeros(tmp_path, dtype):
  tm = tiny_torch("llama")
  fm, params = torch_convert.torch_to_flax(tm)
  kernel = params["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"]
  kernel[::2] = 0.0  # Pruned rows must stay exact zeros.
  out = tmp_path / dtype
  state = torch_export.to_torch_state(fm.config, params, what=str(out))
  torch_export.write_checkpoint(out, fm.config, state, None, dtype=dtype,
                            provenance={})
  stored = load_file(str(out / torch_export.WEIGHTS))
  assert {str(v.dtype) for v in stored.values()} == {f"torch.{dtype}"}
  w = stored["model.layers.0.mlp.up_proj.weight"]
  assert torch.all(w[:, ::2] == 0) and torch.all(w[:, 1::2] != 0)
  np.testing.assert_array_equal(
      w.float().numpy(), torch_export.round_like_export(kernel.T, dtype))
  loaded = AutoModelForCausalLM.from_pretrained(out, torch_dtype="auto")
  assert str(loaded.dtype) == f"torch.{dtype}"


def test_export_diffs_names_before_writing(tmp_path):
  tm = tiny_torch("llama")
  fm, params = torch_convert.torch_to_flax(tm)
  flat = rename.flatten(params)
  q = ("model", "layers", "0", "self_attn", "q_proj", "kernel")
  flat[q[:-2] + ("q_prj", "kernel")] = flat.pop(q)
  with pytest.raises(rename.CheckpointMismatchError,
                     match=r"missing model.layers.0.self_attn.q_proj.weight "
                     r"\(did you mean 'model.layers.0.self_attn.q_prj"):
    torch_export.to_torch_state(fm.config, rename.unflatten(flat), what="x")


def test_write_is_atomic_and_refuses_an_existing_folder(tmp_path):
  tm = tiny_torch("gpt2")
  fm, params = torch_convert.torch_to_flax(tm)
  state = torch_export.to_torch_state(fm.config, params, what="x")
  out = tmp_path / "ckpt"
  out.mkdir()
  (out / "keep.txt").write_text("x")
  with pytest.raises(cli.UsageError, match="exists and is not empty"):
    torch_export.write_checkpoint(out, fm.config, state, None, dtype="float32",
                              provenance={})
  bad = dict(state, **{"transformer.wte.weight": object()})  # Fails late.
  with pytest.raises(TypeError):
    torch_export.write_checkpoint(out, fm.config, bad, None, dtype="float32",
                              provenance={}, overwrite=True)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
  assert (out / "keep.txt").exists()  # The old folder is untouched.


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_perplexity_functions_agree(family):
  tm = tiny_torch(family)
  fm, params = torch_convert.torch_to_flax(tm)
  adapter = models.adapter_for(fm)
  ids = np.random.default_rng(1).integers(3, VOCAB, (5, 12))
  p_jax = perplexity.jax_perplexity(adapter, params, ids, batch_size=2)
  p_torch = perplexity.torch_perplexity(tm, ids, batch_size=3)
  with torch.no_grad():  # Independent reference: HF's own shifted loss.
    loss = tm(torch.tensor(ids), labels=torch.tensor(ids)).loss
  np.testing.assert_allclose(p_torch, float(torch.exp(loss)), rtol=1e-5)
  np.testing.assert_allclose(p_jax, p_torch, rtol=1e-5)


def test_parity_refuses_pickled_weights(tmp_path):
  d = tmp_path / "pickled"
  d.mkdir()
  (d / "config.json").write_text("{}")
  (d / "pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(model_files.ModelLoadError, match="pickled PyTorch"):
    parity_check.check_parity(d, tmp_path, "centroid")


# A real pruned tiny run (random 2-layer Llama, SmolLM2 tokenizer): the
# session fixtures `tiny_run` and `tiny_export` of conftest.py.


def test_tiny_run_export_passes_parity(tiny_run, tiny_export):
  out, info = tiny_export
  prov = json.loads((out / torch_export.EXPORT_META).read_text())
  assert prov["run_index"] == 6 and prov["dtype"] == "float32"
  assert prov["sparsity"] == pytest.approx(0.5, abs=1e-6)
  for s in prov["linears"].values():
    assert s["kept"] == s["budget"] and s["kept_zeros"] == 0
    assert s["sparsity"] == s["mask_sparsity"]
  report = parity_check.check_parity(out)  # Run and preference from provenance.
  assert report.ok, report.problems
  assert len(report.linears) == 14 and report.tensors_differing == {}
  assert all(c.mask_equal and c.off_mask == 0 for c in report.linears)
  for r in report.ppl:
    assert r.rel_diff < 1e-5
    assert r.run_rel_diff == 0.0  # The run's own evaluation, bitwise.
  # A preference the run never evaluated, stored in bfloat16.
  half = tiny_run / "export_half"
  torch_export.export_preference(tiny_run, "0.6,0.3,0.1", half,
                             dtype="bfloat16")
  report = parity_check.check_parity(half)
  assert report.ok, report.problems
  assert report.dtype == "bfloat16"
  assert all(r.run is None for r in report.ppl)


def test_paper_construction_run_stores_no_grams_and_says_so(tmp_path):
  """A run with the paper's construction (`--pref_refit_iters=0`) keeps
  no Grams; its export says so in one line and passes parity."""
  with flagsaver.flagsaver():
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["run", "--flagfile=experiments/configs/smoke.flags",
                 f"--out_dir={tmp_path / 'run'}", "--nsamples=2",
                 "--test_tokens=128", "--core_rule=dual",
                 "--stage2_max_iter=10", "--pref_refit_iters=0"])
    run, solver = shared_flags.configs_from_flags()
  assert solver == config.PAPER
  runner.run_experiment(run, solver, log=lambda s: None)
  with pytest.raises(FileNotFoundError, match="no task Grams saved"):
    artifact.load_grams(tmp_path / "run" / "pareto", 0)
  out = tmp_path / "exported"
  log: list[str] = []
  torch_export.export_preference(tmp_path / "run", "centroid", out,
                                 log=log.append)
  lines = [line for line in log if "paper's construction" in line]
  assert len(lines) == 1 and "not refitted" in lines[0]
  report = parity_check.check_parity(out)
  assert report.ok, report.problems
  assert all(r.run_rel_diff == 0.0 for r in report.ppl)


def test_new_preference_exports_refitted(tiny_run):
  """[ours] The default run keeps its Grams compact (one per group of
  linears); a preference it never evaluated exports refitted on them:
  the projected mix's support, other values, and a lower preference
  objective (numpy, on the stored Grams) in every linear."""
  run = pruned.read_run(tiny_run)
  assert run.solver.pref_refit_iters == config.DEFAULT.pref_refit_iters > 0
  root = tiny_run / run_record.ARTIFACT_DIR
  pref = np.array([0.6, 0.3, 0.1], np.float32)
  model = pruned.preference_model(run, pref)
  assert model.run_index is None
  _, dense, _, _ = pruned.load_run_dense(run)
  for layer in range(run.num_layers):
    stored = artifact.load_grams(root, layer)
    assert sorted(stored) == ["mlp.down_proj", "mlp.gate_proj",
                              "self_attn.o_proj", "self_attn.q_proj"]
    sets = artifact.load_layer(root, layer)
    for group in run.groups:
      G = np.asarray(gram_store.to_device(stored[group[0]]), np.float64)
      damped = [g + run.solver.damping * np.mean(np.diag(g)) * np.eye(len(g))
                for g in G]
      for name in group:
        W0 = np.asarray(model.adapter.get_kernel(dense, layer, name))
        mix, mask = mosp_materialize(sets[name], pref[None],
                                     pattern=run.pattern, cfg=config.PAPER)
        W = np.asarray(model.adapter.get_kernel(model.params, layer, name))
        np.testing.assert_array_equal(W != 0, np.asarray(mask[0]))
        assert not np.array_equal(W, np.asarray(mix[0]))
        f = [sum(lam * rel_err(g, W0, w)
                 for lam, g in zip(pref, damped, strict=True))
             for w in (W, np.asarray(mix[0]))]
        assert f[0] < f[1], (layer, name, f)


def test_materialized_model_owns_its_arrays(tiny_run):
  # A run preference is materialised alone, as the run evaluated it; the
  # model keeps its own arrays, not views of the solver's output.
  run = pruned.read_run(tiny_run)
  model = pruned.preference_model(run, run.prefs[6])
  assert model.run_index == 6 and len(model.masks) == 14
  for (layer, name), mask in model.masks.items():
    assert mask.base is None, (layer, name)
    kernel = np.asarray(model.adapter.get_kernel(model.params, layer, name))
    assert kernel.nbytes == mask.size * 4  # One float32 row, not P rows.
    np.testing.assert_array_equal(kernel != 0, mask)


def test_runner_export_pref_records_parity(tiny_run):
  runner.export_and_record(tiny_run, "centroid")  # --export_pref=centroid
  res = json.loads((tiny_run / "results.json").read_text())
  exp = res["export"]
  assert exp["ok"] and exp["problems"] == [] and exp["max_rel_diff"] < 1e-5
  assert exp["checkpoint"] == str(tiny_run / "export_centroid")
  assert exp["sparsity"] == [0.5, 0.5]
  assert [r["run"] for r in exp["ppl"]] == [
      res["models"][6]["ppl"][t] for t in res["tasks"]]
  assert res["test"]["segments"] == 2  # What the parity check relied on.
  # The record on disk is the typed report's JSON, key for key, in order.
  assert list(exp) == ["checkpoint", "dtype", "preference", "ok", "ppl",
                       "max_rel_diff", "sparsity", "problems"]
  report = run_record.ExportRecord.from_dict(exp)
  assert report.ok and report.ppl[0]["task"] == res["tasks"][0]
  assert report.to_dict() == exp
  # A second call reads the passing record back and redoes nothing.
  before = (tiny_run / "results.json").read_bytes()
  runner.export_and_record(tiny_run, "centroid")
  assert (tiny_run / "results.json").read_bytes() == before


def _corrupt(src: pathlib.Path, dst: pathlib.Path, edit) -> None:
  shutil.copytree(src, dst)
  state = load_file(str(dst / torch_export.WEIGHTS))
  edit(state)
  save_file(state, str(dst / torch_export.WEIGHTS), metadata={"format": "pt"})


def test_one_changed_weight_fails_parity(tiny_run, tiny_export, tmp_path):
  out, _ = tiny_export
  key = "model.layers.1.self_attn.v_proj.weight"

  def change_kept(state):  # A kept weight, slightly: masks stay equal.
    w = state[key]
    i, j = map(int, torch.nonzero(w)[0])
    w[i, j] *= 1.01

  _corrupt(out, tmp_path / "kept", change_kept)
  report = parity_check.check_parity(tmp_path / "kept")
  assert not report.ok
  assert list(report.tensors_differing) == [key]
  assert all(c.mask_equal for c in report.linears)
  assert any(p.startswith(f"weights: {key}") for p in report.problems)

  def unprune(state):  # A pruned weight made nonzero: the mask differs.
    w = state[key]
    i, j = map(int, torch.nonzero(w == 0)[0])
    w[i, j] = 0.05

  _corrupt(out, tmp_path / "unpruned", unprune)
  report = parity_check.check_parity(tmp_path / "unpruned")
  bad = [c for c in report.linears if not c.mask_equal]
  assert [c.name for c in bad] == ["1.self_attn.v_proj"]
  assert bad[0].off_mask == 1 and bad[0].sparsity < bad[0].mask_sparsity
  assert any(p.startswith("masks: 1.self_attn.v_proj") for p in
             report.problems)

  def break_norm(state):  # Large enough for the perplexities to differ.
    state["model.norm.weight"][0] = 1e4

  _corrupt(out, tmp_path / "norm", break_norm)
  report = parity_check.check_parity(tmp_path / "norm", rtol=1e-3)
  assert any(p.startswith("ppl: ") for p in report.problems), report.problems


def test_parity_cli_exits_nonzero_on_a_corrupt_export(tiny_export, tmp_path):
  out, _ = tiny_export

  def change(state):
    state["model.embed_tokens.weight"][5, 3] += 0.5

  _corrupt(out, tmp_path / "bad", change)
  proc = subprocess.run(
      [sys.executable, "-m", "bridge.parity",
       f"--checkpoint={tmp_path / 'bad'}"], capture_output=True, text=True,
      cwd=pathlib.Path(__file__).parents[1], timeout=300)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert proc.stderr == ""  # No library logs or deprecation warnings.
  assert "PARITY FAILED" in proc.stdout
  assert "weights: model.embed_tokens.weight differs" in proc.stdout
  assert "PPL torch" in proc.stdout


def test_preference_flags():
  tasks = ("general", "math", "pycode")
  np.testing.assert_array_equal(pruned.parse_preference("centroid", tasks),
                                np.full(3, 1 / 3, np.float32))
  with pytest.raises(ValueError, match="--preference: expected 'centroid'"):
    pruned.parse_preference("a,b,c", tasks)
  with pytest.raises(ValueError, match="--preference: each preference must"):
    pruned.parse_preference("0.5,0.5,0.5", tasks)
  with pytest.raises(ValueError, match="--export_pref: expected prefer"):
    pruned.parse_preference("0.5,0.5", tasks, flag="--export_pref")
  assert pruned.preference_tag("0.50,0.25,0.25") == "0.5-0.25-0.25"
