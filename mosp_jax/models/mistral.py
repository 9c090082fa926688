"""Mistral family: Llama's corrected modules with sliding-window attention.

Mistral's decoder layer is Llama's plus a sliding window: with
`sliding_window = W`, query i attends to keys i - W < j <= i (PyTorch's
`masking_utils.sliding_window_overlay`); `sliding_window: null`
(Mistral-7B-v0.2 / v0.3) is full causal attention. The window is
implemented [ours], so logits match PyTorch at any length; it matters only
beyond W tokens (4096 for Mistral-7B-v0.1, above the calibration length
2048 used here).

transformers 4.57 ships `FlaxMistralForCausalLM`; it is not used, as it
is wrong in ways that do not fail (1-3 checked against PyTorch in
tests/test_families.py, 4 read from its code):

1. RoPE ignores `rope_theta` (base 10000 hard-coded; right for v0.1,
   wrong for v0.2 / v0.3's 1e6) and an explicit `head_dim`.
2. `sliding_window: null` becomes `triu(mask, k=0)`: every token attends
   to itself alone.
3. A window of W keeps W + 1 keys (`triu(k=-W)`), one more than PyTorch.
4. `tie_word_embeddings` is ignored (an untied `lm_head` always), and the
   causal mask is built whole at `max_position_embeddings` (1 GB at
   32768 positions).

Its parameter tree is Llama's, so the model is `FlaxLlamaForCausalLMFixed`
with `MistralAttention` (the same names; checkpoints of either load).
"""

from __future__ import annotations

from mosp_jax.models import llama


class MistralAttention(llama.Attention):
  """Llama's attention with `config.sliding_window` keys per query."""

  def window(self) -> int | None:
    return getattr(self.config, "sliding_window", None)


class FlaxMistralForCausalLMFixed(llama.FlaxLlamaForCausalLMFixed):
  """Mistral causal LM (parameter tree of PyTorch's
  `MistralForCausalLM`)."""

  attention_cls = MistralAttention


class MistralAdapter(llama.LlamaAdapter):
  """Mistral decoder layers; Llama's linears and groups."""

  family = "mistral"
  attention_cls = MistralAttention
