"""Qwen3 family: Llama's corrected modules with per-head q/k RMSNorm.

Qwen3's decoder layer is Llama's except in attention (PyTorch's
`Qwen3Attention`):

- `head_dim` is a config field (128 in every released size) that need
  not equal `hidden_size / num_attention_heads` (Qwen3-0.6B: 1024 / 16 =
  64); the projections are `hidden -> heads * head_dim` and back.
- Queries and keys are RMS-normalised over each head's `head_dim` axis
  (`q_norm`, `k_norm`, one (head_dim,) gain each, shared by the heads)
  after the head split and before RoPE.
- No biases unless `attention_bias` (false in the released models).

transformers ships no Flax Qwen3, so the model is
`FlaxLlamaForCausalLMFixed` with `Qwen3Attention`: the two norms are its
children (Flax paths `self_attn/q_norm/weight`, as PyTorch's state-dict
keys) and run inside the call of its rotary module, which HF's attention
makes exactly between the head split and RoPE. They are not linears: the
adapter (Llama's) leaves them dense. Sliding-window layers are refused as
for Qwen2 (`qwen2.check_no_sliding_window`) [ours].
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from transformers.models.llama import modeling_flax_llama as hf

from mosp_jax.models import llama
from mosp_jax.models.qwen2 import check_no_sliding_window


class HeadRMSNorm(hf.FlaxLlamaRMSNorm):
  """HF's Llama RMSNorm over one head's width: a (head_dim,) gain applied
  to the last axis of (B, T, heads, head_dim)."""

  def setup(self) -> None:
    self.epsilon = self.config.rms_norm_eps
    self.weight = self.param("weight", lambda _, shape: jnp.ones(shape),
                             llama.head_dim(self.config))


class _NormedRotary(llama.RotaryEmbedding):
  """RoPE of key and query after their per-head norms, which belong to
  the attention (passed in, so their parameters stay under it)."""

  q_norm: nn.Module | None = None
  k_norm: nn.Module | None = None

  def __call__(self, key: jax.Array, query: jax.Array,
               position_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    assert self.q_norm is not None and self.k_norm is not None
    return super().__call__(self.k_norm(key), self.q_norm(query),
                            position_ids)


class Qwen3Attention(llama.Attention):
  """Llama's attention with an explicit head_dim and q/k norms."""

  @classmethod
  def check_config(cls, config: Any) -> None:
    llama.check_config(config)
    check_no_sliding_window(config, "Qwen3")

  def setup(self) -> None:
    self.q_norm = HeadRMSNorm(self.config, dtype=self.dtype)
    self.k_norm = HeadRMSNorm(self.config, dtype=self.dtype)
    super().setup()

  def make_rotary(self) -> hf.FlaxLlamaRotaryEmbedding:
    return _NormedRotary(self.config, dtype=self.dtype,
                         q_norm=self.q_norm, k_norm=self.k_norm)


class FlaxQwen3ForCausalLM(llama.FlaxLlamaForCausalLMFixed):
  """Qwen3 causal LM (parameter tree of PyTorch's `Qwen3ForCausalLM`)."""

  attention_cls = Qwen3Attention


class Qwen3Adapter(llama.LlamaAdapter):
  """Qwen3 decoder layers; Llama's linears and groups."""

  family = "qwen3"
  attention_cls = Qwen3Attention
