"""The Llama-like families (Qwen2, Qwen3, Mistral) against PyTorch.

Per family: random weights of a small config (2 layers, hidden 64, GQA,
`tests.tiny_models.LLAMA_LIKE`), float32 logits of our Flax model and of
its layer walk within 1e-5 of PyTorch's (relative to the largest logit);
HF's own Flax Mistral shown wrong where `mosp_jax.models.mistral` says;
sliding-window Qwen configs refused; a whole `experiments.run` on each
(pruned at 50%, exported, the export reloaded by stock
`AutoModelForCausalLM` with logit and perplexity parity); the `random:`
paper configs planned (one on the command); an unsupported model type
refused in one line. The layer walk's captures and groups and the bitwise export
round trip of each family run in tests/test_models.py and
tests/test_bridge.py, whose family lists include these.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from absl import flags
from absl.testing import flagsaver
from transformers import AutoModelForCausalLM, FlaxMistralForCausalLM

from bridge import hf_import, pruned, torch_convert, torch_export
from experiments.lib import runner, shared_flags
from mosp_jax import models
from mosp_jax.models import paper_configs as pc
from tests import cli_worker
from tests.conftest import TINY_RUN_FLAGS
from tests.tiny_models import VOCAB, tiny_config, tiny_torch

RTOL = 1e-5  # Of the largest |logit|, float32 on both sides.

# (family, config overrides): tied heads as the small Qwen models have;
# Mistral with a window of 5 keys (sequences of 20 cross it), without
# one (v0.2 / v0.3), and at v0.2's rope_theta 1e6; Llama with an explicit
# head_dim, which the shared attention now honours.
CASES = [
    ("qwen2", {}),
    ("qwen2", {"tie_word_embeddings": True}),
    ("qwen3", {}),
    ("qwen3", {"tie_word_embeddings": True, "attention_bias": True}),
    ("mistral", {}),
    ("mistral", {"sliding_window": None, "rope_theta": 1e6}),
    ("llama", {"head_dim": 16}),
]


def _ids(t: int = 20, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.integers(0, VOCAB, (2, t)).astype(np.int32)


def _torch_logits(model, ids) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


def _walk_logits(adapter, params, ids) -> np.ndarray:
  h = adapter.embed(params, ids)
  for i in range(adapter.num_layers(params)):
    h, _ = adapter.apply_layer(params, i, h)
  return np.asarray(adapter.head(params, h))


def _assert_close(got, want, what: str) -> None:
  err = float(np.abs(np.asarray(got) - want).max())
  assert err <= RTOL * float(np.abs(want).max()), (what, err)


@pytest.mark.parametrize("family, overrides", CASES, ids=[
    f"{f}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}"
    for f, o in CASES])
def test_logits_match_pytorch(family, overrides):
  tm = tiny_torch(family, **overrides)
  fm, params = torch_convert.torch_to_flax(tm)
  assert type(fm) is models.model_class(tm.config)
  ids = _ids()
  want = _torch_logits(tm, ids)
  _assert_close(fm(ids, params=params).logits, want, "full forward")
  _assert_close(_walk_logits(models.adapter_for(fm), params, ids), want,
                "layer walk")
  # The quirk matters: Llama's modules on the same config and weights
  # differ (Qwen2: biases unused; Qwen3: no q/k norms; Mistral: no window).
  if family != "llama" and overrides.get("sliding_window", 1) is not None:
    plain = models.FlaxLlamaForCausalLMFixed(tm.config, _do_init=False)
    got = np.asarray(plain(ids, params=params).logits)
    assert float(np.abs(got - want).max()) > 1e-2


def test_stock_flax_mistral_is_wrong_where_documented():
  tm = tiny_torch("mistral", sliding_window=None)
  fm, params = torch_convert.torch_to_flax(tm)
  ids = _ids()

  def stock(**overrides):
    cfg = tiny_config("mistral", **overrides)
    return FlaxMistralForCausalLM(cfg, _do_init=False)(
        ids, params=params).logits

  def torch_with(**overrides):
    ref = tiny_torch("mistral", **overrides)
    ref.load_state_dict(tm.state_dict())
    return _torch_logits(ref, ids)

  def off(got, want) -> float:
    return float(np.abs(np.asarray(got) - want).max())

  # Right where its hard-coded assumptions hold: theta 1e4, a window
  # wider than the sequence.
  _assert_close(stock(sliding_window=64), torch_with(sliding_window=64),
                "stock, window 64")
  # 1. rope_theta is ignored.
  assert off(stock(sliding_window=64, rope_theta=1e6),
             torch_with(sliding_window=64, rope_theta=1e6)) > 1e-2
  # 2. No window (v0.2 / v0.3): each token sees only itself.
  assert off(stock(sliding_window=None),
             torch_with(sliding_window=None)) > 1e-2
  _assert_close(stock(sliding_window=None), torch_with(sliding_window=1),
                "stock without a window = torch window 1")
  # 3. A window of W is PyTorch's window of W + 1.
  assert off(stock(sliding_window=5), torch_with(sliding_window=5)) > 1e-2
  _assert_close(stock(sliding_window=5), torch_with(sliding_window=6),
                "stock window 5 = torch window 6")
  # Ours is right in each case.
  for window in (None, 5):
    ref = tiny_torch("mistral", sliding_window=window)
    ref.load_state_dict(tm.state_dict())
    ours, p = torch_convert.torch_to_flax(ref)
    _assert_close(ours(ids, params=p).logits, _torch_logits(ref, ids),
                  f"ours, window {window}")


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_sliding_window_layers_are_refused(family):
  sliding = tiny_config(family, use_sliding_window=True, sliding_window=4,
                        max_window_layers=1)
  with pytest.raises(NotImplementedError,
                     match=r"use_sliding_window=true .*layers 1\.\.1"):
    models.model_class(sliding)(sliding, _do_init=False)
  with pytest.raises(hf_import.ModelLoadError, match="use_sliding_window"):
    torch_convert.torch_to_flax(tiny_torch(
        family, use_sliding_window=True, sliding_window=4,
        max_window_layers=1))
  # Every layer below max_window_layers: full attention, as in PyTorch.
  full = tiny_config(family, use_sliding_window=True, sliding_window=4,
                     max_window_layers=2)
  models.model_class(full)(full, _do_init=False)


# A whole run per family, exported and checked.


@pytest.fixture(scope="module", params=["qwen2", "qwen3", "mistral"])
def family_run(request, tmp_path_factory):
  """`(family, run dir, torch model)`: `experiments.run` with the tiny
  run's flags on a random PyTorch checkpoint of the family (SmolLM2's
  tokenizer, its vocabulary), then the export of the centroid and its
  parity check (`--export_pref=centroid`)."""
  family = request.param
  root = tmp_path_factory.mktemp(family)
  tok = hf_import.load_tokenizer()
  tm = tiny_torch(family, vocab_size=len(tok))
  tm.save_pretrained(root / "model")
  tok.save_pretrained(root / "model")
  with flagsaver.flagsaver():
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["run", *TINY_RUN_FLAGS, f"--model={root / 'model'}",
                 f"--out_dir={root / 'run'}"])
    run, solver = shared_flags.configs_from_flags()
  runner.run_experiment(run, solver, log=lambda s: None)
  runner.export_and_record(root / "run", "centroid")
  return family, root / "run", tm


def test_pruned_export_loads_in_stock_transformers(family_run):
  family, run_dir, tm = family_run
  res = json.loads((run_dir / "results.json").read_text())
  exp = res["export"]
  assert exp["ok"] and exp["problems"] == [], exp["problems"]
  assert exp["max_rel_diff"] < 1e-5 and exp["sparsity"] == [0.5, 0.5]
  out = run_dir / "export_centroid"
  loaded = AutoModelForCausalLM.from_pretrained(out)
  assert type(loaded) is type(tm)
  state = loaded.state_dict()
  assert sorted(state) == sorted(tm.state_dict())
  # Qwen2's q/k/v biases are exported (dense, as trained); every pruned
  # kernel keeps half its weights.
  assert ("model.layers.0.self_attn.q_proj.bias" in state) == (
      family == "qwen2")
  adapter = models.adapter_for(torch_convert.torch_to_flax(tm)[0])
  for i in range(2):
    for name in adapter.linear_names():
      w = state[f"model.layers.{i}.{name}.weight"]
      assert float((w == 0).float().mean()) == 0.5, (i, name)
  # Logits: the run's own model of that preference, walked in JAX, and
  # the export in PyTorch.
  info = pruned.read_run(run_dir)
  model = pruned.preference_model(
      info, pruned.parse_preference("centroid", info.tasks))
  ids = np.random.default_rng(1).integers(0, len(model.tokenizer), (2, 24))
  _assert_close(_walk_logits(model.adapter, model.params, ids),
                _torch_logits(loaded, ids), "run's model vs export")
  assert torch_export.ARCHITECTURES[family] == type(tm).__name__


# The random: paper configs, and an unsupported model type, on the command.


# (q_proj, k_proj, down_proj) as (n_in, n_out), and the group input widths.
PAPER_SHAPES = {
    "qwen2.5-7b": ((3584, 3584), (3584, 512), (18944, 3584), 28),
    "qwen3-8b": ((4096, 4096), (4096, 1024), (12288, 4096), 36),
    "mistral-7b": ((4096, 4096), (4096, 1024), (14336, 4096), 32),
}


@pytest.mark.parametrize("name", sorted(PAPER_SHAPES))
def test_random_configs_plan_from_their_shapes(name):
  from mosp_jax.config import RunConfig, SolverConfig
  from mosp_jax.pipeline import plan as plan_lib
  from mosp_jax.solvers import Unstructured
  q, k, down, layers = PAPER_SHAPES[name]
  shapes = plan_lib.shapes_from_config(pc.paper_config(name))
  got = {lin.name: (lin.n, lin.o) for lin in shapes.linears}
  assert (got["self_attn.q_proj"], got["self_attn.k_proj"],
          got["mlp.down_proj"]) == (q, k, down)
  assert shapes.groups == (q[0], q[1], q[0], down[0])
  assert (shapes.layers, shapes.head_dim) == (layers, 128)
  device = plan_lib.Device("test", memory_bytes=2**40, matmul_flops=1e11,
                           eigh_flops=1e10, pass_rate=1e9, host_rate=5e8,
                           host_is_device=False)
  run = RunConfig(model=f"random:{name}", tasks=("a", "b"),
                  pattern=Unstructured(0.5), nsamples=4, seqlen=64,
                  test_tokens=256, prefs=((1.0, 0.0), (0.0, 1.0)),
                  batch_size=4, seed=0, out_dir=str(name))
  plan = plan_lib.make_plan(shapes, run, SolverConfig(), device)
  assert plan.layers == layers and plan.total_bytes > 0


def test_random_config_plans_and_unsupported_types_are_named(tmp_path):
  """On the command: `--plan_only` for random:qwen3-8b, and one `error:`
  line naming the supported families for a gpt_neox checkpoint."""
  from safetensors.numpy import save_file
  neox = tmp_path / "neox"
  neox.mkdir()
  (neox / "config.json").write_text(json.dumps(
      {"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]}))
  save_file({"x": np.zeros(2, np.float32)}, str(neox / "model.safetensors"))
  smoke = "--flagfile=experiments/configs/smoke.flags"
  plan, refused = cli_worker.run_cases("experiments.run", [
      [smoke, "--model=random:qwen3-8b", f"--out_dir={tmp_path / 'q'}",
       "--plan_only", "--device_memory_gb=1000"],
      [smoke, f"--model={neox}", f"--out_dir={tmp_path / 'x'}",
       "--plan_only"]], tmp_path, timeout=600)
  assert plan["status"] == 0, plan["stderr"][-3000:]
  assert plan["stdout"].startswith("plan: random:qwen3-8b on cpu, 36 layers")
  assert "fits in 1000.00 GiB" in plan["stdout"]
  assert refused["status"] == 1, refused["stderr"][-3000:]  # A load error.
  lines = refused["stderr"].strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), lines
  assert "'gpt_neox'" in lines[0]
  for family in models.SUPPORTED_MODEL_TYPES:
    assert family in lines[0]
  assert {"qwen2", "qwen3", "mistral"} <= set(models.SUPPORTED_MODEL_TYPES)
  assert not (tmp_path / "q").exists() and not (tmp_path / "x").exists()
