"""Tiny configs and random PyTorch / Flax models of each family for tests."""

from __future__ import annotations

from typing import Any

from transformers import (
  Gemma3TextConfig,
  GPT2Config,
  LlamaConfig,
  MistralConfig,
  OPTConfig,
  Qwen2Config,
  Qwen3Config,
)

VOCAB = 97


# Llama-like families at hidden 64, GQA (4 heads, 2 key-value heads),
# untied as their 7B/8B models: Qwen3 with head_dim 24 != 64 / 4, Mistral
# with a window of 5 keys, shorter than most test sequences.
LLAMA_LIKE = {
    "qwen2": (Qwen2Config, {}),
    "qwen3": (Qwen3Config, {"head_dim": 24}),
    "mistral": (MistralConfig, {"sliding_window": 5, "rope_theta": 1e4}),
}


def tiny_config(family: str, **overrides: Any) -> Any:
  """A 2-layer, hidden-32 config of `family` ('llama', 'opt', 'gpt2',
  'opt-proj': OPT-350m-like, post-LayerNorm with project_in/out), a
  hidden-64 one of a family of `LLAMA_LIKE`, or 'gemma3': 4 layers of
  hidden 64, local and global alternating, sliding window 4, linear RoPE
  scaling on the global layers."""
  if family == "llama":
    kw = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, rope_theta=100000.0,
              tie_word_embeddings=True)
    cls = LlamaConfig
  elif family in ("opt", "opt-proj"):
    kw = dict(hidden_size=32, ffn_dim=48, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=64,
              word_embed_proj_dim=32)
    if family == "opt-proj":
      kw.update(word_embed_proj_dim=16, do_layer_norm_before=False)
    cls = OPTConfig
  elif family == "gemma3":
    kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=128, sliding_window=4,
              sliding_window_pattern=2, query_pre_attn_scalar=16,
              rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
              rope_scaling={"rope_type": "linear", "factor": 8.0},
              tie_word_embeddings=True, attn_implementation="eager")
    cls = Gemma3TextConfig
  elif family == "gpt2":
    kw = dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)
    cls = GPT2Config
  elif family in LLAMA_LIKE:
    cls, extra = LLAMA_LIKE[family]
    kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, rope_theta=1e6,
              tie_word_embeddings=False)
    kw.update(extra)
  else:
    raise ValueError(family)
  kw.update({"vocab_size": VOCAB, **overrides})
  return cls(**kw)


def tiny_torch(family: str, seed: int = 0, **overrides: Any) -> Any:
  """A random PyTorch causal LM of `tiny_config(family)` in eval mode.

  Weights are drawn with a larger scale than HF's init (std 0.02) so that
  attention patterns and RoPE matter for the logits.
  """
  import torch
  from transformers import AutoModelForCausalLM

  torch.manual_seed(seed)
  model = AutoModelForCausalLM.from_config(
      tiny_config(family, **overrides), torch_dtype=torch.float32)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias"):
        p.normal_(0.0, 0.1)
      elif p.ndim == 2:
        p.normal_(0.0, 0.3)
      else:  # Norm weights around 1.
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
  return model.eval()


def tiny_tokenizer() -> Any:
  """A word-level fast tokenizer over a few English words (ids < VOCAB)."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  words = ("the of and to a in is it was that he for on with as his at by "
           "be this had not are but from or have an they which one you "
           "were her all she there would their we him been has when who "
           "will more no if out so said what up its about into than them "
           "can only other new some could time these two may then do "
           "first any my now such like our over man me even most made "
           "after also").split()
  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
  for w in words[:VOCAB - len(vocab)]:
    vocab.setdefault(w, len(vocab))
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  return PreTrainedTokenizerFast(
      tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
      eos_token="</s>")


def write_tiny_gguf(path: Any, *, arch: str = "llama",
                    vocab: Any = None) -> None:
  """A small, valid GGUF file (metadata and two float32 tensors); with
  `vocab` (a `bridge.spm_bpe.GgufVocab`) also its SentencePiece tokenizer
  metadata (BOS and EOS id 1, unknown id 0)."""
  import gguf
  import numpy as np

  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_block_count(1)
  writer.add_context_length(64)
  writer.add_embedding_length(32)
  writer.add_head_count(4)
  if vocab is not None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(0)
  n_vocab = VOCAB if vocab is None else len(vocab.tokens)
  writer.add_tensor("token_embd.weight",
                    np.ones((n_vocab, 32), np.float32))
  writer.add_tensor("output_norm.weight", np.ones((32,), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
