"""The dense model read one layer at a time (`pipeline.layer_source`,
`bridge.load.load_layers`) against the whole-model load: the same arrays,
the same fingerprint, the same walk; streams kept on the host; bfloat16."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from bridge import hf_import, load, model_files
from mosp_jax import models
from mosp_jax.config import SolverConfig
from mosp_jax.models import adapter_for, tiny_llama
from mosp_jax.models import paper_configs as pc
from mosp_jax.pipeline import layer_source, run_record
from mosp_jax.pipeline.checkpoint import LayerCheckpoint
from mosp_jax.pipeline.prune import prune_and_evaluate
from mosp_jax.solvers import Unstructured
from tests.tiny_models import VOCAB, tiny_config, tiny_torch

PREFS = np.array([[1, 0], [0, 1], [0.5, 0.5]], np.float32)


def _segments(vocab: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  calib = [rng.integers(0, vocab, (3, 16)).astype(np.int32) for _ in range(2)]
  test = [rng.integers(0, vocab, (3, 12)).astype(np.int32) for _ in range(2)]
  return calib, test


def _walk(adapter, model, calib, test, **kw):
  with jax.transfer_guard("disallow"):
    return prune_and_evaluate(
        adapter, model, calib, test, PREFS, pattern=Unstructured(0.5),
        cfg=SolverConfig(), batch_size=2, log=lambda s: None, **kw)


def _same_as_tree(model: layer_source.DenseLayers, adapter, params) -> None:
  """Every array of `model` equals the whole tree's, layer by layer."""
  flat = flatten_dict(jax.device_get(params))
  n = len(adapter.layers_path)
  outer = {k: v for k, v in flat.items() if k[:n] != adapter.layers_path}
  assert flatten_dict(model.outer).keys() == outer.keys()
  for k, v in flatten_dict(model.outer).items():
    np.testing.assert_array_equal(np.asarray(v), outer[k])
  assert model.num_layers == adapter.num_layers(params)
  for i in range(model.num_layers):
    got = flatten_dict(model.layer(i))
    want = flatten_dict(jax.device_get(adapter.layer_params(params, i)))
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(np.asarray(got[k]), want[k])
  assert model.sha256() == run_record.params_sha256(params)


@pytest.fixture
def converted(tmp_path, monkeypatch):
  """A tiny PyTorch Llama folder, converted into a fresh model cache:
  `(layer source, adapter, whole params)`."""
  monkeypatch.setenv("MOSP_JAX_CACHE", str(tmp_path / "cache"))
  folder = tmp_path / "pt"
  tiny_torch("llama").save_pretrained(folder)
  adapter, model, _ = load.load_layers(str(folder), tokenizer="unused")
  _, params, _ = hf_import.load_model(str(folder))  # the cached whole load
  return model, adapter, params


def test_a_converted_model_is_read_tensor_by_tensor_as_the_whole_load(
    converted):
  model, adapter, params = converted
  assert model.what.endswith(model_files.FLAX_WEIGHTS)  # not a tree in memory
  _same_as_tree(model, adapter, params)


def test_the_walk_over_per_layer_loading_equals_the_whole_load(converted):
  model, adapter, params = converted
  calib, test = _segments(VOCAB)
  per_layer = _walk(adapter, model, calib, test)
  whole = _walk(adapter, layer_source.from_tree(adapter, params), calib,
                test)
  for field in ("ppl", "sparsity", "global_ppl"):
    np.testing.assert_array_equal(getattr(per_layer, field),
                                  getattr(whole, field))
  np.testing.assert_array_equal(per_layer.walk.dense_ppl,
                                whole.walk.dense_ppl)
  assert [r.linears for r in per_layer.walk.layers] == [
      r.linears for r in whole.walk.layers]


def test_random_layers_are_drawn_as_the_whole_random_tree():
  config = tiny_config("llama")
  shapes = pc.param_shapes(config)
  adapter = adapter_for(models.model_class(config)(config, _do_init=False))
  model = layer_source.from_random(adapter, flatten_dict(shapes),
                                   std=pc.init_std(config), seed=3)
  _same_as_tree(model, adapter, pc.random_params(config, seed=3))


def test_a_random_paper_spec_walks_without_its_whole_weights():
  adapter, model, _ = load.load_layers("random:llama-2-7b:1",
                                       tokenizer="unused")
  assert model.num_layers == 1
  assert model.layer_bytes() == 4 * pc.layer_param_counts("llama-2-7b")[1]
  # The layer is drawn as the whole random tree draws it.
  want = pc.random_tree(jax.ShapeDtypeStruct((4096, 4096), jnp.float32),
                        std=0.02, prefix="model/layers/0/self_attn/q_proj/"
                        "kernel")
  got = adapter.get_layer_kernel(model.layer(0), "self_attn.q_proj")
  np.testing.assert_array_equal(np.asarray(got), want)


def test_offloaded_streams_give_identical_results_and_resume(tmp_path):
  flax_model, params = tiny_llama(vocab_size=64, seed=0)
  adapter = adapter_for(flax_model)
  model = layer_source.from_tree(adapter, params)
  calib, test = _segments(64)
  on_device = _walk(adapter, model, calib, test)

  class Killed(Exception):
    pass

  def kill(layer):
    raise Killed(layer)

  def offloaded(**kw):
    return _walk(adapter, model, calib, test, offload_streams=True,
                 checkpoint=LayerCheckpoint(tmp_path / "ckpt"), **kw)

  with pytest.raises(Killed):
    offloaded(on_layer_done=kill)
  resumed = offloaded()
  for field in ("ppl", "sparsity", "global_ppl"):
    np.testing.assert_array_equal(getattr(resumed, field),
                                  getattr(on_device, field))
  np.testing.assert_array_equal(resumed.walk.dense_ppl,
                                on_device.walk.dense_ppl)


def test_bfloat16_walk_keeps_exact_sparsity_near_float32():
  flax_model, params = tiny_llama(vocab_size=64, seed=0)
  calib, test = _segments(64)
  f32 = _walk(*load.layered(adapter_for(flax_model), params, what="tiny"),
              calib, test)
  adapter, model = load.layered(adapter_for(flax_model), params,
                                what="tiny", dtype=jnp.bfloat16)
  assert adapter.dtype == jnp.bfloat16
  assert model.layer(0)["mlp"]["down_proj"]["kernel"].dtype == jnp.bfloat16
  assert model.layer_bytes() * 2 == layer_source.from_tree(
      adapter, params).layer_bytes()
  bf16 = _walk(adapter, model, calib, test)
  np.testing.assert_array_equal(bf16.sparsity, f32.sparsity)
  np.testing.assert_allclose(bf16.walk.dense_ppl, f32.walk.dense_ppl,
                             rtol=0.02)
  np.testing.assert_allclose(bf16.ppl, f32.ppl, rtol=0.05)
