"""Document splits, token streams and fixed-length token segments.

A task's documents are split into a calibration side and a test side (by
document, or by group such as a problem id), each side is tokenised into one
stream with a separator before every document, and the streams are cut into
segments: random windows for calibration (as SparseGPT/ALPS draw them), and
consecutive non-overlapping windows for perplexity.

Separator [ours]: by default `<|endoftext|>` goes before every document and
the tokenizer adds no special tokens (no BOS). The GGUF SmolLM2 tokenizer
reports `<|im_start|>` (id 1) as both BOS and EOS, and its config's EOS is
`<|im_end|>` (id 2); both are chat-turn markers of the instruct model.
`<|endoftext|>` (id 0) is SmolLM2's document boundary in pretraining (the
base model's BOS/EOS), so windows that cross documents see the boundary the
model knows. Calibration and test use the same stream format.

A tokenizer without `<|endoftext|>` whose BOS is its document start
(Gemma 3: `<bos>`, id 2) gets its BOS as the default separator instead,
and every segment then starts with it (`bos_prefix`): Gemma reads text
after a BOS (real 270M: a paragraph's tokens cost more than a nat more
each without it, `tests/test_gemma3_gguf.py`), so each window is the BOS
and `seqlen - 1` tokens of the stream [ours].
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple, TypeVar

import numpy as np

T = TypeVar("T")
DEFAULT_SEPARATOR = "<|endoftext|>"


def split_documents(
    docs: Sequence[T], *, test_fraction: float, seed: int,
    group_key: Callable[[T], Hashable] | None = None,
) -> tuple[list[T], list[T]]:
  """Splits documents into calibration and test sides, whole groups at once.

  `round(test_fraction * n_groups)` groups (at least one) drawn with `seed`
  go to the test side. Each side comes back in a seeded random order, so
  any prefix of it is a random sample of that side.

  Args:
    docs: the documents, any type.
    test_fraction: share of groups on the test side, in (0, 1).
    seed: seed of the draw.
    group_key: maps a document to its group; default: each document is its
      own group.

  Returns:
    (calib_docs, test_docs), disjoint, together all of `docs`.
  """
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
  keys = [group_key(d) if group_key else i for i, d in enumerate(docs)]
  groups = list(dict.fromkeys(keys))
  n_test = max(1, round(test_fraction * len(groups)))
  if n_test >= len(groups):
    raise ValueError(
        f"cannot split {len(groups)} group(s) with test_fraction="
        f"{test_fraction}: each side needs at least one group")
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(groups))
  test_groups = {groups[i] for i in order[:n_test]}
  calib = [d for d, k in zip(docs, keys, strict=True) if k not in test_groups]
  test = [d for d, k in zip(docs, keys, strict=True) if k in test_groups]
  return ([calib[i] for i in rng.permutation(len(calib))],
          [test[i] for i in rng.permutation(len(test))])


def resolve_separator(tokenizer: Any,
                      separator: str | int | None) -> tuple[int, ...]:
  """Token ids that go before every document.

  Args:
    tokenizer: a Hugging Face tokenizer.
    separator: a token string that must be in the vocabulary (e.g.
      `"<|endoftext|>"`), a token id, or None for no separator.
  """
  if separator is None:
    return ()
  if isinstance(separator, int):
    return (separator,)
  vocab = tokenizer.get_vocab()
  bos = getattr(tokenizer, "bos_token_id", None)
  if separator == DEFAULT_SEPARATOR and separator not in vocab and (
      bos is not None):
    return (int(bos),)
  if separator not in vocab:
    special = getattr(tokenizer, "all_special_tokens", [])
    raise ValueError(
        f"separator {separator!r} is not a token of this tokenizer; pass "
        f"one of its special tokens {special}, a token id, or None")
  return (int(vocab[separator]),)


def bos_prefix(tokenizer: Any, separator_ids: Sequence[int]
               ) -> tuple[int, ...]:
  """The ids every segment starts with: the BOS where it is also the
  document separator (Gemma 3), else none."""
  bos = getattr(tokenizer, "bos_token_id", None)
  return (int(bos),) if bos is not None and tuple(separator_ids) == (
      bos,) else ()


def with_prefix(segs: np.ndarray, prefix: Sequence[int]) -> np.ndarray:
  """`(N, T)` segments with `prefix` before each: `(N, len(prefix) + T)`."""
  if not prefix:
    return segs
  head = np.broadcast_to(np.asarray(prefix, segs.dtype),
                         (segs.shape[0], len(prefix)))
  return np.concatenate([head, segs], axis=1)


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
  """Token ids of each text, without special tokens added or parsed."""
  if callable(tokenizer):
    return list(tokenizer(texts, add_special_tokens=False, verbose=False,
                          split_special_tokens=True)["input_ids"])
  return [list(tokenizer.encode(t, add_special_tokens=False)) for t in texts]


class Stream(NamedTuple):
  """A token stream: `sep doc_0 sep doc_1 ...`.

  Attributes:
    tokens: (n_tokens,) int32.
    starts: (n_docs,) int64, offset of each document's separator (of its
      first token when there is no separator).
  """
  tokens: np.ndarray
  starts: np.ndarray


def tokenize_stream(
    texts: Sequence[str], tokenizer: Any, *, separator_ids: Sequence[int],
    max_tokens: int | None = None, batch_chars: int = 1 << 20,
) -> Stream:
  """Tokenises documents in order into one stream, with a separator first.

  Stops after the document that brings the stream to `max_tokens` (whole
  documents only), so a capped stream is a prefix of the full one.
  """
  pieces: list[np.ndarray] = []
  starts: list[int] = []
  total, i = 0, 0
  while i < len(texts) and (max_tokens is None or total < max_tokens):
    limit = batch_chars
    if max_tokens is not None:  # ~6 characters a token at most, usually
      limit = min(batch_chars, max(4096, 6 * (max_tokens - total)))
    batch: list[str] = []
    chars = 0
    while i < len(texts) and (not batch or chars < limit):
      batch.append(texts[i])
      chars += len(texts[i])
      i += 1
    for ids in _encode(tokenizer, batch):
      if max_tokens is not None and total >= max_tokens:
        break
      starts.append(total)
      piece = np.asarray([*separator_ids, *ids], dtype=np.int32)
      pieces.append(piece)
      total += piece.size
  tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
  return Stream(tokens, np.asarray(starts, dtype=np.int64))


def calibration_segments(tokens: np.ndarray, *, nsamples: int, seqlen: int,
                         seed: int) -> np.ndarray:
  """`nsamples` random windows of `seqlen` tokens (seeded start offsets).

  Args:
    tokens: (n_tokens,) the calibration stream; it must hold at least
      `nsamples * seqlen` tokens, so that the windows could cover distinct
      text.

  Returns:
    (nsamples, seqlen) int32.
  """
  tokens = np.asarray(tokens)
  if nsamples < 1 or seqlen < 1:
    raise ValueError(f"nsamples={nsamples} and seqlen={seqlen} must be >= 1")
  if tokens.size < nsamples * seqlen:
    raise ValueError(
        f"too few calibration tokens: {tokens.size} < nsamples * seqlen = "
        f"{nsamples} * {seqlen} = {nsamples * seqlen}; use fewer or shorter "
        "segments or a larger source")
  begin = calibration_offsets(tokens.size, nsamples=nsamples, seqlen=seqlen,
                              seed=seed)
  return tokens[begin[:, None] + np.arange(seqlen)].astype(np.int32)


def calibration_offsets(n_tokens: int, *, nsamples: int, seqlen: int,
                        seed: int) -> np.ndarray:
  """(nsamples,) int64 start offsets of `calibration_segments`' windows."""
  rng = np.random.default_rng(seed)
  return rng.integers(0, n_tokens - seqlen + 1, size=nsamples)


def test_segments(tokens: np.ndarray, *, seqlen: int,
                  max_tokens: int) -> np.ndarray:
  """Consecutive non-overlapping windows from the start of the test stream.

  Returns:
    (n, seqlen) int32, `n = min(n_tokens, max_tokens) // seqlen`.
  """
  tokens = np.asarray(tokens)
  n = min(tokens.size, max_tokens) // max(seqlen, 1)
  if seqlen < 1 or n < 1:
    raise ValueError(
        f"too few test tokens for one segment: min({tokens.size} tokens, "
        f"max_tokens={max_tokens}) < seqlen={seqlen}")
  return tokens[:n * seqlen].reshape(n, seqlen).astype(np.int32)


# Not a pytest test, despite its name (mypy does not model function
# attributes).
test_segments.__test__ = False  # type: ignore[attr-defined]
