"""Gram capture against PyTorch hooks; the artifact round trip."""

import jax
import numpy as np
import pytest
import torch

from bridge.torch_convert import torch_to_flax
from mosp_jax import models
from mosp_jax.pipeline import artifact, preferences
from mosp_jax.pipeline import grams as grams_lib
from mosp_jax.pipeline.grams import layer_grams
from mosp_jax.solvers import ParetoLayer

from .tiny_models import tiny_torch


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_grams_equal_xtx_of_pytorch_inputs(family):
  tm = tiny_torch(family)
  fm, params = torch_to_flax(tm)
  adapter = models.adapter_for(fm)
  ids = np.random.default_rng(0).integers(3, 90, (6, 11)).astype(np.int32)
  # Independent reference: inputs of layer 0's linears from PyTorch hooks.
  seen = {}
  block = {"llama": lambda: tm.model.layers,
           "gpt2": lambda: tm.transformer.h}.get(
               family, lambda: tm.model.decoder.layers)()[0]
  hooks = [block.get_submodule(g[0]).register_forward_hook(
      lambda mod, inp, out, key=g[0]: seen.__setitem__(
          key, inp[0].detach().double().numpy().reshape(-1,
                                                        inp[0].shape[-1])))
           for g in adapter.linear_groups()]
  with torch.no_grad():
    tm(torch.tensor(ids, dtype=torch.long))
  for h in hooks:
    h.remove()
  params = jax.device_put(params)
  stream = [adapter.embed(params, jax.device_put(ids[lo:lo + 2]))
            for lo in range(0, 6, 2)]  # three batches
  with jax.transfer_guard("disallow"):
    grams = layer_grams(adapter, adapter.layer_params(params, 0), stream)
    # Accumulators kept across calls (the walk's) change nothing.
    sums: dict = {}
    for _ in range(2):
      again = layer_grams(adapter, adapter.layer_params(params, 0), stream,
                          sums=sums)
      for key, G in grams.items():
        np.testing.assert_array_equal(again[key], G)
  assert sorted(grams) == sorted(g[0] for g in adapter.linear_groups())
  for key, G in grams.items():
    X = seen[key]
    ref = X.T @ X / X.shape[0]
    np.testing.assert_allclose(G, ref, rtol=1e-4,
                               atol=1e-5 * np.abs(ref).max())


def test_an_empty_stream_is_refused_before_any_gram():
  fm, params = torch_to_flax(tiny_torch("llama"))
  adapter = models.adapter_for(fm)
  sums = {"kept": np.ones(2)}
  with pytest.raises(ValueError, match=r"layer 0, task math: the stream is "
                     r"empty; no Gram of 'self_attn\.q_proj'"):
    layer_grams(adapter, adapter.layer_params(jax.device_put(params), 0),
                [], where="layer 0, task math", sums=sums)
  np.testing.assert_array_equal(sums.pop("kept"), 1.0)
  assert not sums  # No accumulator was started.


def test_gram_sums_are_float64_in_place():
  rng = np.random.default_rng(0)
  batches = [rng.standard_normal((40, 40)).astype(np.float32) * 10.0 ** e
             for e in (6, -3, 0)]
  acc = grams_lib.accumulate(None, batches[0])
  first = acc
  for b in batches[1:]:
    acc = grams_lib.accumulate(acc, b)
  assert acc is first and acc.dtype == np.float64  # No copy per batch.
  # Independent reference: a plain loop in float64, then the mean in
  # float64 cast once to float32.
  ref = np.zeros((40, 40))
  for b in batches:
    ref = ref + b.astype(np.float64)
  np.testing.assert_array_equal(acc, ref)
  got = grams_lib.finish(acc, 7)
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, (ref / 7).astype(np.float32))
  # `first` starts over in the same buffer (the walk's reuse).
  again = grams_lib.accumulate(np.full((40, 40), np.nan), batches[2],
                               first=True)
  np.testing.assert_array_equal(again, batches[2].astype(np.float64))
  # Summed in float32, the result differs.
  assert not np.array_equal(got, ((batches[0] + batches[1] + batches[2])
                                  / np.float32(7)).astype(np.float32))


def test_artifact_round_trip(tmp_path):
  rng = np.random.default_rng(0)

  def sparse(*shape):
    W = rng.standard_normal(shape).astype(np.float32)
    return np.where(rng.random(shape) < 0.5, W, 0).astype(np.float32)

  core = rng.random((12, 5)) < 0.3
  W_tasks = sparse(3, 12, 5)
  W_tasks[1, 0, 0] = -0.0
  par = ParetoLayer(core=core, W=sparse(12, 5), W_tasks=W_tasks,
                    d=rng.random(12).astype(np.float32))
  other = par._replace(core=~core)
  artifact.save_layer(tmp_path, 4, {"q": par, "k": other})
  linears = artifact.load_layer(tmp_path, 4)
  assert sorted(linears) == ["k", "q"]
  for want, got in ((par, linears["q"]), (other, linears["k"])):
    for a, b in zip(want, got, strict=True):
      np.testing.assert_array_equal(a, b)
      assert a.dtype == b.dtype
  assert not list(tmp_path.glob("*.tmp"))
  with pytest.raises(FileNotFoundError, match="layer 5"):
    artifact.load_layer(tmp_path, 5)


def test_preference_sets():
  g = preferences.simplex_grid(3, 2)
  assert g.shape == (6, 3)
  np.testing.assert_allclose(g.sum(1), 1)
  np.testing.assert_array_equal(g[:3], np.eye(3))  # vertices first
  assert preferences.with_centroid(g).shape == (7, 3)
  p = preferences.ensure_vertices(np.array([[0.5, 0.5, 0.0]], np.float32))
  assert p.shape == (4, 3)
  for bad, msg in [(np.array([[0.5, 0.6, -0.1]]), ">= 0"),
                   (np.array([[0.5, 0.6, 0.1]]), "sum to 1"),
                   (np.array([[0.5, 0.5]]), "3 weights")]:
    with pytest.raises(ValueError, match=msg):
      preferences.check_prefs(bad, 3, flag="--prefs")
