"""SentencePiece vocabularies from GGUF files, tokenised as the GGUF means.

A GGUF file with `tokenizer.ggml.model = "llama"` stores a SentencePiece
vocabulary as pieces and scores. llama.cpp, which defines the format,
tokenises it by pair merging: starting from characters, it repeatedly joins
the adjacent pair whose joined piece is in the vocabulary with the highest
score (for Gemma 3 the score is minus the merge rank: `▁the` -12, `▁and`
-38), and spells characters outside the vocabulary as `<0xNN>` byte pieces.
That is SentencePiece's BPE.

transformers 4.57 builds the Gemma 2/3 GGUF tokenizer as a *Unigram*
model over the same scores, which picks the split with the highest sum of
scores, and ranks make short pieces win: ` and` became ` a` + `nd`,
`atmosphere` became `at` `mo` `sp` `he` `re`, so English reached the
model as fragments it never saw in training (Gemma 3 270M's dense
perplexity on general text was 213). `as_bpe` rebuilds such a tokenizer
as the BPE the scores describe [ours]: the same pieces and ids, the same
added tokens, normaliser, pre-tokeniser, decoder and special-token
settings; merges from the scores, the way transformers converts a
SentencePiece BPE `.model` file (`generate_merges`). Tokenizers of other
kinds (GPT-2 BPE with merges, as SmolLM2's and Qwen's GGUF files have)
are returned unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

# SentencePiece piece types, as GGUF's `tokenizer.ggml.token_type` stores them.
NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 3, 4, 6


class GgufVocab(NamedTuple):
  """A GGUF file's tokenizer metadata.

  Attributes:
    model: `tokenizer.ggml.model` ('llama': SentencePiece; 'gpt2': BPE with
      merges).
    tokens: the pieces, index = id.
    scores: their scores (SentencePiece BPE: minus the merge rank); empty
      where the file has none.
    types: their SentencePiece types (NORMAL, CONTROL, USER_DEFINED, BYTE,
      ...), one per piece; empty where the file has none.
  """
  model: str
  tokens: list[str]
  scores: list[float]
  types: list[int]


def read_gguf_vocab(path: str | os.PathLike) -> GgufVocab:
  """The tokenizer metadata of a GGUF file (no tensor is read)."""
  import gguf

  fields = gguf.GGUFReader(str(path)).fields

  def contents(name: str) -> list[Any]:
    return fields[name].contents() if name in fields else []

  return GgufVocab(fields["tokenizer.ggml.model"].contents(),
                   fields["tokenizer.ggml.tokens"].contents(),
                   contents("tokenizer.ggml.scores"),
                   contents("tokenizer.ggml.token_type"))


def bpe_model(unigram: dict[str, Any], vocab: GgufVocab) -> dict[str, Any]:
  """A `tokenizers` BPE model (its JSON form) from the Unigram model that
  transformers built of a GGUF SentencePiece vocabulary.

  Args:
    unigram: the `model` entry of the Unigram `tokenizer.json`: `vocab` a
      list of `[piece, score]` (index = id), `unk_id`, `byte_fallback`.
    vocab: the GGUF file's pieces and types (`read_gguf_vocab`).

  Returns:
    The `model` entry of a BPE `tokenizer.json`: the Unigram's normal
    pieces at the same ids, and the GGUF's own strings for the others
    (transformers renames the byte piece `<0x09>` to a tab, which the
    vocabulary also has as a piece of its own, and user-defined runs of
    spaces to `▁▁...`, which an added token must match as spaces); a
    merge `(left, right)` for every split of a normal piece into two
    normal pieces, the higher the joined piece's score the earlier
    (transformers' `generate_merges`, as for a SentencePiece BPE
    `.model`).

  Raises:
    ValueError: the types do not match the vocabulary, or two ids share a
      piece.
  """
  from transformers.convert_slow_tokenizer import generate_merges

  if len(vocab.types) != len(unigram["vocab"]):
    raise ValueError(f"{len(vocab.types)} token types for "
                     f"{len(unigram['vocab'])} pieces")
  pieces = [p if t == NORMAL else vocab.tokens[i]
            for i, ((p, _), t) in enumerate(zip(unigram["vocab"], vocab.types,
                                                strict=True))]
  ids = {p: i for i, p in enumerate(pieces)}
  if len(ids) != len(pieces):
    raise ValueError(f"{len(pieces) - len(ids)} pieces of the vocabulary "
                     "appear twice; it cannot be a BPE vocabulary")
  normal = [(p, float(s)) for (p, s), t in zip(unigram["vocab"], vocab.types,
                                                strict=True) if t == NORMAL]
  merges = generate_merges({p: ids[p] for p, _ in normal}, normal)
  unk_id = unigram.get("unk_id")
  return {
      "type": "BPE", "dropout": None,
      "unk_token": None if unk_id is None else pieces[unk_id],
      "continuing_subword_prefix": None, "end_of_word_suffix": None,
      "fuse_unk": True, "byte_fallback": bool(unigram.get("byte_fallback")),
      "ignore_merges": False, "vocab": ids,
      "merges": [list(m) for m in merges]}


def added_tokens(state: dict[str, Any], vocab: GgufVocab
                 ) -> list[dict[str, Any]]:
  """`state['added_tokens']` with every control piece (special) and
  user-defined piece (not special) of the GGUF file added, each matched
  whole in the raw text before the model runs (as llama.cpp partitions
  its input), so that no merge builds or splits one. The content is the
  GGUF string: a user-defined run of spaces is stored as spaces (which
  transformers renames to `▁▁...` in the model's vocabulary)."""
  have = {int(t["id"]) for t in state.get("added_tokens", [])}
  out = list(state.get("added_tokens", []))
  for i, t in enumerate(vocab.types):
    if t in (CONTROL, USER_DEFINED) and i not in have:
      out.append({"id": i, "content": vocab.tokens[i], "single_word": False,
                  "lstrip": False, "rstrip": False, "normalized": False,
                  "special": t == CONTROL})
  return sorted(out, key=lambda t: int(t["id"]))


def as_bpe(tokenizer: Any, gguf: GgufVocab | str | os.PathLike) -> Any:
  """`tokenizer` (a transformers fast tokenizer read from a GGUF file) as
  the BPE its SentencePiece vocabulary means, where transformers built it
  as a Unigram model; any other tokenizer unchanged. `gguf` is the file's
  path (read only when the tokenizer is a Unigram) or its `GgufVocab`.

  Written out and read back (`save_pretrained` / `from_pretrained`), so the
  tokenizer's class, special tokens and settings are what transformers
  itself reads from the files.
  """
  from transformers import AutoTokenizer

  state = json.loads(tokenizer.backend_tokenizer.to_str())
  if state["model"]["type"] != "Unigram":
    return tokenizer
  vocab = gguf if isinstance(gguf, GgufVocab) else read_gguf_vocab(gguf)
  if vocab.model != "llama":
    return tokenizer
  state["added_tokens"] = added_tokens(state, vocab)
  state["model"] = bpe_model(state["model"], vocab)
  log.info("a GGUF SentencePiece vocabulary (%d pieces): tokenised by its "
           "merges (BPE), not as a Unigram model",
           len(state["model"]["vocab"]))
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer.save_pretrained(tmp)
    with open(f"{tmp}/tokenizer.json", "w", encoding="utf-8") as f:
      json.dump(state, f, ensure_ascii=False)
    out = AutoTokenizer.from_pretrained(tmp)
  if len(out) != len(vocab.tokens):
    raise ValueError(f"the rebuilt tokenizer has {len(out)} ids, the GGUF "
                     f"vocabulary {len(vocab.tokens)}")
  return out
