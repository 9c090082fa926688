"""Model families: one adapter per HF Flax family (see `base` for the API).

  model_class(config)  the Flax causal-LM class to build for a HF config
                       (Llama: our `FlaxLlamaForCausalLMFixed`; Qwen2,
                       Qwen3 and Mistral: subclasses of it; Gemma 3:
                       our `FlaxGemma3ForCausalLM`).
  adapter_for(model)   the layer-walk adapter of a Flax model.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
from transformers import (
  FlaxGPT2LMHeadModel,
  FlaxOPTForCausalLM,
  FlaxPreTrainedModel,
  PretrainedConfig,
)
from transformers.models.llama.modeling_flax_llama import FlaxLlamaForCausalLM

from mosp_jax.models.base import Adapter, BaseAdapter, Params
from mosp_jax.models.gemma3 import FlaxGemma3ForCausalLM, GemmaAdapter
from mosp_jax.models.gpt2 import Gpt2Adapter
from mosp_jax.models.llama import (
  FlaxLlamaForCausalLMFixed,
  LlamaAdapter,
  tiny_llama,
  tiny_llama_config,
)
from mosp_jax.models.mistral import FlaxMistralForCausalLMFixed, MistralAdapter
from mosp_jax.models.opt import OptAdapter
from mosp_jax.models.qwen2 import FlaxQwen2ForCausalLM, Qwen2Adapter
from mosp_jax.models.qwen3 import FlaxQwen3ForCausalLM, Qwen3Adapter

_FAMILIES: dict[str, tuple[type[FlaxPreTrainedModel], type[BaseAdapter]]] = {
    "llama": (FlaxLlamaForCausalLMFixed, LlamaAdapter),
    "opt": (FlaxOPTForCausalLM, OptAdapter),
    "gpt2": (FlaxGPT2LMHeadModel, Gpt2Adapter),
    "qwen2": (FlaxQwen2ForCausalLM, Qwen2Adapter),
    "qwen3": (FlaxQwen3ForCausalLM, Qwen3Adapter),
    "mistral": (FlaxMistralForCausalLMFixed, MistralAdapter),
    "gemma3_text": (FlaxGemma3ForCausalLM, GemmaAdapter),
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_FAMILIES)


class UnsupportedModelError(ValueError):
  """The config's `model_type` has no adapter here."""


def _family(config: PretrainedConfig
            ) -> tuple[type[FlaxPreTrainedModel], type[BaseAdapter]]:
  model_type = getattr(config, "model_type", None)
  if model_type not in _FAMILIES:
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not supported; supported: "
        f"{', '.join(SUPPORTED_MODEL_TYPES)}")
  return _FAMILIES[model_type]


def model_class(config: PretrainedConfig
                ) -> Callable[..., FlaxPreTrainedModel]:
  """The Flax causal-LM class to instantiate for `config`.

  Typed as a callable: the family classes take `(config, **kwargs)`, which
  their base `FlaxPreTrainedModel` does not.
  """
  return _family(config)[0]


def adapter_for(model: FlaxPreTrainedModel) -> Adapter:
  """The adapter of a HF Flax causal LM (uses its config and dtype).

  Raises:
    UnsupportedModelError: for a family without an adapter.
    TypeError: for HF's stock `FlaxLlamaForCausalLM`, whose forward ignores
      `rope_theta` and tied embeddings (see `mosp_jax.models.llama`); use
      `FlaxLlamaForCausalLMFixed`, as `bridge.hf_import` does.
  """
  adapter_cls = _family(model.config)[1]
  if (isinstance(model, FlaxLlamaForCausalLM)
      and not isinstance(model, FlaxLlamaForCausalLMFixed)):
    raise TypeError(
        "HF FlaxLlamaForCausalLM ignores rope_theta and tied embeddings; "
        "build mosp_jax.models.FlaxLlamaForCausalLMFixed instead")
  return adapter_cls(model.config, getattr(model, "dtype", jnp.float32))


__all__ = [
    "Adapter",
    "BaseAdapter",
    "FlaxGemma3ForCausalLM",
    "FlaxLlamaForCausalLMFixed",
    "FlaxMistralForCausalLMFixed",
    "FlaxQwen2ForCausalLM",
    "FlaxQwen3ForCausalLM",
    "tiny_llama",
    "tiny_llama_config",
    "GemmaAdapter",
    "Gpt2Adapter",
    "LlamaAdapter",
    "MistralAdapter",
    "OptAdapter",
    "Qwen2Adapter",
    "Qwen3Adapter",
    "Params",
    "SUPPORTED_MODEL_TYPES",
    "UnsupportedModelError",
    "adapter_for",
    "model_class",
]
