"""Llama family (SmolLM2, Llama-2): a corrected HF Flax model and its adapter.

HF's `FlaxLlamaForCausalLM` (transformers 4.x) has two silent faults for
SmolLM2 (docs/METHOD_NOTES.md, "Model loading"):

1. RoPE ignores `config.rope_theta`: `create_sinusoidal_positions` hard-codes
   base 10000 (SmolLM2 uses 100000). It also slices the last axis of its
   (num_pos, 1, 2 * head_dim) table to `num_pos`, which corrupts the table
   whenever `max_position_embeddings < 2 * head_dim`.
2. `lm_head` is never tied to `embed_tokens`, whatever
   `config.tie_word_embeddings` says; a tied safetensors checkpoint has no
   `lm_head.weight`, so HF's `from_pretrained(from_pt=True)` silently keeps a
   random head.

Nothing fails; the perplexity is just wildly off. HF's Flax Llama also
lacks Llama-3.1 / 3.2's `rope_scaling` (`rope_type: llama3`); the table
below computes it as PyTorch does (any other rope type is refused).

`FlaxLlamaForCausalLMFixed` reuses HF's modules and replaces only what is
wrong: the rotary module (a table computed like PyTorch's
`LlamaRotaryEmbedding`, in float32, with `rope_theta` and `rope_scaling`)
and, when tied, the head (`embed_tokens.attend`, no `lm_head`
parameter). Flax cannot swap a submodule created in a parent's `setup`, so
each parent's `setup` is restated below with the one changed line; their
`__call__` methods are HF's.

The Llama-like families (`qwen2`, `qwen3`, `mistral`) reuse these modules:
each subclasses `Attention` with its quirks (biases, per-head q/k norms,
a sliding window) and passes it down as `attention_cls`; an explicit
`head_dim` (Qwen3) is honoured for every family.

Over 400 lines because Flax cannot swap a submodule built in a parent's
`setup`: each of HF's parents is restated here with its one changed line,
and Qwen2, Qwen3 and Mistral reuse these classes through `Attention`'s
hooks instead of restating them again.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from functools import partial
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from transformers import LlamaConfig
from transformers.modeling_flax_outputs import FlaxCausalLMOutput
from transformers.models.llama import modeling_flax_llama as hf

from mosp_jax.models.base import BaseAdapter

# RoPE variants `rope_table` computes, by `rope_scaling["rope_type"]`.
ROPE_TYPES = ("default", "llama3")
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings")


def rope_type(rope_scaling: Mapping[str, Any] | None) -> str:
  """The RoPE variant of a config's `rope_scaling` ('default' for None);
  old configs name it `type`."""
  scaling = rope_scaling or {}
  return scaling.get("rope_type", scaling.get("type", "default"))


def checked_rope_type(config: Any, family: str,
                      supported: tuple[str, ...]) -> str:
  """The config's RoPE variant (`rope_type`); NotImplementedError naming
  `family` when it is none of `supported`."""
  kind = rope_type(getattr(config, "rope_scaling", None))
  if kind not in supported:
    raise NotImplementedError(
        f"{family} rope_scaling {config.rope_scaling} is not supported: "
        f"rope_type {kind!r} is none of {', '.join(supported)}")
  return kind


def check_config(config: LlamaConfig) -> None:
  """Raises NotImplementedError for Llama variants HF's Flax code lacks."""
  kind = checked_rope_type(config, "Llama", ROPE_TYPES)
  if kind == "llama3":
    missing = [k for k in LLAMA3_KEYS if k not in config.rope_scaling]
    if missing:
      raise NotImplementedError(
          f"Llama rope_scaling {config.rope_scaling} (llama3) lacks "
          f"{', '.join(missing)}")
  if getattr(config, "mlp_bias", False):
    raise NotImplementedError("Llama mlp_bias=True is not supported")


def head_dim(config: Any) -> int:
  """Width of one attention head: `config.head_dim` where the config sets
  it (Qwen3, Llama-3.2), else `hidden_size / num_attention_heads`, as
  PyTorch's attention reads it."""
  return (getattr(config, "head_dim", None)
          or config.hidden_size // config.num_attention_heads)


def rope_inv_freq(head_dim: int, theta: float,
                  rope_scaling: Mapping[str, Any] | None = None
                  ) -> np.ndarray:
  """The (head_dim / 2,) float32 inverse frequencies of rotate-half RoPE.

  Plain RoPE: `1 / theta ** (2j / head_dim)`. With `rope_scaling`
  `{'rope_type': 'llama3', ...}` (Llama-3.1 / 3.2), Meta's frequency-band
  rescaling of `transformers.modeling_rope_utils._compute_llama3_parameters`:
  wavelengths `2 pi / inv` above `original_max_position_embeddings /
  low_freq_factor` are divided by `factor`, those below `... /
  high_freq_factor` kept, and the band between interpolated smoothly.
  Every step is a float32 operation in PyTorch's order, so the result is
  PyTorch's bit for bit (tested against `LlamaRotaryEmbedding`).
  """
  exps = np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim)
  # theta ** exps rounded once to float32 (numpy's float32 power is off by an
  # ulp for some exponents; torch's is correctly rounded), then a float32
  # division, as torch does.
  powers = np.power(np.float64(theta), exps.astype(np.float64))
  inv_freq = np.float32(1.0) / powers.astype(np.float32)
  kind = rope_type(rope_scaling)
  if kind == "default":
    return inv_freq
  if kind != "llama3":
    raise NotImplementedError(
        f"rope_type {kind!r} is none of {', '.join(ROPE_TYPES)}")
  assert rope_scaling is not None  # rope_type(None) is 'default'
  f32 = np.float32
  factor = f32(rope_scaling["factor"])
  low = f32(rope_scaling["low_freq_factor"])
  high = f32(rope_scaling["high_freq_factor"])
  old_len = rope_scaling["original_max_position_embeddings"]
  # Python-float thresholds compared with float32 wavelengths, as in torch.
  low_wavelen = old_len / rope_scaling["low_freq_factor"]
  high_wavelen = old_len / rope_scaling["high_freq_factor"]
  old_len = f32(old_len)
  wavelen = f32(2 * np.pi) / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (f32(1) - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_table(num_pos: int, head_dim: int, theta: float,
               rope_scaling: Mapping[str, Any] | None = None) -> np.ndarray:
  """The sin/cos table of rotate-half RoPE with base `theta`.

  Computed in float32 as PyTorch's `LlamaRotaryEmbedding` does (inverse
  frequencies of `rope_inv_freq`, with the llama3 rescaling when
  `rope_scaling` asks for it; angles `pos * inv`), so the angles are
  bit-identical to PyTorch's; HF Flax computes them in float64, which
  differs from PyTorch by up to an ulp of the angle (5e-4 in sin/cos at
  position 8191). llama3's attention scaling is 1, so none is applied.

  Returns:
    (num_pos, 1, 2 * head_dim) float32: `[sin(angles) | cos(angles)]`, each
    angle vector repeated twice along the last axis, the layout HF's
    `FlaxLlamaRotaryEmbedding.__call__` expects.
  """
  inv_freq = rope_inv_freq(head_dim, theta, rope_scaling)
  angles = np.arange(num_pos, dtype=np.float32)[:, None] * inv_freq[None, :]
  emb = np.concatenate([angles, angles], axis=-1)
  return np.concatenate(
      [np.sin(emb)[:, None, :], np.cos(emb)[:, None, :]], axis=-1)


@functools.lru_cache(maxsize=4)
def _sincos(num_pos: int, head_dim: int, theta: float,
            scaling: tuple | None) -> np.ndarray:
  # One table for every layer: at Llama-3.1's 131072 positions it is 134 MB,
  # which each layer's setup would otherwise recompute (read-only: shared).
  table = rope_table(num_pos, head_dim, theta,
                     dict(scaling) if scaling else None)
  table.flags.writeable = False
  return table


class RotaryEmbedding(hf.FlaxLlamaRotaryEmbedding):
  """HF's rotary module with a table that honours `rope_theta`, llama3
  `rope_scaling` and an explicit `head_dim`.

  `__call__(key, query, position_ids)` is HF's: key (B, T, kv_heads,
  head_dim), query (B, T, heads, head_dim) -> the rotated (key, query).
  """

  def setup(self) -> None:
    scaling = getattr(self.config, "rope_scaling", None)
    self.sincos = jnp.asarray(_sincos(
        self.config.max_position_embeddings, head_dim(self.config),
        self.config.rope_theta,
        tuple(sorted(scaling.items())) if scaling else None))


class _CausalMask:
  """Stands for HF's (1, 1, P, P) causal mask, P = max_position_embeddings,
  which HF builds whole (17 GB at Llama-3.1's P = 131072); its `__call__`
  (without a cache) only slices `[:, :, :q, :k]`, so only that (1, 1, q, k)
  corner is built. Decoding with a cache (`init_cache`) is not supported.

  With a `window` (sliding-window attention, Mistral), query i sees keys
  j with i - window < j <= i: `window` keys, as PyTorch's
  `masking_utils.sliding_window_overlay`.
  """

  def __init__(self, window: int | None = None):
    self.window = window

  def __getitem__(self, index: tuple) -> jax.Array:
    _, _, rows, cols = index
    i = jnp.arange(rows.stop)[:, None]
    j = jnp.arange(cols.stop)[None, :]
    keep = j <= i
    if self.window is not None:
      keep &= j > i - self.window
    return keep[None, None]


class Attention(hf.FlaxLlamaAttention):
  """HF's attention; `setup` restated to use `RotaryEmbedding`,
  `_CausalMask` and `head_dim(config)`.

  The one place of a Llama-like family's quirks: a family subclasses it
  and overrides the hooks below (`check_config`, `use_bias`, `window`,
  `make_rotary`); the layers, model and adapter take the class as their
  `attention_cls` and are otherwise Llama's.
  """

  @classmethod
  def check_config(cls, config: Any) -> None:
    """Raises NotImplementedError for a config these modules do not run."""
    check_config(config)

  def use_bias(self, name: str) -> bool:
    """Whether projection `name` ('q_proj', ..., 'o_proj') has a bias."""
    return bool(getattr(self.config, "attention_bias", False))

  def window(self) -> int | None:
    """The sliding-window width in keys; None for full causal attention."""
    return None

  def make_rotary(self) -> hf.FlaxLlamaRotaryEmbedding:
    """The module called as `rotary_emb(key, query, position_ids)`."""
    return RotaryEmbedding(self.config, dtype=self.dtype)

  def setup(self) -> None:
    config = self.config
    self.embed_dim = config.hidden_size
    self.num_heads = config.num_attention_heads
    self.head_dim = head_dim(config)  # Changed.
    self.num_key_value_heads = config.num_key_value_heads
    self.num_key_value_groups = self.num_heads // self.num_key_value_heads
    self.attention_softmax_in_fp32 = self.dtype is not jnp.float32
    dense = partial(
        nn.Dense, dtype=self.dtype,
        kernel_init=jax.nn.initializers.normal(config.initializer_range))
    q, kv = self.num_heads * self.head_dim, (
        self.num_key_value_heads * self.head_dim)
    self.q_proj = dense(q, use_bias=self.use_bias("q_proj"))
    self.k_proj = dense(kv, use_bias=self.use_bias("k_proj"))
    self.v_proj = dense(kv, use_bias=self.use_bias("v_proj"))
    self.o_proj = dense(self.embed_dim, use_bias=self.use_bias("o_proj"))
    self.causal_mask = _CausalMask(self.window())  # Changed.
    self.rotary_emb = self.make_rotary()  # Changed.

  def _merge_heads(self, hidden_states: jax.Array) -> jax.Array:
    # (B, T, heads, head_dim) -> (B, T, heads * head_dim), which differs
    # from hidden_size when the config sets head_dim.
    return hidden_states.reshape(
        hidden_states.shape[:2] + (self.num_heads * self.head_dim,))


class DecoderLayer(hf.FlaxLlamaDecoderLayer):
  """HF's decoder layer built on `attention_cls`; `__call__(hidden, mask,
  position_ids)` is HF's."""

  attention_cls: type[Attention] = Attention

  def setup(self) -> None:
    self.input_layernorm = hf.FlaxLlamaRMSNorm(self.config, dtype=self.dtype)
    self.self_attn = self.attention_cls(  # Changed.
        self.config, dtype=self.dtype)
    self.post_attention_layernorm = hf.FlaxLlamaRMSNorm(
        self.config, dtype=self.dtype)
    self.mlp = hf.FlaxLlamaMLP(self.config, dtype=self.dtype)


class _LayerCollection(hf.FlaxLlamaLayerCollection):

  attention_cls: type[Attention] = Attention

  def setup(self) -> None:
    self.blocks = [
        DecoderLayer(self.config, dtype=self.dtype,  # Changed.
                     attention_cls=self.attention_cls, name=str(i))
        for i in range(self.config.num_hidden_layers)
    ]


class _Model(hf.FlaxLlamaModule):

  attention_cls: type[Attention] = Attention

  def setup(self) -> None:
    self.hidden_size = self.config.hidden_size
    self.embed_tokens = nn.Embed(
        self.config.vocab_size, self.hidden_size,
        embedding_init=jax.nn.initializers.normal(
            stddev=self.config.initializer_range),
        dtype=self.dtype)
    self.layers = _LayerCollection(  # Changed.
        self.config, dtype=self.dtype, attention_cls=self.attention_cls)
    self.norm = hf.FlaxLlamaRMSNorm(self.config, dtype=self.dtype)


class ForCausalLMModule(hf.FlaxLlamaForCausalLMModule):
  """Causal LM whose head is `embed_tokens` when the config ties them."""

  attention_cls: type[Attention] = Attention

  def setup(self) -> None:
    self.model = _Model(self.config, dtype=self.dtype,
                        attention_cls=self.attention_cls)
    if not self.config.tie_word_embeddings:
      self.lm_head = nn.Dense(
          self.config.vocab_size, use_bias=False, dtype=self.dtype,
          kernel_init=jax.nn.initializers.normal(
              stddev=self.config.initializer_range))

  def lm_logits(self, hidden: jax.Array) -> jax.Array:
    """Normed hidden (B, T, d) -> logits (B, T, V)."""
    if self.config.tie_word_embeddings:
      return self.model.embed_tokens.attend(hidden)
    return self.lm_head(hidden)

  def __call__(
      self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
      position_ids: jax.Array | None = None,
      deterministic: bool = True, init_cache: bool = False,
      output_attentions: bool = False, output_hidden_states: bool = False,
      return_dict: bool = True) -> Any:
    outputs = self.model(
        input_ids, position_ids=position_ids, attention_mask=attention_mask,
        deterministic=deterministic, init_cache=init_cache,
        output_attentions=output_attentions,
        output_hidden_states=output_hidden_states, return_dict=return_dict)
    logits = self.lm_logits(outputs[0])
    if not return_dict:
      return (logits,) + tuple(outputs[1:])
    return FlaxCausalLMOutput(
        logits=logits, hidden_states=outputs.hidden_states,
        attentions=outputs.attentions)


class FlaxLlamaForCausalLMFixed(hf.FlaxLlamaForCausalLM):
  """`FlaxLlamaForCausalLM` with `rope_theta` and tied embeddings honoured.

  Same parameter tree as HF's, except that a tied model has no `lm_head`.
  A Llama-like family subclasses it with its own `attention_cls`.
  """

  module_class = ForCausalLMModule
  attention_cls: type[Attention] = Attention

  def __init__(self, config: LlamaConfig, *args: Any, **kwargs: Any):
    self.attention_cls.check_config(config)
    super().__init__(config, *args, attention_cls=self.attention_cls,
                     **kwargs)


class LlamaAdapter(BaseAdapter):
  """Llama decoder layers: pre-norm attention (GQA, RoPE) and a SwiGLU MLP."""

  family = "llama"
  attention_cls: ClassVar[type[Attention]] = Attention
  layers_path = ("model", "layers")
  groups = (
      ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
      ("self_attn.o_proj",),
      ("mlp.gate_proj", "mlp.up_proj"),
      ("mlp.down_proj",),
  )

  def _check_config(self) -> None:
    self.attention_cls.check_config(self.config)

  def _model_module(self) -> nn.Module:
    return ForCausalLMModule(self.config, dtype=self.dtype,
                             attention_cls=self.attention_cls)

  def _block_module(self) -> nn.Module:
    return DecoderLayer(self.config, dtype=self.dtype,
                        attention_cls=self.attention_cls)

  def _block_args(self, hidden: jax.Array) -> tuple:
    return (self.full_mask(hidden), self.positions(hidden))

  @staticmethod
  def _embed(module: nn.Module, input_ids: jax.Array) -> jax.Array:
    return module.model.embed_tokens(input_ids)

  @staticmethod
  def _head(module: nn.Module, hidden: jax.Array) -> jax.Array:
    return module.lm_logits(module.model.norm(hidden))


def tiny_llama_config(vocab_size: int, *, hidden_size: int = 64,
                      num_layers: int = 2) -> LlamaConfig:
  """The config of `tiny_llama` (SmolLM2's shape, scaled down)."""
  return LlamaConfig(
      vocab_size=vocab_size, hidden_size=hidden_size,
      intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
      num_attention_heads=4, num_key_value_heads=2,
      max_position_embeddings=2048, rope_theta=100000.0,
      tie_word_embeddings=True)


def tiny_llama(vocab_size: int, *, seed: int = 0, hidden_size: int = 64,
               num_layers: int = 2) -> tuple[FlaxLlamaForCausalLMFixed, dict]:
  """A random SmolLM2-shaped Llama built from a config, for smoke runs.

  Tied embeddings, grouped-query attention and rope_theta 1e5, as SmolLM2;
  HF's default init (std 0.02). Returns `(model, params)`.
  """
  config = tiny_llama_config(vocab_size, hidden_size=hidden_size,
                             num_layers=num_layers)
  model = FlaxLlamaForCausalLMFixed(config, seed=seed)
  params = jax.tree.map(np.asarray, model.params)
  return model, params
