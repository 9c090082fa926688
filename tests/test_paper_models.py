"""mosp_jax.models.paper_configs: the paper's configs, random models."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from bridge import load
from mosp_jax import cli, models
from mosp_jax.models import paper_configs as pc
from mosp_jax.models.base import tree_get
from tests.tiny_models import tiny_config, tiny_tokenizer

# Published sizes (HF `num_parameters()` of each checkpoint; OPT's as its
# model cards round them: 1.3B, 2.7B, 30B), the independent check of the
# configs' numbers.
KNOWN_PARAMS = {
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-3-8b": 8_030_261_248,
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.2-1b": 1_235_814_400,
    "opt-1.3b": 1_315_758_080,
    "opt-2.7b": 2_651_596_800,
    "opt-30b": 29_974_540_288,
    # Model cards: 7.61B (6.53B non-embedding), 8.2B (6.95B
    # non-embedding), 7.24B.
    "qwen2.5-7b": 7_615_616_512,
    "qwen3-8b": 8_190_735_360,
    "mistral-7b": 7_241_732_096,
    # The language model of gemma-3-4b-pt: the Gemma 3 report gives 675M
    # embedding and 3,209M non-embedding parameters (checked below).
    "gemma-3-4b": 3_880_263_168,
}


@pytest.mark.parametrize("name", pc.PAPER_MODELS)
def test_param_count_matches_the_published_size(name):
  config = pc.paper_config(name)
  assert pc.param_count(config) == KNOWN_PARAMS[name]
  outside, per_layer = pc.layer_param_counts(name)
  assert outside + config.num_hidden_layers * per_layer == KNOWN_PARAMS[name]


def test_paper_configs_have_the_papers_architectures():
  l3 = pc.paper_config("llama-3-8b")
  assert (l3.num_key_value_heads, l3.rope_theta, l3.vocab_size) == (
      8, 500000.0, 128256)
  assert pc.paper_config("llama-2-7b").rope_theta == 10000.0
  assert pc.paper_config("llama-3.1-8b").rope_scaling["rope_type"] == "llama3"
  opt = pc.paper_config("opt-30b")
  assert opt.do_layer_norm_before and opt.word_embed_proj_dim == 7168
  q2, q3 = pc.paper_config("qwen2.5-7b"), pc.paper_config("qwen3-8b")
  assert (q2.num_key_value_heads, q2.rope_theta, q2.use_sliding_window) == (
      4, 1e6, False)
  assert (q3.head_dim, q3.hidden_size // q3.num_attention_heads) == (128, 128)
  mistral = pc.paper_config("mistral-7b")
  assert (mistral.sliding_window, mistral.rope_theta) == (4096, 10000.0)
  for name in pc.PAPER_MODELS:
    model = models.model_class(pc.paper_config(name))
    assert model.__name__ in ("FlaxLlamaForCausalLMFixed",
                              "FlaxOPTForCausalLM", "FlaxQwen2ForCausalLM",
                              "FlaxQwen3ForCausalLM",
                              "FlaxMistralForCausalLMFixed",
                              "FlaxGemma3ForCausalLM")
  g = pc.paper_config("gemma-3-4b")
  assert g.layer_types.count("full_attention") == 5  # Layers 5, 11, ... 29.
  assert g.layer_types[5] == "full_attention" and g.sliding_window == 1024
  outside, per_layer = pc.layer_param_counts("gemma-3-4b")
  assert round(34 * per_layer / 1e6) == 3209  # The report's non-embedding.


def test_parse_random_spec():
  assert pc.parse_random_spec("tiny-llama") is None
  assert pc.parse_random_spec("random:llama-2-7b") == ("llama-2-7b", 32)
  assert pc.parse_random_spec("random:opt-30b:2") == ("opt-30b", 2)


@pytest.mark.parametrize("spec, match", [
    ("random:llama-9-7b", "unknown paper model"),
    ("random:", "expected random:<name>"),
    ("random:llama-2-7b:0", "from 1 to 32"),
    ("random:llama-2-7b:33", "from 1 to 32"),
    ("random:llama-2-7b:two", "from 1 to 32"),
    ("random:llama-2-7b:-1", "from 1 to 32"),
    ("random:llama-2-7b:2:3", "expected random:<name>"),
    ("random:llama-2-7b", r"27\.0 GB .* random:llama-2-7b:6"),
    ("random:llama-3-8b:3", r"6\.8 GB .* random:llama-3-8b:2"),
    ("random:qwen3-8b:2", r"6\.5 GB .* random:qwen3-8b:1"),
])
def test_bad_random_specs_are_usage_errors_naming_model(spec, match):
  # Through the runner's check, which precedes any loading.
  with pytest.raises(cli.UsageError, match=match) as e:
    load.model_shape(spec)
  assert str(e.value).startswith("--model")


def test_model_shape_of_random_specs():
  assert load.model_shape("random:llama-2-7b:2") == (4096, 2)
  assert load.model_shape("random:llama-3.2-1b") == (131072, 16)
  assert load.model_shape("random:opt-30b:1") == (2048, 1)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_random_params_are_seeded_hf_init_and_layerwise(family):
  one, two = (tiny_config(family, num_hidden_layers=n) for n in (1, 2))
  p1 = pc.random_params(one, seed=3)
  p2 = pc.random_params(two, seed=3)
  jax.tree.map(np.testing.assert_array_equal, p1,
               pc.random_params(one, seed=3))
  assert jax.tree.structure(p1) == jax.tree.structure(
      jax.tree.map(np.asarray, pc.param_shapes(one)))
  adapter = models.adapter_for(models.model_class(two)(two, _do_init=False))
  # Layer 0 is the same whatever the number of layers kept.
  jax.tree.map(np.testing.assert_array_equal,
               adapter.layer_params(p1, 0), adapter.layer_params(p2, 0))
  k = adapter.get_kernel(p2, 1, adapter.linear_names()[0])
  assert k.dtype == np.float32 and abs(k.std() - 0.02) < 0.005
  assert not np.array_equal(k, adapter.get_kernel(
      pc.random_params(two, seed=4), 1, adapter.linear_names()[0]))
  for path, leaf in jax.tree_util.tree_leaves_with_path(p2):
    last = path[-1].key
    if last == "bias":
      assert not leaf.any()
    elif last in ("scale", "weight"):
      assert (leaf == 1).all()


def test_random_model_walks_one_full_width_layer():
  # random:llama-2-7b:1 whole (1.9 GB): embeddings, one 4096-wide layer
  # with its captures, the head, on a few tokens.
  spec = pc.parse_random_spec("random:llama-2-7b:1")
  model, params = pc.random_model(spec)
  adapter = models.adapter_for(model)
  ids = np.arange(6, dtype=np.int32)[None] * 5000
  h = adapter.embed(params, ids)
  h, caps = adapter.apply_layer(params, 0, h, capture=True)
  assert caps["mlp.down_proj"].shape == (1, 6, 11008)
  logits = adapter.head(params, h)
  assert logits.shape == (1, 6, 32000) and np.isfinite(logits).all()


@pytest.mark.parametrize("name", [
    "llama-2-13b", "llama-3-8b", "llama-3.2-1b", "opt-1.3b", "opt-30b",
    "qwen2.5-7b", "qwen3-8b", "mistral-7b", "gemma-3-4b"])
def test_every_paper_family_walks_one_layer(name):
  # One decoder layer at full width, drawn alone (the embeddings of
  # Llama-3's 128k vocabulary alone take 2 GB): the block runs, captures
  # every linear at its real shape and keeps the hidden state finite.
  config = pc.paper_config(name, num_layers=1)
  model = models.model_class(config)(config, _do_init=False)
  adapter = models.adapter_for(model)
  path = adapter.layers_path + ("0",)
  layer = pc.random_tree(tree_get(pc.param_shapes(config), path),
                         std=pc.init_std(config),
                         prefix="/".join(path) + "/")
  layer |= adapter.layer_constants(0)  # Gemma 3's attention kind.
  d = config.hidden_size
  h = np.random.default_rng(0).standard_normal((1, 5, d), np.float32)
  out, caps = adapter.apply_block(layer, h, capture=True)
  assert out.shape == (1, 5, d) and np.isfinite(out).all()
  assert sorted(caps) == sorted(adapter.linear_names())
  for name_, x in caps.items():
    n_in = tree_get(layer, name_.split(".") + ["kernel"]).shape[0]
    assert x.shape == (1, 5, n_in)


def test_modulo_tokenizer_fits_ids_to_the_vocabulary():
  base = tiny_tokenizer()  # 97 ids; the text below uses ids 3..33
  tok = pc.ModuloVocabTokenizer(base, 20)
  text = ["the of and to a in is it was that he for on with as his at by "
          "be this had not are but from or have an they which one"]
  want = [[i % 20 for i in base(text)["input_ids"][0]]]
  assert tok(text)["input_ids"] == want
  assert tok.encode(text[0]) == want[0]
  assert max(want[0]) < 20 and max(base(text)["input_ids"][0]) >= 20
  assert tok.get_vocab()["</s>"] == 2 and len(tok) == 20
  assert tok.eos_token_id == base.eos_token_id % 20
  # The token cache key depends on the modulus.
  from mosp_jax.data import task
  keys = {task.tokenizer_fingerprint(t) for t in (
      base, tok, pc.ModuloVocabTokenizer(base, 60))}
  assert len(keys) == 3
  with pytest.raises(ValueError, match="cannot be saved"):
    tok.save_pretrained("/nonexistent")
