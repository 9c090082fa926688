"""GPT-2 family adapter (HF `FlaxGPT2LMHeadModel`, used unchanged).

Quirks: GPT-2's linears are HF's `FlaxConv1D`, not `nn.Dense`, and store
their kernel as (n_out, n_in) (the transpose of Flax `Dense`, and of
PyTorch's `Conv1D`); `get_kernel`/`set_kernel` transpose to (n_in, n_out).
`attn.c_attn` is the fused q/k/v projection, one (d, 3d) matrix whose output
is split into thirds; it is pruned as one matrix. The head is tied to `wte`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
from transformers.models.gpt2 import modeling_flax_gpt2 as hf

from mosp_jax.models.base import BaseAdapter


class Gpt2Adapter(BaseAdapter):
  """GPT-2 blocks: pre-LayerNorm attention (fused qkv) and a GELU MLP."""

  family = "gpt2"
  layers_path = ("transformer", "h")
  groups = (
      ("attn.c_attn",),
      ("attn.c_proj",),
      ("mlp.c_fc",),
      ("mlp.c_proj",),
  )
  linear_types = (hf.FlaxConv1D, nn.Dense)
  kernel_is_out_in = True

  def _check_config(self) -> None:
    if getattr(self.config, "add_cross_attention", False):
      raise NotImplementedError("GPT-2 with cross-attention is not supported")

  def _model_module(self) -> nn.Module:
    return hf.FlaxGPT2LMHeadModule(self.config, dtype=self.dtype)

  def _block_module(self) -> nn.Module:
    return hf.FlaxGPT2Block(self.config, dtype=self.dtype)

  def _block_args(self, hidden: jax.Array) -> tuple:
    return (self.full_mask(hidden),)

  @staticmethod
  def _embed(module: nn.Module, input_ids: jax.Array) -> jax.Array:
    tr = module.transformer
    pos = BaseAdapter.positions(input_ids)
    return tr.wte(input_ids) + tr.wpe(pos)

  @staticmethod
  def _head(module: nn.Module, hidden: jax.Array) -> jax.Array:
    tr = module.transformer
    hidden = tr.ln_f(hidden)
    if module.config.tie_word_embeddings:
      emb = tr.variables["params"]["wte"]["embedding"]
      return module.lm_head.apply({"params": {"kernel": emb.T}}, hidden)
    return module.lm_head(hidden)
