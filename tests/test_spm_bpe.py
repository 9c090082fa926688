"""GGUF SentencePiece vocabularies tokenised as BPE (`bridge.spm_bpe`),
against a plain reference of llama.cpp's algorithm."""

import json
import random

import pytest
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE, Unigram

from bridge import spm_bpe
from bridge.spm_bpe import BYTE, CONTROL, NORMAL, USER_DEFINED, GgufVocab


def reference_ids(text: str, vocab: GgufVocab) -> list[int]:
  """llama.cpp's SentencePiece tokenisation, written out plainly: control
  and user-defined pieces are matched whole in the raw text (longest
  first); each stretch between them has its spaces replaced by `▁` and
  starts as characters; the adjacent pair whose join is a normal piece of
  the highest score (the leftmost of equals) is joined until none is; a
  symbol outside the vocabulary is spelt as its UTF-8 bytes' pieces."""
  typed = list(zip(vocab.tokens, vocab.scores, vocab.types, strict=True))
  normal = {p: (i, s) for i, (p, s, t) in enumerate(typed) if t == NORMAL}
  whole = {p: i for i, (p, _, t) in enumerate(typed)
           if t in (CONTROL, USER_DEFINED)}
  byte_id = {int(p[3:5], 16): i for i, (p, _, t) in enumerate(typed)
             if t == BYTE}
  longest = max(map(len, whole), default=0)
  ids: list[int] = []

  def stretch(chars: str) -> None:
    syms = list(chars.replace(" ", "▁"))
    while True:
      best = None
      for j in range(len(syms) - 1):
        joined = normal.get(syms[j] + syms[j + 1])
        if joined is not None and (best is None or joined[1] > best[0]):
          best = (joined[1], j)
      if best is None:
        break
      j = best[1]
      syms[j:j + 2] = [syms[j] + syms[j + 1]]
    for s in syms:
      if s in normal:
        ids.append(normal[s][0])
      else:
        ids.extend(byte_id[b] for b in s.encode("utf-8"))

  start = i = 0
  while i < len(text):
    match = next((text[i:i + n] for n in range(longest, 0, -1)
                  if text[i:i + n] in whole), None)
    if match is None:
      i += 1
      continue
    stretch(text[start:i])
    ids.append(whole[match])
    i += len(match)
    start = i
  stretch(text[start:])
  return ids


def _toy_vocab() -> GgufVocab:
  """A vocabulary whose scores are minus merge ranks, as in Gemma 3's, where
  a Unigram reading splits `▁and` (-6) into `▁a` (-1) + `nd` (-2)."""
  tokens, scores, types = ["<unk>", "<s>", "\n", "  "], [0.0] * 4, [
      2, CONTROL, USER_DEFINED, USER_DEFINED]
  tokens += [f"<0x{b:02X}>" for b in range(256)]
  scores += [0.0] * 256
  types += [BYTE] * 256
  merged = ["▁a", "nd", "▁an", "an", "▁n", "▁and", "da", "▁d", "dan",
            "▁dan", "aa", "aaa"]
  chars = ["▁", "a", "n", "d", "x"]
  for rank, p in enumerate(merged):
    tokens.append(p)
    scores.append(-float(rank + 1))
    types.append(NORMAL)
  for p in chars:
    tokens.append(p)
    scores.append(-100.0)
    types.append(NORMAL)
  return GgufVocab("llama", tokens, scores, types)


def _unigram_state(vocab: GgufVocab) -> dict:
  """The tokenizer transformers builds of a Gemma GGUF vocabulary: a Unigram
  model over the scores, `' '` -> `▁`, no added pieces but the specials."""
  tok = Tokenizer(Unigram(
      list(zip(vocab.tokens, vocab.scores, strict=True)), unk_id=0,
      byte_fallback=True))
  tok.normalizer = normalizers.Replace(" ", "▁")
  tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
  tok.decoder = decoders.Sequence([decoders.Replace("▁", " "),
                                   decoders.ByteFallback(), decoders.Fuse()])
  return json.loads(tok.to_str())


def _bpe(vocab: GgufVocab) -> Tokenizer:
  state = _unigram_state(vocab)
  state["added_tokens"] = spm_bpe.added_tokens(state, vocab)
  state["model"] = spm_bpe.bpe_model(state["model"], vocab)
  return Tokenizer.from_str(json.dumps(state))


def test_unigram_reading_splits_what_the_merges_join():
  vocab = _toy_vocab()
  unigram = Tokenizer.from_str(json.dumps(_unigram_state(vocab)))
  bpe = _bpe(vocab)
  ids = {p: i for i, p in enumerate(vocab.tokens)}
  assert unigram.encode(" and").ids == [ids["▁a"], ids["nd"]]
  assert bpe.encode(" and").ids == [ids["▁and"]]
  assert reference_ids(" and", vocab) == [ids["▁and"]]


def test_bpe_equals_the_reference_on_random_text():
  vocab, bpe = _toy_vocab(), _bpe(_toy_vocab())
  rng = random.Random(0)
  alphabet = ["a", "n", "d", " ", "x", "é", "\n", "  ", "<s>", "aa"]
  for _ in range(300):
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
    enc = bpe.encode(text, add_special_tokens=False)
    assert enc.ids == reference_ids(text, vocab), text
    assert bpe.decode(enc.ids, skip_special_tokens=False) == text


def test_byte_pieces_keep_their_names_and_added_pieces_their_text():
  vocab = _toy_vocab()
  state = _unigram_state(vocab)
  # transformers renames the tab's byte piece to a tab, and user-defined
  # space runs to `▁▁`.
  state["model"]["vocab"][4 + 9][0] = "\t"
  state["model"]["vocab"][3][0] = "▁▁"
  model = spm_bpe.bpe_model(state["model"], vocab)
  assert model["vocab"]["<0x09>"] == 4 + 9 and "\t" not in model["vocab"]
  assert model["vocab"]["  "] == 3 and "▁▁" not in model["vocab"]
  added = {t["id"]: t for t in spm_bpe.added_tokens(state, vocab)}
  assert added[3]["content"] == "  " and not added[3]["special"]
  assert added[1]["content"] == "<s>" and added[1]["special"]
  assert all(not t["normalized"] for t in added.values())
  # Merges join normal pieces only, higher scores first.
  merges = [tuple(m) for m in model["merges"]]
  assert merges.index(("▁", "a")) < merges.index(("n", "d"))
  assert not any("<0x" in a or "<0x" in b for a, b in merges)


def test_duplicate_pieces_and_mismatched_types_are_refused():
  vocab = _toy_vocab()
  state = _unigram_state(vocab)
  state["model"]["vocab"][-1][0] = "a"
  with pytest.raises(ValueError, match="appear twice"):
    spm_bpe.bpe_model(state["model"], vocab)
  with pytest.raises(ValueError, match="token types"):
    spm_bpe.bpe_model(state["model"], vocab._replace(types=vocab.types[:-1]))


def test_as_bpe_keeps_every_id_through_transformers():
  # Written out and read back by transformers, which gives an added token
  # whose text is not its id's piece a new id; none may move.
  from transformers import PreTrainedTokenizerFast

  vocab = _toy_vocab()
  state = _unigram_state(vocab)
  state["model"]["vocab"][3][0] = "▁▁"  # as transformers renames it
  tok = PreTrainedTokenizerFast(
      tokenizer_object=Tokenizer.from_str(json.dumps(state)),
      unk_token="<unk>", bos_token="<s>")
  bpe = spm_bpe.as_bpe(tok, vocab)
  assert len(bpe) == len(vocab.tokens) and bpe.bos_token_id == 1
  rng = random.Random(1)
  for _ in range(100):
    text = "".join(rng.choice(["a", "nd", " ", "  ", "\n", "x", "é"])
                   for _ in range(rng.randint(1, 20)))
    ids = bpe(text, add_special_tokens=False).input_ids
    assert ids == reference_ids(text, vocab), text
    assert max(ids) < len(vocab.tokens) and bpe.decode(ids) == text


def test_other_tokenizers_are_returned_unchanged(tmp_path):
  from transformers import PreTrainedTokenizerFast

  tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(
      BPE({"a": 0, "b": 1, "ab": 2}, [("a", "b")])))
  # A BPE tokenizer is never reread: the GGUF path is not opened.
  assert spm_bpe.as_bpe(tok, tmp_path / "missing.gguf") is tok


def test_a_vocabulary_that_cannot_be_rebuilt_stops_the_load(tmp_path,
                                                            monkeypatch):
  # A Gemma GGUF whose vocabulary has one piece twice: transformers reads
  # it (as a Unigram), the BPE rebuild refuses it, and the load stops with
  # that reason and the file, not as "the model has no tokenizer".
  from bridge import hf_import
  from bridge.model_files import ModelLoadError
  from tests.tiny_models import write_tiny_gguf

  monkeypatch.setenv("MOSP_JAX_CACHE", str(tmp_path / "cache"))
  vocab = _toy_vocab()
  path = tmp_path / "dup.gguf"
  write_tiny_gguf(path, arch="gemma3", vocab=vocab._replace(
      tokens=vocab.tokens[:-1] + [vocab.tokens[-2]]))
  with pytest.raises(ModelLoadError, match="appear twice") as e:
    hf_import.load_tokenizer(str(path))
  assert str(path) in str(e.value) and "llama.cpp" in str(e.value)
