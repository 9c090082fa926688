"""Model specs -> tokenizer, dense model and shape: the one model loader.

`experiments.run`, `experiments.compare`, the layer-level comparison and
the bridge (`bridge.pruned.preference_model`) load models only through here. A
spec is 'smollm2-135m', a local folder, a .gguf file or a hub id
(`bridge.hf_import`), 'tiny-llama' (a seeded random 2-layer Llama with
SmolLM2's tokenizer, for smoke tests) or `random:<name>[:<n_layers>]` (a
paper model's config with seeded random weights,
`mosp_jax.models.paper_configs`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from mosp_jax import cli
from mosp_jax.models.base import Adapter
from mosp_jax.pipeline import layer_source

if TYPE_CHECKING:  # transformers loads in seconds: only where a model is.
  from transformers import FlaxPreTrainedModel

TINY_LLAMA = "tiny-llama"
TINY_LLAMA_CONTEXT = 2048
TINY_LLAMA_LAYERS = 2
# len() of SmolLM2's tokenizer, the vocabulary `load_dense` gives
# tiny-llama (the plan reads it before any tokenizer is loaded).
TINY_LLAMA_VOCAB = 49152


def spec_tokenizer(spec: str, *, trust_pickle: bool = False) -> Any:
  """The tokenizer of a run's model spec, read without converting the
  model ('tiny-llama' uses SmolLM2's; a `random:` paper model SmolLM2's
  with ids modulo its vocabulary, `paper_configs.ModuloVocabTokenizer`;
  else `bridge.hf_import.load_tokenizer`). A bad `random:` spec raises
  `paper_configs.RandomSpecError`. `trust_pickle`, here and below: allow
  pickled PyTorch weights (`RunConfig.trust_pickle`).
  """
  from bridge import hf_import, model_files
  from mosp_jax.models import paper_configs
  random_spec = paper_configs.parse_random_spec(spec)
  if random_spec is not None:
    return paper_configs.random_tokenizer(
        hf_import.load_tokenizer(model_files.SMOLLM2), random_spec)
  return hf_import.load_tokenizer(
      model_files.SMOLLM2 if spec == TINY_LLAMA else spec,
      trust_pickle=trust_pickle)


def load_dense(spec: str, tokenizer: Any = None, *,
               trust_pickle: bool = False) -> tuple[Adapter, dict, Any]:
  """(adapter, float32 numpy params, tokenizer) of a run's model spec; the
  one loader of `experiments.run` and of the bridge.

  'tiny-llama' is the seeded random 2-layer Llama with SmolLM2's
  tokenizer; `random:<name>[:<n_layers>]` a paper model's config with
  seeded random weights (`mosp_jax.models.paper_configs`; refused over
  its memory limit); anything else goes to `bridge.hf_import`.
  `tokenizer` defaults to `spec_tokenizer(spec)`. `preference_model` checks
  the result against the run's fingerprint.
  """
  from bridge import hf_import
  from mosp_jax import models
  from mosp_jax.models import paper_configs
  if tokenizer is None:
    tokenizer = spec_tokenizer(spec, trust_pickle=trust_pickle)
  random_spec = paper_configs.parse_random_spec(spec)
  model: FlaxPreTrainedModel
  if spec == TINY_LLAMA:
    model, params = models.tiny_llama(vocab_size=len(tokenizer), seed=0)
  elif random_spec is not None:
    model, params = paper_configs.random_model(random_spec, seed=0)
  else:
    model, params, _ = hf_import.load_model(spec, trust_pickle=trust_pickle)
  params = jax.tree.map(np.asarray, jax.device_get(params))
  return models.adapter_for(model), params, tokenizer


def load_layers(spec: str, tokenizer: Any = None, *,
                dtype: Any = jnp.float32, trust_pickle: bool = False
                ) -> tuple[Adapter, layer_source.DenseLayers, Any]:
  """(adapter, dense model read layer by layer, tokenizer) of a run's model
  spec: what the layer walk prunes, one layer in memory at a time.

  A converted model (GGUF, PyTorch, Hub) is read tensor by tensor from its
  Flax checkpoint in the model cache (converted once, whole, when not
  cached); a `random:` spec draws each layer when read, so no limit on
  its size applies; 'tiny-llama' and a Flax folder are loaded whole
  (`load_dense`). `dtype` is the device dtype of weights and activations
  (the adapter computes in it). The values equal `load_dense`'s, and
  `sha256()` its `run_record.params_sha256`.
  """
  from bridge import flax_checkpoint, hf_import
  from mosp_jax import models
  from mosp_jax.models import paper_configs
  if tokenizer is None:
    tokenizer = spec_tokenizer(spec, trust_pickle=trust_pickle)
  random_spec = paper_configs.parse_random_spec(spec)
  if random_spec is not None:
    config = random_spec.config()
    model = models.model_class(config)(config, _do_init=False, dtype=dtype)
    adapter = models.adapter_for(model)
    # `paper_configs.param_shapes` of the model just built.
    source = layer_source.from_random(
        adapter, flatten_dict(model.params_shape_tree),
        std=paper_configs.init_std(config), seed=0, what=spec, dtype=dtype)
    return adapter, source, tokenizer
  cached = (None if spec == TINY_LLAMA
            else hf_import.cached_checkpoint(spec, dtype=dtype,
                                             trust_pickle=trust_pickle))
  if cached is None:
    adapter, params, tokenizer = load_dense(spec, tokenizer,
                                            trust_pickle=trust_pickle)
    return (*layered(adapter, params, what=spec, dtype=dtype), tokenizer)
  model, path = cached
  adapter = models.adapter_for(model)
  source = layer_source.from_safetensors(adapter, str(path), dtype=dtype)
  flax_checkpoint.check_shapes(source.shapes, model, what=str(path))
  return adapter, source, tokenizer


def layered(adapter: Adapter, params: dict, *, what: str,
            dtype: Any = jnp.float32
            ) -> tuple[Adapter, layer_source.DenseLayers]:
  """A whole loaded model (`load_dense`) as the walk reads it: the adapter
  computing in `dtype` and the layers of `params` put on the device one
  at a time in `dtype`."""
  adapter = adapter.with_dtype(jnp.dtype(dtype))
  return adapter, layer_source.from_tree(adapter, params, what=what,
                                         dtype=dtype)


def model_config(spec: str, *, trust_pickle: bool = False) -> Any:
  """The HF config of a run's model spec, read without weights (a
  `random:` spec is not checked against the memory limit of random
  weights: nothing is built); `cli.UsageError` when --model names no
  file or a bad `random:` spec."""
  from mosp_jax import models
  from mosp_jax.models import paper_configs
  if spec == TINY_LLAMA:
    return models.tiny_llama_config(TINY_LLAMA_VOCAB,
                                    num_layers=TINY_LLAMA_LAYERS)
  with cli.usage_errors("--model"):
    random_spec = paper_configs.parse_random_spec(spec)
  if random_spec is not None:
    return random_spec.config()
  from bridge import hf_import
  try:
    return hf_import.load_config(spec, trust_pickle=trust_pickle)
  except FileNotFoundError as e:
    raise cli.UsageError(f"--model: {e}") from e


def model_shape(spec: str, *, weights: bool = True,
                trust_pickle: bool = False) -> tuple[int | None, int | None]:
  """`(context tokens, decoder layers)` of a model spec, read from its
  config alone (None where the config does not say); `cli.UsageError`
  when --model names no file, or a `random:` spec that is unknown, has a
  bad layer count or (when its `weights` will be built) is over the
  memory limit of random models."""
  if spec == TINY_LLAMA:
    return TINY_LLAMA_CONTEXT, TINY_LLAMA_LAYERS
  from mosp_jax.models import paper_configs
  with cli.usage_errors("--model"):
    random_spec = paper_configs.parse_random_spec(spec)
    if random_spec is not None and weights:  # Random weights: their size.
      paper_configs.check_random_spec(random_spec)
  config = model_config(spec, trust_pickle=trust_pickle)
  context = (getattr(config, "max_position_embeddings", None)
             or getattr(config, "n_positions", None))
  layers = (getattr(config, "num_hidden_layers", None)
            or getattr(config, "n_layer", None))
  return context, layers
