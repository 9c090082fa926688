"""One task's calibration and test segments, with tokenised streams cached.

`load_task` reads a source, splits it (by group, seeded with `split_seed`;
or by the source's official split), tokenises each side into one stream
(`segments.tokenize_stream`, only as many whole documents as the budgets
need), caches the streams on disk, and cuts calibration segments (seeded
with `seed`) and test segments from them. The split does not depend on
`seed`, so calibration draws with different seeds share one test set.

The cache key is a hash of the documents themselves, the tokenizer's full
definition, the separator, the split parameters and the token budgets;
entries live in `<cache_dir>/data/<name>-<key>/` and are written to a
temporary folder that is renamed into place when complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import pathlib
import re
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from mosp_jax import fetch
from mosp_jax.data import corpora, segments

_CACHE_VERSION = 1
_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TaskData:
  """Token segments of one task.

  Attributes:
    name: the source name or path.
    calib: (nsamples, seqlen) int32 random calibration windows.
    test: (n_test, seqlen) int32 consecutive non-overlapping test windows.
    calib_stream, test_stream: the tokenised sides the windows come from.
    calib_groups, test_groups: the group of each document in the streams,
      aligned with `Stream.starts`; no group is on both sides.
    separator_ids: the token ids put before every document.
    cache_path: the folder holding the cached streams, None if not cached.
  """
  name: str
  calib: np.ndarray
  test: np.ndarray
  calib_stream: segments.Stream
  test_stream: segments.Stream
  calib_groups: tuple[str, ...]
  test_groups: tuple[str, ...]
  separator_ids: tuple[int, ...]
  cache_path: pathlib.Path | None


def tokenizer_fingerprint(tokenizer: Any) -> str:
  """A hash of the tokenizer's full definition (class and vocabulary/rules;
  its own `fingerprint()` where it has one, e.g.
  `models.paper_configs.ModuloVocabTokenizer`)."""
  h = hashlib.sha256(type(tokenizer).__qualname__.encode())
  own = getattr(tokenizer, "fingerprint", None)
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if callable(own):  # A wrapper that maps ids says what they depend on.
    h.update(own().encode())
  elif backend is not None:
    h.update(backend.to_str().encode())
  elif hasattr(tokenizer, "get_vocab"):
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
  else:
    raise ValueError(f"cannot fingerprint a {type(tokenizer).__name__}; "
                     "pass use_cache=False")
  return h.hexdigest()


def documents_fingerprint(docs: Sequence[corpora.Document]) -> str:
  """A hash of the documents' texts, groups and splits, in order."""
  h = hashlib.sha256()
  for doc in docs:
    for field in (doc.text, doc.group, doc.split or ""):
      data = field.encode("utf-8", errors="surrogatepass")
      h.update(len(data).to_bytes(8, "little"))
      h.update(data)
  return h.hexdigest()


def split_sides(docs: Sequence[corpora.Document], *, test_fraction: float,
                split_seed: int
                ) -> tuple[list[corpora.Document], list[corpora.Document]]:
  """Calibration and test documents, each side in a seeded random order."""
  fixed = {doc.split for doc in docs}
  if fixed == {None}:
    return segments.split_documents(
        docs, test_fraction=test_fraction, seed=split_seed,
        group_key=lambda d: d.group)
  if not fixed <= {corpora.CALIB, corpora.TEST} or len(fixed) != 2:
    raise ValueError(f"documents carry splits {fixed}; an official split "
                     f"needs every document on {corpora.CALIB!r} or "
                     f"{corpora.TEST!r}, both present")
  rng = np.random.default_rng(split_seed)
  out = []
  for side in (corpora.CALIB, corpora.TEST):
    part = [d for d in docs if d.split == side]
    out.append([part[i] for i in rng.permutation(len(part))])
  return out[0], out[1]


def _split(name: str, docs: Sequence[corpora.Document], *,
           test_fraction: float, split_seed: int
           ) -> tuple[list[corpora.Document], list[corpora.Document]]:
  """`split_sides`, with an error that names the task and what it
  needs."""
  try:
    return split_sides(docs, test_fraction=test_fraction, split_seed=split_seed)
  except ValueError as e:
    raise ValueError(
        f"task {name!r}: {e} (it holds {len(docs)} document(s): a task "
        "needs documents for calibration and for test; a .txt file "
        "separates documents by a blank line, a .jsonl file has one per "
        "line)") from e


def check_task(name: str | os.PathLike, *,
               test_fraction: float = 0.2) -> None:
  """Reads a task's documents and checks they can be split, without a
  tokenizer (cheap validation before any model is loaded).

  Raises:
    FileNotFoundError, ValueError: naming the task file.
  """
  name = os.fspath(name)
  _split(name, corpora.get_source(name), test_fraction=test_fraction,
         split_seed=0)


def _build(calib_docs: Sequence[corpora.Document],
           test_docs: Sequence[corpora.Document], tokenizer: Any, *,
           separator_ids: Sequence[int], calib_budget: Any,
           test_budget: Any) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for side, side_docs, budget in (("calib", calib_docs, calib_budget),
                                  ("test", test_docs, test_budget)):
    stream = segments.tokenize_stream(
        [d.text for d in side_docs], tokenizer, separator_ids=separator_ids,
        max_tokens=budget)
    out[side] = stream
    out[f"{side}_groups"] = tuple(
        d.group for d in side_docs[:stream.starts.size])
  return out


def _save(path: pathlib.Path, built: dict[str, Any]) -> None:
  """Writes the streams to a temporary folder, then renames it to `path`."""
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
  try:
    for side in ("calib", "test"):
      np.save(tmp / f"{side}.npy", built[side].tokens)
      np.save(tmp / f"{side}_starts.npy", built[side].starts)
    (tmp / "meta.json").write_text(json.dumps(
        {k: list(built[k]) for k in ("calib_groups", "test_groups")}))
    os.rename(tmp, path)
  except OSError:
    if not (path / "meta.json").exists():  # not just a concurrent writer
      raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _load(path: pathlib.Path) -> dict[str, Any]:
  meta = json.loads((path / "meta.json").read_text())
  out: dict[str, Any] = {k: tuple(v) for k, v in meta.items()}
  for side in ("calib", "test"):
    out[side] = segments.Stream(np.load(path / f"{side}.npy"),
                                np.load(path / f"{side}_starts.npy"))
  return out


def _cache_path(name: str, docs: Sequence[corpora.Document], tokenizer: Any,
                params: dict[str, Any],
                cache_root: str | os.PathLike | None) -> pathlib.Path:
  """The folder caching a task's tokenised streams, `<root>/<name>-<key>`:
  the key hashes the documents, the tokenizer and `params` (separator,
  split, budgets). Creates `root` (default `fetch.cache_dir() / "data"`),
  not the folder."""
  key = hashlib.sha256(json.dumps(dict(
      params, version=_CACHE_VERSION, docs=documents_fingerprint(docs),
      tokenizer=tokenizer_fingerprint(tokenizer))).encode()).hexdigest()
  root = pathlib.Path(cache_root or fetch.cache_dir() / "data")
  root.mkdir(parents=True, exist_ok=True)
  slug = re.sub(r"[^A-Za-z0-9._-]+", "_", pathlib.Path(name).name)[:40]
  return root / f"{slug}-{key[:24]}"


def _cached_or_built(name: str, docs: Any, tokenizer: Any,
                     params: dict[str, Any],
                     path: pathlib.Path | None) -> dict[str, Any]:
  """The task's tokenised calibration and test streams: read from the
  cache folder `path` when it holds them, else split, tokenised and (with a
  `path`) written there."""
  if path is not None and (path / "meta.json").exists():
    _log.info("task %s: cached streams in %s", name, path)
    return _load(path)
  sides = _split(name, docs, test_fraction=params["test_fraction"],
                 split_seed=params["split_seed"])
  built = _build(*sides, tokenizer, separator_ids=params["separator_ids"],
                 calib_budget=params["calib_budget"],
                 test_budget=params["test_budget"])
  if path is not None:
    _save(path, built)
  return built


def load_task(
    name: str | os.PathLike, tokenizer: Any, *, nsamples: int = 128,
    seqlen: int = 2048, test_tokens: int = 128 * 2048, seed: int = 0,
    split_seed: int = 0, test_fraction: float = 0.2,
    separator: str | int | None = segments.DEFAULT_SEPARATOR,
    pool_factor: float = 2.0, cache_root: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> TaskData:
  """Calibration and test segments of one task.

  Args:
    name: a source name (`corpora.SOURCES`) or a `.txt`/`.jsonl` path.
    tokenizer: a Hugging Face tokenizer.
    nsamples, seqlen: calibration segments, drawn with `seed` from a stream
      of about `pool_factor * nsamples * seqlen` tokens (fewer if the
      calibration side is smaller; at least `nsamples * seqlen`).
    test_tokens: tokenise about this many test tokens and cut
      `test_tokens // seqlen` consecutive segments (fewer if the test side
      is smaller).
    seed: seed of the calibration windows.
    split_seed: seed of the calibration/test split and of document order.
    test_fraction: share of groups on the test side; ignored by sources with
      an official split.
    separator: token before every document (see `segments` docstring).
    cache_root: cache folder; default `fetch.cache_dir() / "data"`.
    use_cache: read and write tokenised streams in the cache.
  """
  name = os.fspath(name)
  docs = corpora.get_source(name)
  separator_ids = segments.resolve_separator(tokenizer, separator)
  params = dict(
      separator_ids=separator_ids, test_fraction=test_fraction,
      split_seed=split_seed, test_budget=test_tokens,
      calib_budget=math.ceil(max(pool_factor, 1.0) * nsamples * seqlen))
  path = (_cache_path(name, docs, tokenizer, params, cache_root)
          if use_cache else None)
  built = _cached_or_built(name, docs, tokenizer, params, path)
  prefix = segments.bos_prefix(tokenizer, separator_ids)
  cut = seqlen - len(prefix)
  try:
    calib = segments.calibration_segments(
        built["calib"].tokens, nsamples=nsamples, seqlen=cut, seed=seed)
    test = segments.test_segments(built["test"].tokens, seqlen=cut,
                                  max_tokens=test_tokens)
  except ValueError as e:
    raise ValueError(f"task {name!r}: {e}") from e
  calib = segments.with_prefix(calib, prefix)
  test = segments.with_prefix(test, prefix)
  return TaskData(name, calib, test, built["calib"], built["test"],
                  built["calib_groups"], built["test_groups"],
                  separator_ids, path)
