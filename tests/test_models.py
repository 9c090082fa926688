"""Tests of mosp_jax.models: the layer walk against whole-model references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import FlaxLlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from bridge.rename import flatten
from bridge.torch_convert import torch_to_flax
from mosp_jax import models
from mosp_jax.models import llama
from mosp_jax.models.base import tree_get
from tests.tiny_models import VOCAB, tiny_config, tiny_torch

FAMILIES = ["llama", "opt", "opt-proj", "gpt2", "qwen2", "qwen3", "mistral"]
ATOL = 1e-4


def _ids(b: int = 2, t: int = 9, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, VOCAB, (b, t)).astype(
      np.int32)


def _walk(adapter, params, ids, *, capture=False):
  """embed -> every layer -> head; returns logits and per-layer captures."""
  h = adapter.embed(params, ids)
  caps = []
  for i in range(adapter.num_layers(params)):
    h, cap = adapter.apply_layer(params, i, h, capture=capture)
    caps.append(cap)
  return adapter.head(params, h), caps


def _torch_logits(model, ids) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


@pytest.fixture(scope="module", params=FAMILIES)
def converted(request):
  """(family, torch model, Flax model, params) of one tiny random model."""
  tm = tiny_torch(request.param)
  fm, params = torch_to_flax(tm)
  return request.param, tm, fm, params


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": False}])
def test_walk_equals_full_flax_forward(family, overrides):
  cfg = tiny_config(family, **overrides)
  model = models.model_class(cfg)(cfg, seed=1)
  ids = _ids()
  want = model(ids, params=model.params).logits
  got, _ = _walk(models.adapter_for(model), model.params, ids)
  assert got.shape == (2, 9, VOCAB)
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_walk_equals_stock_hf_llama_when_stock_is_right():
  # theta 10000 and an untied head: the stock HF model is correct, and ours
  # has the same parameter tree.
  cfg = tiny_config("llama", rope_theta=10000.0, tie_word_embeddings=False)
  stock = FlaxLlamaForCausalLM(cfg, seed=2)
  ids = _ids()
  want = stock(ids, params=stock.params).logits
  ours = models.FlaxLlamaForCausalLMFixed(cfg, _do_init=False)
  got_full = ours(ids, params=stock.params).logits
  got_walk, _ = _walk(models.adapter_for(ours), stock.params, ids)
  np.testing.assert_allclose(got_full, want, atol=ATOL, rtol=0)
  np.testing.assert_allclose(got_walk, want, atol=ATOL, rtol=0)


def test_flax_equals_pytorch(converted):
  family, tm, fm, params = converted
  ids = _ids()
  want = _torch_logits(tm, ids)
  np.testing.assert_allclose(
      fm(ids, params=params).logits, want, atol=ATOL, rtol=0)
  got, _ = _walk(models.adapter_for(fm), params, ids)
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_llama_theta_and_tie_match_pytorch_but_stock_hf_does_not():
  tm = tiny_torch("llama")  # rope_theta=1e5, tied head.
  cfg = tm.config
  assert cfg.rope_theta == 100000.0 and cfg.tie_word_embeddings
  fm, params = torch_to_flax(tm)
  assert "lm_head" not in params  # One shared matrix, as in PyTorch.
  ids = _ids(t=40)
  want = _torch_logits(tm, ids)
  np.testing.assert_allclose(
      fm(ids, params=params).logits, want, atol=ATOL, rtol=0)

  stock = FlaxLlamaForCausalLM(cfg, _do_init=False)
  # The stock model wants its own head even though the config ties it.
  assert "lm_head" in stock.params_shape_tree
  emb = params["model"]["embed_tokens"]["embedding"]
  stock_params = dict(params, lm_head={"kernel": emb.T})
  stock_logits = stock(ids, params=stock_params).logits
  assert float(jnp.abs(stock_logits - want).max()) > 0.1
  # Only RoPE's base differs: at theta 10000 the stock model is right.
  cfg10k = tiny_config("llama", rope_theta=10000.0)
  tm10k = tiny_torch("llama", rope_theta=10000.0)
  _, p10k = torch_to_flax(tm10k)
  stock10k = FlaxLlamaForCausalLM(cfg10k, _do_init=False)
  p10k = dict(p10k, lm_head={
      "kernel": p10k["model"]["embed_tokens"]["embedding"].T})
  np.testing.assert_allclose(
      stock10k(ids, params=p10k).logits, _torch_logits(tm10k, ids),
      atol=ATOL, rtol=0)


@pytest.mark.parametrize("theta", [10000.0, 100000.0])
def test_rope_table_matches_pytorch(theta):
  cfg = tiny_config("llama", hidden_size=576, num_attention_heads=9,
                    num_key_value_heads=3, rope_theta=theta,
                    max_position_embeddings=4096)
  pos = torch.arange(4096)[None]
  cos, sin = LlamaRotaryEmbedding(cfg)(torch.zeros(1), pos)
  table = llama.rope_table(4096, 64, theta)
  assert table.shape == (4096, 1, 128) and table.dtype == np.float32
  np.testing.assert_allclose(table[:, 0, :64], sin[0].numpy(), atol=2e-7)
  np.testing.assert_allclose(table[:, 0, 64:], cos[0].numpy(), atol=2e-7)


def test_captured_inputs_match_pytorch_hooks(converted):
  family, tm, fm, params = converted
  adapter = models.adapter_for(fm)
  ids = _ids()
  seen: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}
  blocks = {"opt": lambda: tm.model.decoder.layers,
            "opt-proj": lambda: tm.model.decoder.layers,
            "gpt2": lambda: tm.transformer.h}.get(
                family, lambda: tm.model.layers)()
  hooks = []
  for i, block in enumerate(blocks):
    for name in adapter.linear_names():
      module = block.get_submodule(name)

      def hook(mod, inputs, output, key=(i, name)):
        # PyTorch OPT also flattens (B, T) before its MLP.
        x, y = inputs[0].detach().numpy(), output.detach().numpy()
        seen[key] = (x.reshape(ids.shape + x.shape[-1:]),
                     y.reshape(ids.shape + y.shape[-1:]))

      hooks.append(module.register_forward_hook(hook))
  try:
    _torch_logits(tm, ids)
  finally:
    for h in hooks:
      h.remove()
  _, caps = _walk(adapter, params, ids, capture=True)
  assert len(caps) == len(blocks)
  for i, cap in enumerate(caps):
    assert sorted(cap) == sorted(adapter.linear_names())
    for name, x in cap.items():
      x_pt, y_pt = seen[(i, name)]
      n_in = adapter.get_kernel(params, i, name).shape[0]
      assert x.shape == (2, 9, n_in), (name, x.shape)
      np.testing.assert_allclose(x, x_pt, atol=ATOL, rtol=0,
                                 err_msg=f"layer {i} {name}")
      # The captured input and get_kernel's (n_in, n_out) layout reproduce
      # PyTorch's output of that linear.
      lin = tree_get(adapter.layer_params(params, i), name.split("."))
      y = x @ adapter.get_kernel(params, i, name) + lin.get("bias", 0.0)
      np.testing.assert_allclose(y, y_pt, atol=ATOL, rtol=0,
                                 err_msg=f"layer {i} {name}")


def test_groups_cover_every_linear_once(converted):
  _, _, fm, params = converted
  adapter = models.adapter_for(fm)
  names = [n for g in adapter.linear_groups() for n in g]
  assert len(names) == len(set(names)) == len(adapter.linear_names())
  assert names == adapter.linear_names()
  for i in range(adapter.num_layers(params)):
    layer = adapter.layer_params(params, i)
    kernels = {"/".join(k[:-1]) for k in flatten(layer) if k[-1] == "kernel"}
    assert kernels == {n.replace(".", "/") for n in names}


def test_groups_share_inputs(converted):
  _, _, fm, params = converted
  adapter = models.adapter_for(fm)
  _, caps = _walk(adapter, params, _ids(), capture=True)
  for cap in caps:
    for group in adapter.linear_groups():
      for name in group[1:]:
        np.testing.assert_array_equal(cap[name], cap[group[0]])


def test_kernel_round_trip_is_pure(converted):
  _, _, fm, params = converted
  adapter = models.adapter_for(fm)
  before = jax.tree.map(np.array, params)
  for i in range(adapter.num_layers(params)):
    for name in adapter.linear_names():
      w = adapter.get_kernel(params, i, name)
      same = adapter.set_kernel(params, i, name, w)
      jax.tree.map(np.testing.assert_array_equal, same, params)
      w2 = np.arange(w.size, dtype=np.float32).reshape(w.shape)
      new = adapter.set_kernel(params, i, name, w2)
      np.testing.assert_array_equal(adapter.get_kernel(new, i, name), w2)
      flat_old, flat_new = flatten(params), flatten(new)
      assert flat_old.keys() == flat_new.keys()
      changed = [k for k in flat_old
                 if not np.array_equal(flat_old[k], flat_new[k])]
      assert changed == [adapter.layers_path + (str(i),)
                         + tuple(name.split(".")) + ("kernel",)]
  jax.tree.map(np.testing.assert_array_equal, params, before)


def test_set_kernel_changes_the_forward(converted):
  # Zeroing the last linear of layer 0 makes the layer add only the bias.
  family, _, fm, params = converted
  adapter = models.adapter_for(fm)
  name = adapter.linear_names()[-1]
  w = adapter.get_kernel(params, 0, name)
  zeroed = adapter.set_kernel(params, 0, name, jnp.zeros_like(w))
  h = adapter.embed(params, _ids())
  out, cap = adapter.apply_layer(zeroed, 0, h, capture=True)
  out_ref, _ = adapter.apply_layer(params, 0, h)
  assert float(jnp.abs(out - out_ref).max()) > 1e-3


def test_set_kernel_rejects_wrong_shape(converted):
  _, _, fm, params = converted
  adapter = models.adapter_for(fm)
  name = adapter.linear_names()[0]
  w = adapter.get_kernel(params, 0, name)
  with pytest.raises(ValueError, match="n_in, n_out"):
    adapter.set_kernel(params, 0, name, w.T if w.shape[0] != w.shape[1]
                       else w[:, :-1])
  with pytest.raises(KeyError, match="no linear"):
    adapter.get_kernel(params, 0, "not.a.linear")


def test_apply_block_jit_equals_eager(converted):
  _, _, fm, params = converted
  adapter = models.adapter_for(fm)
  block = jax.jit(adapter.apply_block, static_argnames="capture")
  h = adapter.embed(params, _ids())
  for i in range(adapter.num_layers(params)):
    lp = adapter.layer_params(params, i)
    out_e, cap_e = adapter.apply_block(lp, h, capture=True)
    out_j, cap_j = block(lp, h, capture=True)
    # Fusion reorders float32 sums: a few ulps of the largest value (64 in
    # the hidden-64 families).
    for got, want in [(out_j, out_e)] + [(cap_j[n], cap_e[n]) for n in cap_e]:
      np.testing.assert_allclose(
          got, want, atol=1e-6 * max(1.0, float(np.abs(want).max())), rtol=0)
    h = out_e


def test_adapter_for_rejects_stock_llama_and_unknown_families():
  cfg = tiny_config("llama")
  with pytest.raises(TypeError, match="rope_theta"):
    models.adapter_for(FlaxLlamaForCausalLM(cfg, _do_init=False))

  class Fake:
    config = type("C", (), {"model_type": "gpt_neox"})()

  with pytest.raises(models.UnsupportedModelError, match="gpt_neox"):
    models.adapter_for(Fake())


LLAMA31_SCALING = {"rope_type": "llama3", "factor": 8.0,
                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}
LLAMA32_SCALING = dict(LLAMA31_SCALING, factor=32.0)


@pytest.mark.parametrize("scaling", [LLAMA31_SCALING, LLAMA32_SCALING])
def test_llama3_rope_table_matches_pytorch(scaling):
  # Llama-3.1-8B's / Llama-3.2's RoPE: head_dim 128, theta 5e5; positions
  # within and beyond the original 8192-token context.
  cfg = tiny_config("llama", hidden_size=512, num_attention_heads=4,
                    num_key_value_heads=1, rope_theta=500000.0,
                    max_position_embeddings=131072, rope_scaling=scaling)
  rotary = LlamaRotaryEmbedding(cfg)
  inv = llama.rope_inv_freq(128, 500000.0, scaling)
  plain = llama.rope_inv_freq(128, 500000.0)
  np.testing.assert_array_equal(inv, rotary.inv_freq.numpy())
  # All three bands are present: kept, rescaled and interpolated.
  kept, scaled = inv == plain, inv == plain / np.float32(scaling["factor"])
  assert kept.any() and scaled.any() and (~kept & ~scaled).any()
  pos = np.r_[0:64, 8000:8300, 131000:131072]
  cos, sin = rotary(torch.zeros(1), torch.tensor(pos)[None])
  table = llama.rope_table(131072, 128, 500000.0, scaling)[pos]
  np.testing.assert_allclose(table[:, 0, :128], sin[0].numpy(), atol=2e-7)
  np.testing.assert_allclose(table[:, 0, 128:], cos[0].numpy(), atol=2e-7)


def test_llama3_scaled_model_matches_pytorch():
  # A tiny model whose head_dim 8 puts one frequency in each band.
  scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
  tm = tiny_torch("llama", rope_scaling=scaling)
  fm, params = torch_to_flax(tm)
  ids = _ids(t=40)
  want = _torch_logits(tm, ids)
  np.testing.assert_allclose(
      fm(ids, params=params).logits, want, atol=ATOL, rtol=0)
  got, _ = _walk(models.adapter_for(fm), params, ids)
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
  # The scaling matters: the same weights without it give other logits.
  plain = models.FlaxLlamaForCausalLMFixed(
      tiny_config("llama"), _do_init=False)
  assert float(jnp.abs(plain(ids, params=params).logits - want).max()) > 1e-3


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "yarn", "factor": 2.0},
])
def test_llama_rejects_other_rope_scaling(scaling):
  cfg = tiny_config("llama", rope_scaling=scaling)
  with pytest.raises(NotImplementedError, match="rope_type"):
    models.FlaxLlamaForCausalLMFixed(cfg, _do_init=False)
  with pytest.raises(NotImplementedError, match="rope_type"):
    llama.rope_inv_freq(8, 1e4, scaling)
