"""Flax checkpoint folders: reading one into a Flax model, writing one
atomically.

A folder holds config.json, `model.safetensors` (float32, '.'-joined Flax
paths, metadata `format: flax`, as HF's `save_pretrained(
safe_serialization=True)` writes it) or `flax_model.msgpack`, the
tokenizer files, and the source record `mosp_source.json` of the model
cache (`bridge.model_cache`). Writes go to a temporary sibling folder,
then are renamed into place.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bridge import rename
from bridge.model_files import FLAX_WEIGHTS, ModelLoadError
from bridge.tokenizers import TOKENIZER_FILES
from mosp_jax import models

SOURCE_META = "mosp_source.json"


def check_supported(config: Any, what: str) -> None:
  """Raises `ModelLoadError` unless `config` is of a supported family."""
  if config.model_type not in models.SUPPORTED_MODEL_TYPES:
    raise ModelLoadError(
        f"{what}: unsupported architecture {config.model_type!r} "
        f"({getattr(config, 'architectures', None)}); supported model "
        f"types: {', '.join(models.SUPPORTED_MODEL_TYPES)}")


def flax_model(config: Any, dtype: Any, what: str) -> Any:
  """An uninitialised Flax model of the config's family."""
  check_supported(config, what)
  try:
    return models.model_class(config)(config, dtype=dtype, _do_init=False)
  except NotImplementedError as e:
    raise ModelLoadError(f"{what}: {e}") from e


def expected_params(model: Any) -> rename.Flat:
  """The flat parameter tree of `model` (leaves with `.shape`)."""
  return rename.flatten(model.params_shape_tree)



def check_shapes(shapes: rename.Flat, model: Any, *, what: str) -> None:
  """Raises `rename.CheckpointMismatchError` unless the flat `shapes`
  (leaves with `.shape`) are exactly `model`'s parameters."""
  rename.tree_diff(shapes, expected_params(model), what=what)



def _read_flax_weights(d: pathlib.Path) -> rename.Flat:
  """The flat float32 weights of a Flax folder (safetensors or msgpack)."""
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
  model = flax_model(config, dtype, str(d))
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
  return model, cast(rename.unflatten(flat), dtype), tokenizer


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

  return write_checkpoint(dest, config, weights, tokenizer, meta)


def write_checkpoint(dest: str | os.PathLike, config: Any,
                     weights: Callable[[pathlib.Path], None],
                     tokenizer: Any,
                      meta: dict) -> pathlib.Path:
  """`save_flax_dir` with the weights written by `weights(path of
  model.safetensors)`."""

  def write(tmp: pathlib.Path) -> None:
    weights(tmp / FLAX_WEIGHTS)
    config.save_pretrained(str(tmp))
    if tokenizer is not None:
      tokenizer.save_pretrained(str(tmp))
    (tmp / SOURCE_META).write_text(json.dumps(meta, indent=1))

  return write_dir(dest, write)



def write_dir(dest: str | os.PathLike,
              write: Callable[[pathlib.Path], None]) -> pathlib.Path:
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


def cast(params: dict, dtype: Any) -> dict:
  """`params` with every leaf cast to `dtype`."""
  return jax.tree.map(lambda x: jnp.asarray(x, dtype), params)

