"""Tokenizers of a model source: reading them, and what they say about
special tokens.

Tokenizers are returned as loaded; nothing about special tokens is repaired.
`special_tokens(config, tokenizer)` reports what they do: the GGUF SmolLM2
tokenizer says EOS is `<|im_start|>` (id 1) and prepends it as BOS, while the
model config's EOS is id 2 (`<|im_end|>`) (docs/export.md).
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any, NamedTuple

from bridge import spm_bpe
from bridge.model_files import ModelLoadError, Source

log = logging.getLogger(__name__)

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



def read_tokenizer(source: Source, where: str, kwargs: dict[str, Any]
                   ) -> Any:
  """The source's tokenizer; None (logged) where it has none."""
  from transformers import AutoTokenizer

  if source.kind == "torch" and not any(
      (pathlib.Path(where) / n).exists() for n in TOKENIZER_FILES):
    log.warning("%s: no tokenizer files", where)
    return None
  tok_kwargs = {k: v for k, v in kwargs.items() if k == "gguf_file"}
  try:
    tokenizer = AutoTokenizer.from_pretrained(where, **tok_kwargs)
  except (OSError, ValueError, TypeError, AttributeError) as e:
    if source.kind == "torch":
      raise ModelLoadError(
          f"{where}: unreadable tokenizer files: {e}") from e
    log.warning("%s: no tokenizer (%s)", source.location, e)
    return None
  if "gguf_file" not in tok_kwargs:
    return tokenizer
  # A GGUF SentencePiece vocabulary is BPE; transformers reads Gemma's as
  # Unigram (`bridge.spm_bpe`). A rebuild that fails is an error of its
  # own, not a model without a tokenizer.
  gguf = pathlib.Path(where) / tok_kwargs["gguf_file"]
  try:
    return spm_bpe.as_bpe(tokenizer, gguf)
  except ValueError as e:
    raise ModelLoadError(f"{gguf}: its tokenizer cannot be rebuilt as "
                         f"llama.cpp's BPE: {e}") from e

