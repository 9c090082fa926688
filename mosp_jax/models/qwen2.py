"""Qwen2 / Qwen2.5 family: Llama's corrected modules with q/k/v biases.

Qwen2's decoder layer is Llama's (pre-RMSNorm, GQA with rotate-half RoPE,
SwiGLU MLP, `rope_theta` from the config, tied or untied head) except
that `q_proj`, `k_proj` and `v_proj` carry a bias and `o_proj` does not
(PyTorch's `Qwen2Attention` hard-codes it; the config has no
`attention_bias`). transformers ships no Flax Qwen2, so the model is
`FlaxLlamaForCausalLMFixed` with `Qwen2Attention` (same parameter names
as PyTorch's state dict, biases included), and the adapter is Llama's:
the biases stay dense, only kernels are pruned.

Sliding-window attention (`use_sliding_window: true`, applied by PyTorch
to the layers from `max_window_layers` on) is refused [ours]: the
released Qwen2.5 checkpoints set it false, and the walk runs every layer
through one compiled block, which a per-layer mask would split.
"""

from __future__ import annotations

from typing import Any

from mosp_jax.models import llama


def check_no_sliding_window(config: Any, family: str) -> None:
  """Raises NotImplementedError when some layer of a Qwen config uses
  sliding-window attention (its `layer_types`, as PyTorch reads them)."""
  types = getattr(config, "layer_types", None) or []
  sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
  if sliding:
    raise NotImplementedError(
        f"{family} with use_sliding_window=true is not supported (layers "
        f"{sliding[0]}..{sliding[-1]} would attend to a window of "
        f"{config.sliding_window} keys); set use_sliding_window=false, or "
        f"max_window_layers >= num_hidden_layers")


class Qwen2Attention(llama.Attention):
  """Llama's attention with biases on q/k/v, none on o."""

  @classmethod
  def check_config(cls, config: Any) -> None:
    llama.check_config(config)
    check_no_sliding_window(config, "Qwen2")

  def use_bias(self, name: str) -> bool:
    return name != "o_proj"


class FlaxQwen2ForCausalLM(llama.FlaxLlamaForCausalLMFixed):
  """Qwen2 causal LM (parameter tree of PyTorch's `Qwen2ForCausalLM`)."""

  attention_cls = Qwen2Attention


class Qwen2Adapter(llama.LlamaAdapter):
  """Qwen2 decoder layers; Llama's linears and groups."""

  family = "qwen2"
  attention_cls = Qwen2Attention
