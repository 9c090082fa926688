"""Perplexity of `(N, T)` token segments on both sides of an export: the
JAX layer walk the run evaluates with, and stock PyTorch
(`AutoModelForCausalLM`) on the exported folder; summed next-token NLL,
in float32."""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import numpy as np

from bridge import torch_convert
from mosp_jax.pipeline import streams


def jax_perplexity(adapter: Any, params: Any, segments: np.ndarray, *,
                   batch_size: int) -> float:
  """exp(mean next-token NLL) of `(N, T)` segments, layer by layer as the
  run evaluates (`streams.perplexity`: embed, every decoder block, head), in
  float32."""
  with jax.transfer_guard("disallow"):
    return streams.perplexity(adapter, jax.device_put(params),
                           np.asarray(segments, np.int32),
                           batch_size=batch_size)


def torch_perplexity(model: Any, segments: np.ndarray, *,
                     batch_size: int) -> float:
  """exp(mean next-token NLL) of `(N, T)` segments with a PyTorch causal LM
  (positions 0..T-1, no padding); log-softmax in float32. Batches whose
  logits would exceed `streams.NLL_CHUNK_ABOVE` elements run a few sequences
  at a time (Gemma 3's 262k vocabulary) [ours]."""
  import torch
  total, count = 0.0, 0
  n, t = segments.shape
  vocab = model.get_output_embeddings().weight.shape[0]
  rows = max(1, min(batch_size, streams.NLL_CHUNK_ABOVE // (t * vocab)))
  with torch.no_grad():
    for lo in range(0, n, rows):
      ids = torch.from_numpy(np.asarray(segments[lo:lo + rows], np.int64))
      logits = model(input_ids=ids).logits[:, :-1].float()
      logp = torch.log_softmax(logits, dim=-1)
      nll = -torch.gather(logp, -1, ids[:, 1:, None])
      total += float(nll.double().sum())
      count += ids.shape[0] * (ids.shape[1] - 1)
  return float(np.exp(total / count))



def load_torch_export(folder: pathlib.Path) -> tuple[Any, list[str]]:
  """The export loaded by `AutoModelForCausalLM` in float32 (eval mode),
  and a problem per kind of tensor the load missed or could not use."""
  import torch
  from transformers import AutoModelForCausalLM

  # (model, info) with output_loading_info; transformers' stub says model.
  loaded: Any = AutoModelForCausalLM.from_pretrained(
      str(folder), **torch_convert.torch_dtype_kwargs(torch.float32),
      use_safetensors=True,
      output_loading_info=True)
  tmodel, info = loaded
  tmodel.eval()
  return tmodel, [f"torch load: {key} {sorted(info[key])[:5]}"
                  for key in ("missing_keys", "unexpected_keys",
                              "mismatched_keys") if info.get(key)]

