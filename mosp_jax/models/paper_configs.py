"""The paper's models as configs without weights, and random models of them.

MOSP's experiments prune Llama-2-7B/13B, Llama-3-8B and OPT-1.3B/2.7B/30B
[paper]; Llama-3.1-8B and Llama-3.2-1B (RoPE scaling `rope_type: llama3`),
Qwen2.5-7B, Qwen3-8B, Mistral-7B-v0.1 and the language model of Gemma-3-4B
are added beyond the paper.
Nothing can be downloaded here, so each entry restates the architecture
fields of the model's published Hugging Face `config.json` (the source is
named beside it); training-only fields (dropout, `torch_dtype`, ...) are
left at transformers' defaults.
`param_count` counts the parameters of the Flax model of a config by
`jax.eval_shape` (no memory), which the tests compare with the published
sizes: the independent check that these numbers are right.

A model spec `random:<name>` or `random:<name>:<n_layers>` (e.g.
`random:llama-2-7b:2`, the first 2 decoder layers) is a model of that
config with seeded random weights [ours], for memory and time plans,
simulations and tests at the real shapes:

  spec = parse_random_spec('random:llama-2-7b:2')   # RandomSpec or None
  model, params = random_model(spec)                # ~2.7 GB of float32

Only the decoder-layer count is cut; embeddings and head keep their full
size. Random weights must fit in `MAX_RANDOM_GB` (a whole 7B model, 27 GB of
float32, does not; `check_random_spec` names the largest layer count that
fits). Random models read text with SmolLM2's tokenizer, whose ids are
taken modulo the model's vocabulary (`ModuloVocabTokenizer`, [ours]):
with random weights the meaning of the text is irrelevant, only the shapes
and a deterministic token stream count.

Over 400 lines because it holds the configs themselves (one entry a
model, its source cited beside it) next to the few functions that size and
draw them; splitting the table from its readers would only scatter it.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from typing import Any, NamedTuple

import numpy as np
from transformers import (
  FlaxPreTrainedModel,
  Gemma3TextConfig,
  LlamaConfig,
  MistralConfig,
  OPTConfig,
  PretrainedConfig,
  Qwen2Config,
  Qwen3Config,
)

RANDOM_PREFIX = "random:"

# Llama-3.1/3.2's RoPE scaling (their config.json `rope_scaling`).
_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0,
                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}
_LLAMA2 = dict(model_type="llama", vocab_size=32000,
               max_position_embeddings=4096, rms_norm_eps=1e-5,
               rope_theta=10000.0, tie_word_embeddings=False,
               initializer_range=0.02, bos_token_id=1, eos_token_id=2)
_LLAMA3 = dict(model_type="llama", vocab_size=128256, hidden_size=4096,
               intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8,
               max_position_embeddings=8192, rms_norm_eps=1e-5,
               rope_theta=500000.0, tie_word_embeddings=False,
               initializer_range=0.02, bos_token_id=128000,
               eos_token_id=128001)
# Shared by Qwen2.5-7B and Qwen3-8B's config.json.
_QWEN = dict(rms_norm_eps=1e-6, rope_theta=1000000.0,
             tie_word_embeddings=False, use_sliding_window=False,
             initializer_range=0.02, bos_token_id=151643)
_OPT = dict(model_type="opt", vocab_size=50272, max_position_embeddings=2048,
            do_layer_norm_before=True, activation_function="relu",
            enable_bias=True, tie_word_embeddings=True, init_std=0.02,
            bos_token_id=2, eos_token_id=2, pad_token_id=1)

PAPER_CONFIGS: dict[str, dict[str, Any]] = {
    # meta-llama/Llama-2-7b-hf, config.json.
    "llama-2-7b": dict(_LLAMA2, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32),
    # meta-llama/Llama-2-13b-hf, config.json.
    "llama-2-13b": dict(_LLAMA2, hidden_size=5120, intermediate_size=13824,
                        num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40),
    # meta-llama/Meta-Llama-3-8B, config.json (GQA: 8 key-value heads).
    "llama-3-8b": dict(_LLAMA3),
    # meta-llama/Llama-3.1-8B, config.json: Llama-3-8B with llama3 RoPE
    # scaling to a 128k context [beyond the paper].
    "llama-3.1-8b": dict(_LLAMA3, max_position_embeddings=131072,
                         rope_scaling=_LLAMA31_ROPE,
                         eos_token_id=[128001, 128008, 128009]),
    # meta-llama/Llama-3.2-1B, config.json: tied embeddings, RoPE factor 32
    # [beyond the paper].
    "llama-3.2-1b": dict(_LLAMA3, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64,
                         max_position_embeddings=131072,
                         tie_word_embeddings=True,
                         rope_scaling=dict(_LLAMA31_ROPE, factor=32.0),
                         eos_token_id=[128001, 128008, 128009]),
    # facebook/opt-1.3b, config.json.
    "opt-1.3b": dict(_OPT, hidden_size=2048, ffn_dim=8192,
                     num_hidden_layers=24, num_attention_heads=32,
                     word_embed_proj_dim=2048),
    # facebook/opt-2.7b, config.json.
    "opt-2.7b": dict(_OPT, hidden_size=2560, ffn_dim=10240,
                     num_hidden_layers=32, num_attention_heads=32,
                     word_embed_proj_dim=2560),
    # facebook/opt-30b, config.json.
    "opt-30b": dict(_OPT, hidden_size=7168, ffn_dim=28672,
                    num_hidden_layers=48, num_attention_heads=56,
                    word_embed_proj_dim=7168),
    # Qwen/Qwen2.5-7B, config.json: q/k/v biases, GQA (28 heads, 4
    # key-value heads), untied [beyond the paper].
    "qwen2.5-7b": dict(_QWEN, model_type="qwen2", vocab_size=152064,
                       hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, max_position_embeddings=131072,
                       sliding_window=131072, max_window_layers=28,
                       eos_token_id=151643),
    # Qwen/Qwen3-8B, config.json: head_dim 128, q/k norms, GQA (32 heads,
    # 8 key-value heads), untied [beyond the paper].
    "qwen3-8b": dict(_QWEN, model_type="qwen3", vocab_size=151936,
                     hidden_size=4096, intermediate_size=12288,
                     num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128,
                     max_position_embeddings=40960, attention_bias=False,
                     max_window_layers=36, eos_token_id=151645),
    # mistralai/Mistral-7B-v0.1, config.json: GQA (32 heads, 8 key-value
    # heads), sliding_window 4096, rope_theta 1e4, rms_norm_eps 1e-5,
    # untied [beyond the paper].
    "mistral-7b": dict(model_type="mistral", vocab_size=32000,
                       hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, max_position_embeddings=32768,
                       rms_norm_eps=1e-5, rope_theta=10000.0,
                       sliding_window=4096, tie_word_embeddings=False,
                       initializer_range=0.02, bos_token_id=1,
                       eos_token_id=2),
    # google/gemma-3-4b-pt, config.json `text_config` (the language model
    # of the multimodal checkpoint; its other fields are transformers'
    # Gemma3TextConfig defaults: vocab 262208, rope_theta 1e6, local base
    # 1e4, a full-attention layer every 6th) [beyond the paper].
    "gemma-3-4b": dict(model_type="gemma3_text", hidden_size=2560,
                       intermediate_size=10240, num_hidden_layers=34,
                       num_attention_heads=8, num_key_value_heads=4,
                       head_dim=256, query_pre_attn_scalar=256,
                       sliding_window=1024,
                       rope_scaling={"rope_type": "linear", "factor": 8.0},
                       vocab_size=262208, rope_theta=1_000_000.0,
                       rope_local_base_freq=10_000.0,
                       sliding_window_pattern=6),
}
PAPER_MODELS: tuple[str, ...] = tuple(PAPER_CONFIGS)

# Float32 weights a random model may hold [ours]: the run keeps the dense
# parameters on the host and a device copy (on the CPU backend, a second
# host copy), next to the streams and Grams; 6 GB keeps a random run well
# inside a 24 GB machine. It admits random:llama-2-7b:6, llama-2-13b:3,
# llama-3-8b:2, opt-30b:1, qwen2.5-7b:1, qwen3-8b:1, mistral-7b:5, and the
# whole opt-1.3b and llama-3.2-1b.
MAX_RANDOM_GB = 6.0

_CONFIG_CLASSES = {"llama": LlamaConfig, "opt": OPTConfig,
                   "qwen2": Qwen2Config, "qwen3": Qwen3Config,
                   "mistral": MistralConfig,
                   "gemma3_text": Gemma3TextConfig}


class RandomSpecError(ValueError):
  """A `random:` model spec that names no paper model, has a bad layer
  count, or is too large to build."""


def paper_config(name: str, *, num_layers: int | None = None
                 ) -> PretrainedConfig:
  """The HF config of paper model `name` (a key of PAPER_CONFIGS), with
  only its first `num_layers` decoder layers when given."""
  if name not in PAPER_CONFIGS:
    raise RandomSpecError(f"unknown paper model {name!r}; known: "
                          f"{', '.join(PAPER_MODELS)}")
  fields = dict(PAPER_CONFIGS[name])
  cls = _CONFIG_CLASSES[fields.pop("model_type")]
  if num_layers is not None:
    fields["num_hidden_layers"] = num_layers
  return cls(**fields)


def param_shapes(config: PretrainedConfig) -> dict:
  """The parameter tree of the Flax model of `config` as
  `jax.ShapeDtypeStruct` leaves (float32), from `jax.eval_shape` of its
  init: no weight is allocated."""
  from mosp_jax import models
  model = models.model_class(config)(config, _do_init=False)
  return model.params_shape_tree


def param_count(config: PretrainedConfig) -> int:
  """Number of parameters of the Flax model of `config` (tied matrices
  once, as HF's `num_parameters()`)."""
  import jax
  return sum(math.prod(leaf.shape)
             for leaf in jax.tree.leaves(param_shapes(config)))


def layer_param_counts(name: str) -> tuple[int, int]:
  """`(outside the layers, per decoder layer)` parameter counts of paper
  model `name`, from the 1- and 2-layer configs (cheap to trace)."""
  one = param_count(paper_config(name, num_layers=1))
  two = param_count(paper_config(name, num_layers=2))
  return one - (two - one), two - one


class RandomSpec(NamedTuple):
  """A parsed `random:<name>[:<n_layers>]` model spec.

  Attributes:
    name: a key of PAPER_CONFIGS.
    num_layers: decoder layers kept (the first ones).
  """

  name: str
  num_layers: int

  def config(self) -> PretrainedConfig:
    return paper_config(self.name, num_layers=self.num_layers)


def is_random_spec(spec: str) -> bool:
  return spec.startswith(RANDOM_PREFIX)


def parse_random_spec(spec: str) -> RandomSpec | None:
  """`random:<name>[:<n_layers>]` -> RandomSpec (None for another spec).

  Raises:
    RandomSpecError: unknown name, or a layer count that is not an integer
      between 1 and the model's layer count.
  """
  if not is_random_spec(spec):
    return None
  parts = spec[len(RANDOM_PREFIX):].split(":")
  if len(parts) > 2 or not parts[0]:
    raise RandomSpecError(f"expected random:<name> or random:<name>:"
                          f"<n_layers>, got {spec!r}")
  name = parts[0]
  if name not in PAPER_CONFIGS:
    raise RandomSpecError(f"{spec!r}: unknown paper model {name!r}; known: "
                          f"{', '.join(PAPER_MODELS)}")
  full = PAPER_CONFIGS[name]["num_hidden_layers"]
  if len(parts) == 1:
    return RandomSpec(name, full)
  try:
    n = int(parts[1])
  except ValueError:
    n = 0
  if not 1 <= n <= full or not parts[1].isdigit():
    raise RandomSpecError(f"{spec!r}: the layer count must be an integer "
                          f"from 1 to {full} (the layers of {name}), got "
                          f"{parts[1]!r}")
  return RandomSpec(name, n)


def random_gb(spec: RandomSpec) -> float:
  """Float32 gigabytes (1e9 bytes) of the weights of `spec`."""
  outside, per_layer = layer_param_counts(spec.name)
  return 4 * (outside + spec.num_layers * per_layer) / 1e9


def check_random_spec(spec: RandomSpec) -> None:
  """Raises RandomSpecError when the weights of `spec` exceed
  MAX_RANDOM_GB, naming the memory and the largest layer count that
  fits."""
  gb = random_gb(spec)
  if gb <= MAX_RANDOM_GB:
    return
  outside, per_layer = layer_param_counts(spec.name)
  fit = int((MAX_RANDOM_GB * 1e9 / 4 - outside) // per_layer)
  hint = (f"; keep fewer layers, e.g. random:{spec.name}:{fit} "
          f"({random_gb(spec._replace(num_layers=fit)):.1f} GB)"
          if fit >= 1 else "; no layer count fits")
  raise RandomSpecError(
      f"random:{spec.name}:{spec.num_layers} needs {gb:.1f} GB of float32 "
      f"weights, over the {MAX_RANDOM_GB:g} GB limit of random models"
      f"{hint}")


def _leaf_rng(seed: int, path: str) -> np.random.Generator:
  # One stream per parameter, keyed by its path: layer i's weights are the
  # same whatever the number of layers kept.
  return np.random.default_rng([seed, zlib.crc32(path.encode())])


def random_tree(shapes: Any, *, std: float, seed: int = 0,
                prefix: str = "") -> dict:
  """Seeded float32 numpy weights for a tree of parameter shapes, drawn
  as HF's init: kernels and embeddings normal with std `std`, biases 0,
  norm scales 1. Deterministic per (seed, `prefix` + parameter path), so
  a subtree (e.g. one layer, `prefix='model/layers/0/'`) draws the same
  weights as inside the whole tree; numpy, one copy in memory.
  """
  import jax

  def draw(path: tuple[Any, ...], leaf: Any) -> np.ndarray:
    key = prefix + "/".join(str(getattr(k, "key", k)) for k in path)
    last = key.rsplit("/", 1)[-1]
    if last in ("kernel", "embedding"):
      w = _leaf_rng(seed, key).standard_normal(leaf.shape, np.float32)
      w *= np.float32(std)
      return w
    if last == "bias":
      return np.zeros(leaf.shape, np.float32)
    if last in ("scale", "weight"):  # LayerNorm / RMSNorm gains.
      return np.ones(leaf.shape, np.float32)
    raise ValueError(f"random_tree: no init rule for parameter {key!r}")

  return jax.tree_util.tree_map_with_path(draw, shapes)


def init_std(config: PretrainedConfig) -> float:
  """HF's init std of a config (`initializer_range`; OPT: `init_std`)."""
  return getattr(config, "initializer_range", None) or config.init_std


def random_params(config: PretrainedConfig, *, seed: int = 0) -> dict:
  """Seeded float32 numpy weights for the Flax model of `config`
  (`random_tree` of its parameter shapes)."""
  return random_tree(param_shapes(config), std=init_std(config), seed=seed)


def random_model(spec: RandomSpec, *, seed: int = 0,
                 check_size: bool = True
                 ) -> tuple[FlaxPreTrainedModel, dict]:
  """`(uninitialised Flax model, float32 numpy params)` of a random spec;
  `check_size` refuses specs over MAX_RANDOM_GB (RandomSpecError)."""
  from mosp_jax import models
  if check_size:
    check_random_spec(spec)
  config = spec.config()
  model = models.model_class(config)(config, _do_init=False)
  return model, random_params(config, seed=seed)


def _mod_ids(ids: Any, vocab_size: int) -> Any:
  """Token ids (an int, nested lists, or an array) modulo `vocab_size`."""
  if isinstance(ids, (int, np.integer)):
    return int(ids) % vocab_size
  if isinstance(ids, (list, tuple)):
    return type(ids)(_mod_ids(x, vocab_size) for x in ids)
  if ids is None:
    return None
  return ids % vocab_size


class ModuloVocabTokenizer:
  """A tokenizer whose every token id is taken modulo `vocab_size` [ours].

  For random models, whose paper tokenizers are not available offline:
  wraps SmolLM2's tokenizer (49152 ids) so that every id fits the model's
  vocabulary (Llama-2: 32000; for Llama-3 and OPT, whose vocabularies are
  larger, the map is the identity). Deterministic; distinct tokens may
  share an id, which is irrelevant for random weights. `__call__`,
  `encode`, `get_vocab`, `convert_tokens_to_ids` and the special-token
  ids are mapped; decoding and saving are refused (the mapped ids do not
  decode to the text), everything else is the wrapped tokenizer's.

  Attributes:
    tokenizer: the wrapped Hugging Face tokenizer.
    vocab_size: the model's vocabulary size.
  """

  def __init__(self, tokenizer: Any, vocab_size: int):
    self.tokenizer = tokenizer
    self.vocab_size = int(vocab_size)

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    enc = self.tokenizer(*args, **kwargs)
    enc["input_ids"] = _mod_ids(enc["input_ids"], self.vocab_size)
    return enc

  def encode(self, *args: Any, **kwargs: Any) -> Any:
    return _mod_ids(self.tokenizer.encode(*args, **kwargs), self.vocab_size)

  def get_vocab(self) -> dict[str, int]:
    return {t: i % self.vocab_size
            for t, i in self.tokenizer.get_vocab().items()}

  def convert_tokens_to_ids(self, tokens: Any) -> Any:
    return _mod_ids(self.tokenizer.convert_tokens_to_ids(tokens),
                    self.vocab_size)

  def __len__(self) -> int:
    return min(len(self.tokenizer), self.vocab_size)

  @property
  def bos_token_id(self) -> int | None:
    return _mod_ids(self.tokenizer.bos_token_id, self.vocab_size)

  @property
  def eos_token_id(self) -> int | None:
    return _mod_ids(self.tokenizer.eos_token_id, self.vocab_size)

  @property
  def pad_token_id(self) -> int | None:
    return _mod_ids(self.tokenizer.pad_token_id, self.vocab_size)

  @property
  def unk_token_id(self) -> int | None:
    return _mod_ids(self.tokenizer.unk_token_id, self.vocab_size)

  def fingerprint(self) -> str:
    """What the token ids depend on: the wrapped tokenizer's definition
    and the modulus (`mosp_jax.data` keys its token cache on it)."""
    backend = getattr(self.tokenizer, "backend_tokenizer", None)
    text = (backend.to_str() if backend is not None else
            repr(sorted(self.tokenizer.get_vocab().items())))
    return hashlib.sha256(
        f"{type(self.tokenizer).__qualname__}|{text}|ids mod "
        f"{self.vocab_size}".encode()).hexdigest()

  def decode(self, *args: Any, **kwargs: Any) -> str:
    raise ValueError("a random model's token ids (SmolLM2's, modulo "
                     f"{self.vocab_size}) do not decode to text")

  def save_pretrained(self, *args: Any, **kwargs: Any) -> Any:
    raise ValueError("a random model's tokenizer (SmolLM2's, ids modulo "
                     f"{self.vocab_size}) cannot be saved with a checkpoint")

  def __getattr__(self, name: str) -> Any:
    if name == "backend_tokenizer":  # Its ids are not this tokenizer's.
      raise AttributeError(name)
    return getattr(self.__dict__["tokenizer"], name)


def random_tokenizer(tokenizer: Any, spec: RandomSpec) -> Any:
  """SmolLM2's `tokenizer` fitted to the vocabulary of `spec`."""
  return ModuloVocabTokenizer(
      tokenizer, PAPER_CONFIGS[spec.name]["vocab_size"])

