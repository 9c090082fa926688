"""OPT family adapter (HF `FlaxOPTForCausalLM`, used unchanged).

Quirks handled here: learned positions are offset by 2 inside HF's module
(positions passed are 0..T-1, as HF computes them for an unpadded batch);
the MLP flattens (B, T) to B*T tokens, so captured `fc1`/`fc2` inputs are
reshaped back; `word_embed_proj_dim != hidden_size` (OPT-350m) adds the
`project_in`/`project_out` linears, which stay outside the layers (dense).
"""

from __future__ import annotations

import flax.linen as nn
import jax
from transformers.models.opt import modeling_flax_opt as hf

from mosp_jax.models.base import BaseAdapter


class OptAdapter(BaseAdapter):
  """OPT decoder layers: attention with biases and a ReLU MLP fc1/fc2."""

  family = "opt"
  layers_path = ("model", "decoder", "layers")
  groups = (
      ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
      ("self_attn.out_proj",),
      ("fc1",),
      ("fc2",),
  )

  def _check_config(self) -> None:
    if getattr(self.config, "enable_bias", True) is False:
      raise NotImplementedError(
          "OPT enable_bias=False is not supported by HF's Flax OPT")

  def _model_module(self) -> nn.Module:
    return hf.FlaxOPTForCausalLMModule(self.config, dtype=self.dtype)

  def _block_module(self) -> nn.Module:
    return hf.FlaxOPTDecoderLayer(self.config, dtype=self.dtype)

  def _block_args(self, hidden: jax.Array) -> tuple:
    return (self.full_mask(hidden),)

  @staticmethod
  def _embed(module: nn.Module, input_ids: jax.Array) -> jax.Array:
    dec = module.model.decoder
    x = dec.embed_tokens(input_ids)
    if dec.project_in is not None:
      x = dec.project_in(x)
    return x + dec.embed_positions(BaseAdapter.positions(input_ids))

  @staticmethod
  def _head(module: nn.Module, hidden: jax.Array) -> jax.Array:
    dec = module.model.decoder
    if dec.final_layer_norm is not None:
      hidden = dec.final_layer_norm(hidden)
    if dec.project_out is not None:
      hidden = dec.project_out(hidden)
    if module.config.tie_word_embeddings:
      emb = module.model.variables["params"]["decoder"]["embed_tokens"]
      return module.lm_head.apply(
          {"params": {"kernel": emb["embedding"].T}}, hidden)
    return module.lm_head(hidden)
