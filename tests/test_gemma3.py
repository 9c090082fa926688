"""Gemma 3 (mosp_jax.models.gemma3) against transformers' PyTorch
`Gemma3ForCausalLM`, its walk, its export, and the chunked NLL."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from bridge import (
  parity_check,
  perplexity,
  torch_convert,
  torch_export,
)
from mosp_jax import models
from mosp_jax.models import gemma3
from mosp_jax.pipeline import streams
from mosp_jax.pipeline.layer_source import from_tree

from .tiny_models import VOCAB, tiny_config, tiny_tokenizer, tiny_torch

T = 24  # Six times the tiny config's sliding window.
IDS = np.random.default_rng(0).integers(3, VOCAB, (2, T)).astype(np.int32)


def _torch_logits(model, ids=IDS) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


def _close(got, want):
  """Within 1e-5 of the logits' scale (float32 rounding)."""
  want = np.asarray(want)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5,
                             atol=1e-5 * np.abs(want).max())


def test_tiny_config_has_both_kinds_and_a_biting_window():
  config = tiny_config("gemma3")
  assert config.layer_types == ["sliding_attention", "full_attention"] * 2
  assert config.rope_scaling["rope_type"] == "linear"
  tm = tiny_torch("gemma3")
  wide = tiny_torch("gemma3", sliding_window=T)
  want, unwindowed = _torch_logits(tm), _torch_logits(wide)
  # The window changes nothing within its span and everything beyond it.
  np.testing.assert_array_equal(want[:, :4], unwindowed[:, :4])
  assert np.abs(want[:, 4:] - unwindowed[:, 4:]).min(axis=-1).max() > 0


@pytest.mark.parametrize("overrides", [
    {}, {"tie_word_embeddings": False, "final_logit_softcapping": 3.0},
    {"rope_scaling": None, "attention_bias": True}],
    ids=["tied", "untied-softcap", "unscaled-bias"])
def test_logits_match_pytorch(overrides):
  tm = tiny_torch("gemma3", **overrides)
  fm, params = torch_convert.torch_to_flax(tm)
  assert isinstance(fm, gemma3.FlaxGemma3ForCausalLM)
  want = _torch_logits(tm)
  _close(fm(IDS, params=params).logits, want)
  # Layer by layer through the adapter, as the walk computes.
  adapter = models.adapter_for(fm)
  h = adapter.embed(params, IDS)
  for i in range(adapter.num_layers(params)):
    h, xs = adapter.apply_layer(params, i, h, capture=True)
    assert sorted(xs) == sorted(adapter.linear_names())
  _close(adapter.head(params, h), want)


def test_captured_inputs_are_the_linears_inputs():
  tm = tiny_torch("gemma3")
  fm, params = torch_convert.torch_to_flax(tm)
  adapter = models.adapter_for(fm)
  got: dict[str, np.ndarray] = {}

  def keep(name):
    def hook(module, args):
      got[name] = args[0].numpy()
    return hook

  hooks = [mod.register_forward_pre_hook(keep(name))
           for name, mod in tm.model.layers[1].named_modules()
           if isinstance(mod, torch.nn.Linear)]
  _torch_logits(tm)
  for hook in hooks:
    hook.remove()
  h = adapter.apply_layer(params, 0, adapter.embed(params, IDS))[0]
  _, xs = adapter.apply_layer(params, 1, h, capture=True)
  assert sorted(got) == sorted(xs)
  for name, x in xs.items():
    _close(x, got[name])


def test_one_layer_function_serves_local_and_global_layers():
  """[ours] The layer's kind is data: one trace for all layers."""
  import jax
  tm = tiny_torch("gemma3")
  fm, params = torch_convert.torch_to_flax(tm)
  adapter = models.adapter_for(fm)
  traces = []

  @jax.jit
  def block(layer_params, hidden):
    traces.append(1)
    return adapter.apply_block(layer_params, hidden)[0]

  source = from_tree(adapter, params)
  h = adapter.embed(params, IDS)
  for i in range(source.num_layers):
    lp = source.layer(i)
    assert int(lp[gemma3.IS_SLIDING]) == (i % 2 == 0)
    h = block(lp, h)
  assert len(traces) == 1
  _close(adapter.head(params, h), _torch_logits(tm))
  with pytest.raises(KeyError, match="lacks"):
    adapter.apply_block(params["model"]["layers"]["0"], h)


def test_refuses_unsupported_variants():
  with pytest.raises(NotImplementedError, match="rope_type 'dynamic'"):
    gemma3.check_config(tiny_config(
        "gemma3", rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
  with pytest.raises(NotImplementedError, match="bidirectional"):
    gemma3.check_config(tiny_config("gemma3",
                                    use_bidirectional_attention=True))


def test_export_round_trip_is_exact(tmp_path):
  tm = tiny_torch("gemma3")
  fm, params = torch_convert.torch_to_flax(tm)
  out = tmp_path / "export"
  state = torch_export.to_torch_state(fm.config, params, what=str(out))
  torch_export.write_checkpoint(out, fm.config, state, tiny_tokenizer(),
                                dtype="float32", provenance={})
  # Stock transformers, no custom code; eager attention as the reference.
  loaded = AutoModelForCausalLM.from_pretrained(out,
                                                attn_implementation="eager")
  assert type(loaded).__name__ == "Gemma3ForCausalLM"
  want, got = tm.state_dict(), loaded.state_dict()
  assert sorted(got) == sorted(want)
  for k in want:
    assert torch.equal(got[k], want[k]), k
  np.testing.assert_array_equal(_torch_logits(loaded), _torch_logits(tm))


def test_perplexity_matches_pytorch_and_chunked_nll_agrees():
  tm = tiny_torch("gemma3")
  fm, params = torch_convert.torch_to_flax(tm)
  adapter = models.adapter_for(fm)
  ids = np.random.default_rng(1).integers(3, VOCAB, (5, T))
  p_jax = perplexity.jax_perplexity(adapter, params, ids, batch_size=2)
  with torch.no_grad():  # HF's own shifted loss.
    loss = tm(torch.tensor(ids), labels=torch.tensor(ids)).loss
  np.testing.assert_allclose(p_jax, float(torch.exp(loss)), rtol=1e-5)
  h = streams.dense_stream(adapter, params, ids, batch_size=5)[0]
  whole = streams.nll(adapter, params, h, ids)
  for chunk in (1, 7, 5 * (T - 1), 1000):  # Padded, exact, beyond.
    np.testing.assert_allclose(
        streams.nll_chunked(adapter, params, h, ids, chunk=chunk), whole,
        rtol=2e-6)


def test_pruned_run_exports_to_stock_transformers(tmp_path):
  """A whole run on a tiny Gemma 3 folder (word-level tokenizer: its BOS
  separates documents and leads segments), its centroid exported and
  checked by the parity check (stock `AutoModelForCausalLM`)."""
  from absl import flags
  from absl.testing import flagsaver

  from experiments.lib import runner, shared_flags

  d = tmp_path / "tiny-gemma3"
  tiny_torch("gemma3").save_pretrained(d)
  tiny_tokenizer().save_pretrained(d)
  with flagsaver.flagsaver():
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["run", "--flagfile=experiments/configs/smoke.flags",
                 f"--model={d}", f"--out_dir={tmp_path / 'run'}",
                 "--nsamples=2", "--seqlen=16", "--test_tokens=64",
                 "--max_iter=30", "--stage2_max_iter=30"])
    run, solver = shared_flags.configs_from_flags()
  runner.run_experiment(run, solver, log=lambda s: None)
  out = tmp_path / "exported"
  torch_export.export_preference(tmp_path / "run", "centroid", out)
  report = parity_check.check_parity(out)
  assert report.ok, report.problems
  assert len(report.linears) == 4 * 7
  assert all(c.mask_equal and c.off_mask == 0 for c in report.linears)
  for r in report.ppl:  # PyTorch's, and the run's own evaluation.
    assert r.rel_diff < 1e-5 and r.run_rel_diff < 1e-5
