"""Gemma 3 (text only, `Gemma3ForCausalLM`): a Flax model and its adapter.

HF has no Flax Gemma 3, so the modules are ours, written to compute what
transformers 4.57's PyTorch `Gemma3ForCausalLM` computes (tested against
it to float32 rounding), with PyTorch's parameter names so that the bridge's
one rename table converts both ways:

- embeddings scaled by `sqrt(hidden_size)`, the scale rounded to float32
  and then to the compute dtype, as PyTorch's `Gemma3TextScaledWordEmbedding`;
- Gemma's RMSNorm `x / rms(x) * (1 + w)` in float32, cast back after the
  multiplication; also on queries and keys per head (`q_norm`, `k_norm`);
- a layer: `h + post_attn_norm(attn(input_norm(h)))`, then
  `h + post_ffw_norm(mlp(pre_ffw_norm(h)))`; MLP `down(gelu_tanh(gate(x)) *
  up(x))`;
- attention scaled by `query_pre_attn_scalar ** -0.5`, grouped-query heads;
  layers of `config.layer_types` 'sliding_attention' see the last
  `sliding_window` positions (key j visible from query i when
  `i - sliding_window < j <= i`) and use RoPE base `rope_local_base_freq`;
  'full_attention' layers are causal with base `rope_theta` and the
  config's `rope_scaling` (None or 'linear');
- a head tied to the embeddings (or `lm_head`), with
  `final_logit_softcapping` when set. transformers 4.57 reads
  `attn_logit_softcapping` but never applies it to Gemma 3's attention
  (`Gemma3Attention.forward` passes no `softcap`), so neither do we.

Local and global layers have the same parameters, so one jitted
`apply_block` serves both: the layer's kind enters as data, an int32
scalar `IS_SLIDING` that `GemmaAdapter.layer_constants` adds to every
layer subtree (`layer_params`, `layer_source.DenseLayers.layer`), and that
selects the RoPE table and the mask inside the computation [ours]. The
walk therefore compiles one layer function for all 18 (or 34) layers.
Sequences are causal and unpadded at positions 0..T-1 (`models.base`); no
KV cache.
"""

from __future__ import annotations

from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from transformers import FlaxPreTrainedModel, Gemma3TextConfig
from transformers.modeling_flax_outputs import FlaxCausalLMOutput

from mosp_jax.models.base import BaseAdapter, Params
from mosp_jax.models.llama import (
  LlamaAdapter,
  checked_rope_type,
  rope_inv_freq,
  rope_type,
)

# The layer subtree's key of its attention kind: 1 sliding, 0 full.
IS_SLIDING = "is_sliding"
LAYER_TYPES = ("sliding_attention", "full_attention")
ROPE_TYPES = ("default", "linear")


def check_config(config: Any) -> None:
  """Raises NotImplementedError for Gemma 3 variants these modules lack."""
  checked_rope_type(config, "Gemma 3", ROPE_TYPES)
  bad = sorted(set(config.layer_types) - set(LAYER_TYPES))
  if bad or len(config.layer_types) != config.num_hidden_layers:
    raise NotImplementedError(
        f"Gemma 3 layer_types {config.layer_types} should give one of "
        f"{', '.join(LAYER_TYPES)} per layer ({config.num_hidden_layers})")
  if getattr(config, "use_bidirectional_attention", False):
    raise NotImplementedError(
        "Gemma 3 use_bidirectional_attention=True is not supported")
  if config.hidden_activation != "gelu_pytorch_tanh":
    raise NotImplementedError(
        f"Gemma 3 hidden_activation {config.hidden_activation!r} is not "
        "supported (only 'gelu_pytorch_tanh')")


def sliding_flags(config: Any) -> np.ndarray:
  """(L,) int32: 1 where layer i is a sliding-window layer."""
  return np.array([t == "sliding_attention" for t in config.layer_types],
                  np.int32)


def rope_cos_sin(config: Any, num_pos: int, *, local: bool
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(num_pos, head_dim) float32 cos and sin of one kind of layer.

  As PyTorch's `Gemma3RotaryEmbedding`: inverse frequencies in float32
  with base `rope_local_base_freq` (local layers, no scaling) or
  `rope_theta` divided by the 'linear' factor (global layers, when
  `rope_scaling` says so); angles `pos * inv`, repeated twice (rotate-half
  layout). Both rope types scale attention by 1.
  """
  if local:
    inv = rope_inv_freq(config.head_dim, config.rope_local_base_freq)
  else:
    inv = rope_inv_freq(config.head_dim, config.rope_theta)
    if rope_type(config.rope_scaling) == "linear":
      inv = (inv / np.float32(config.rope_scaling["factor"])).astype(
          np.float32)
  angles = np.arange(num_pos, dtype=np.float32)[:, None] * inv[None, :]
  emb = np.concatenate([angles, angles], axis=-1)
  return np.cos(emb), np.sin(emb)


def _rotate_half(x: jax.Array) -> jax.Array:
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


class RMSNorm(nn.Module):
  """Gemma's RMSNorm over the last axis: `x / rms(x) * (1 + weight)`,
  computed in float32 and cast back to the input's dtype; `weight` (dim,)
  starts at 0."""

  dim: int
  eps: float

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    w = self.param("weight", nn.initializers.zeros, (self.dim,),
                   jnp.float32)
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    out = x32 * jax.lax.rsqrt(var + self.eps)
    return (out * (1.0 + w.astype(jnp.float32))).astype(x.dtype)


class Attention(nn.Module):
  """Gemma 3 self-attention of one layer; its kind is the traced
  `is_sliding` (int32 scalar)."""

  config: Any
  dtype: Any = jnp.float32

  def setup(self) -> None:
    c = self.config
    dense = lambda n: nn.Dense(  # noqa: E731
        n, use_bias=c.attention_bias, dtype=self.dtype,
        kernel_init=nn.initializers.normal(c.initializer_range))
    self.q_proj = dense(c.num_attention_heads * c.head_dim)
    self.k_proj = dense(c.num_key_value_heads * c.head_dim)
    self.v_proj = dense(c.num_key_value_heads * c.head_dim)
    self.o_proj = dense(c.hidden_size)
    self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
    self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)

  def __call__(self, hidden: jax.Array, is_sliding: jax.Array) -> jax.Array:
    """hidden (B, T, d) -> (B, T, d)."""
    c = self.config
    b, t, _ = hidden.shape
    heads, kv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    q = self.q_norm(self.q_proj(hidden).reshape(b, t, heads, hd))
    k = self.k_norm(self.k_proj(hidden).reshape(b, t, kv, hd))
    v = self.v_proj(hidden).reshape(b, t, kv, hd)
    local = jnp.asarray(is_sliding) != 0
    cos_l, sin_l = rope_cos_sin(c, t, local=True)
    cos_g, sin_g = rope_cos_sin(c, t, local=False)
    cos = jnp.where(local, cos_l, cos_g).astype(q.dtype)[None, :, None]
    sin = jnp.where(local, sin_l, sin_g).astype(q.dtype)[None, :, None]
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    q = q.reshape(b, t, kv, heads // kv, hd)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k) * (
        c.query_pre_attn_scalar ** -0.5)
    i = np.arange(t)[:, None]
    j = np.arange(t)[None, :]
    visible = jnp.asarray(j <= i) & (
        ~local | jnp.asarray(j > i - c.sliding_window))
    scores = jnp.where(visible, scores.astype(jnp.float32),
                       jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v.astype(self.dtype))
    return self.o_proj(out.reshape(b, t, heads * hd))


class MLP(nn.Module):
  """`down(gelu_tanh(gate(x)) * up(x))`."""

  config: Any
  dtype: Any = jnp.float32

  def setup(self) -> None:
    c = self.config
    dense = lambda n: nn.Dense(  # noqa: E731
        n, use_bias=False, dtype=self.dtype,
        kernel_init=nn.initializers.normal(c.initializer_range))
    self.gate_proj = dense(c.intermediate_size)
    self.up_proj = dense(c.intermediate_size)
    self.down_proj = dense(c.hidden_size)

  def __call__(self, x: jax.Array) -> jax.Array:
    gate = jax.nn.gelu(self.gate_proj(x), approximate=True)
    return self.down_proj(gate * self.up_proj(x))


class DecoderLayer(nn.Module):
  """One Gemma 3 layer: `__call__(hidden (B, T, d), is_sliding) ->
  (hidden_out,)`."""

  config: Any
  dtype: Any = jnp.float32

  def setup(self) -> None:
    c = self.config
    norm = lambda: RMSNorm(c.hidden_size, c.rms_norm_eps)  # noqa: E731
    self.input_layernorm = norm()
    self.self_attn = Attention(c, dtype=self.dtype)
    self.post_attention_layernorm = norm()
    self.pre_feedforward_layernorm = norm()
    self.mlp = MLP(c, dtype=self.dtype)
    self.post_feedforward_layernorm = norm()

  def __call__(self, hidden: jax.Array, is_sliding: jax.Array
               ) -> tuple[jax.Array]:
    attn = self.self_attn(self.input_layernorm(hidden), is_sliding)
    hidden = hidden + self.post_attention_layernorm(attn)
    ffw = self.mlp(self.pre_feedforward_layernorm(hidden))
    return (hidden + self.post_feedforward_layernorm(ffw),)


class _Layers(nn.Module):
  config: Any
  dtype: Any = jnp.float32

  def setup(self) -> None:
    self.blocks = [DecoderLayer(self.config, dtype=self.dtype, name=str(i))
                   for i in range(self.config.num_hidden_layers)]

  def __call__(self, hidden: jax.Array) -> jax.Array:
    for block, flag in zip(self.blocks, sliding_flags(self.config),
                           strict=True):
      hidden = block(hidden, flag)[0]
    return hidden


class _Model(nn.Module):
  config: Any
  dtype: Any = jnp.float32

  def setup(self) -> None:
    c = self.config
    self.embed_tokens = nn.Embed(
        c.vocab_size, c.hidden_size, dtype=self.dtype,
        embedding_init=nn.initializers.normal(c.initializer_range))
    self.layers = _Layers(c, dtype=self.dtype)
    self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """(B, T) ids -> (B, T, d) scaled embeddings in the compute dtype."""
    scale = jnp.asarray(np.float32(self.config.hidden_size ** 0.5),
                        self.dtype)
    return self.embed_tokens(input_ids) * scale

  def __call__(self, input_ids: jax.Array) -> jax.Array:
    return self.norm(self.layers(self.embed(input_ids)))


class ForCausalLMModule(nn.Module):
  """Gemma 3 causal LM: `__call__(input_ids (B, T)) -> logits (B, T, V)`."""

  config: Any
  dtype: Any = jnp.float32

  def setup(self) -> None:
    self.model = _Model(self.config, dtype=self.dtype)
    if not self.config.tie_word_embeddings:
      self.lm_head = nn.Dense(
          self.config.vocab_size, use_bias=False, dtype=self.dtype,
          kernel_init=nn.initializers.normal(self.config.initializer_range))

  def lm_logits(self, hidden: jax.Array) -> jax.Array:
    """Normed hidden (B, T, d) -> logits (B, T, V), soft-capped by
    `final_logit_softcapping` when the config sets it."""
    if self.config.tie_word_embeddings:
      logits = self.model.embed_tokens.attend(hidden)
    else:
      logits = self.lm_head(hidden)
    cap = self.config.final_logit_softcapping
    if cap is not None:
      logits = jnp.tanh(logits / cap) * cap
    return logits

  def __call__(self, input_ids: jax.Array, **kwargs: Any
               ) -> FlaxCausalLMOutput:
    del kwargs  # Masks and positions are implied (see `models.base`).
    return FlaxCausalLMOutput(logits=self.lm_logits(self.model(input_ids)))


class FlaxGemma3ForCausalLM(FlaxPreTrainedModel):
  """A Flax `Gemma3ForCausalLM`: PyTorch's parameter names (a tied model
  has no `lm_head`), `model(input_ids, params=...).logits`."""

  base_model_prefix = "model"
  module_class = ForCausalLMModule

  def __init__(self, config: Gemma3TextConfig,
               input_shape: tuple[int, int] = (1, 1), seed: int = 0,
               dtype: Any = jnp.float32, _do_init: bool = True,
               **kwargs: Any):
    check_config(config)
    module = self.module_class(config=config, dtype=dtype, **kwargs)
    super().__init__(config, module, input_shape=input_shape, seed=seed,
                     dtype=dtype, _do_init=_do_init)

  def init_weights(self, rng: jax.Array, input_shape: tuple,
                   params: Any = None) -> Any:
    ids = jnp.zeros(input_shape, jnp.int32)
    return self.module.init(rng, ids)["params"]

  def __call__(self, input_ids: Any, params: Params | None = None,
               **kwargs: Any) -> FlaxCausalLMOutput:
    del kwargs
    return cast(FlaxCausalLMOutput, self.module.apply(
        {"params": self.params if params is None else params},
        jnp.asarray(input_ids, jnp.int32)))


class GemmaAdapter(BaseAdapter):
  """Gemma 3 layers: sandwich-normed attention (GQA, q/k norms, local or
  global) and a gelu-tanh GLU MLP."""

  family = "gemma3_text"
  # Llama's linears, at Llama's paths.
  layers_path = LlamaAdapter.layers_path
  groups = LlamaAdapter.groups

  def _check_config(self) -> None:
    check_config(self.config)

  def _model_module(self) -> nn.Module:
    return ForCausalLMModule(self.config, dtype=self.dtype)

  def _block_module(self) -> nn.Module:
    return DecoderLayer(self.config, dtype=self.dtype)

  def _block_args(self, hidden: jax.Array) -> tuple:
    return ()

  def layer_constants(self, i: int) -> dict[str, np.ndarray]:
    """`{IS_SLIDING: int32 scalar}`: 1 where layer i attends locally."""
    return {IS_SLIDING: sliding_flags(self.config)[i]}

  @staticmethod
  def _embed(module: nn.Module, input_ids: jax.Array) -> jax.Array:
    return module.model.embed(input_ids)

  @staticmethod
  def _head(module: nn.Module, hidden: jax.Array) -> jax.Array:
    return module.lm_logits(module.model.norm(hidden))
