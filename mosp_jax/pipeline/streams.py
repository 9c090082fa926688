"""Streams of batches through a model, one decoder layer at a time.

A *stream* is a list of device batches of token segments (`(B, T)` ids or
`(B, T, d)` hidden states). Every model in the repository is evaluated
through these functions (docs/METHOD_NOTES.md #whole-model): segments are
cut into batches, embedded, advanced one decoder layer at a time and scored
by the head, so no model is ever held whole, and the pruning walk
(`walk.py`), the baselines, the layer-level comparison and the export's
parity check (`bridge/perplexity.py`) see identical inputs and numerics.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mosp_jax.models.base import Adapter, Params
from mosp_jax.pipeline.grams import NonFiniteError

# A stream: the batches (B, T) of ids or (B, T, d) states of some
# segments, on the device, or in host memory when offloaded (`keep`).
# (Not `data.Stream`, a tokenised document stream.)
BatchStream = list[jax.Array | np.ndarray]


# Model functions, compiled once per adapter and batch shape.


@functools.partial(jax.jit, static_argnames=("adapter",))
def embed(adapter: Adapter, params: Params, ids: jax.Array) -> jax.Array:
  """Token ids `(B, T)` int32 -> hidden states `(B, T, d)`."""
  return adapter.embed(params, ids)


@functools.partial(jax.jit, static_argnames=("adapter",))
def advance(adapter: Adapter, layer_params: Params,
            hidden: jax.Array) -> jax.Array:
  """Hidden states `(B, T, d)` through one decoder layer."""
  return adapter.apply_block(layer_params, hidden)[0]


# `nll` builds a batch's logits whole up to this many elements (1 GiB of
# float32: SmolLM2 at 8 x 512 and Llama-2 at 4 x 2048 stay below it, so
# their numbers are bitwise those of the unchunked code); above it (Gemma
# 3's 262k vocabulary: 4.3 GB at 8 x 512) it scores chunks of tokens of
# `NLL_CHUNK_ELEMENTS` logits each, so peak memory no longer grows with the
# batch [ours].
NLL_CHUNK_ABOVE = 1 << 28
NLL_CHUNK_ELEMENTS = 1 << 26


def vocab_size(adapter: Adapter, params: Params, d: int) -> int:
  """The head's output width, from its shapes alone."""
  probe = jax.ShapeDtypeStruct((1, 1, d), jnp.float32)
  return int(jax.eval_shape(adapter.head, params, probe).shape[-1])


@functools.partial(jax.jit, static_argnames=("adapter",))
def nll(adapter: Adapter, params: Params, hidden: jax.Array,
        ids: jax.Array) -> jax.Array:
  """Summed next-token negative log-likelihood (nats, float32 scalar) of
  `(B, T)` segments from their last-layer states `(B, T, d)`; in chunks
  of tokens (`nll_chunked`) when the logits would exceed
  `NLL_CHUNK_ABOVE` elements."""
  b, t, d = hidden.shape
  v = vocab_size(adapter, params, d)
  if b * (t - 1) * v > NLL_CHUNK_ABOVE:
    return nll_chunked(adapter, params, hidden, ids,
                       chunk=max(1, NLL_CHUNK_ELEMENTS // v))
  logits = adapter.head(params, hidden).astype(jnp.float32)[:, :-1]
  logp = jax.nn.log_softmax(logits, axis=-1)
  tgt = ids[:, 1:, None]
  return -jnp.sum(jnp.take_along_axis(logp, tgt, axis=-1))


@functools.partial(jax.jit, static_argnames=("adapter", "chunk"))
def nll_chunked(adapter: Adapter, params: Params, hidden: jax.Array,
                ids: jax.Array, *, chunk: int) -> jax.Array:
  """`nll` with the logits of `chunk` tokens at a time: the `B (T - 1)`
  scored positions are flattened, padded to a multiple of `chunk` and
  scored one chunk after another (`lax.map`) as `logsumexp - logit of the
  target`, in float32; the same value as `nll` up to float32 summation
  order."""
  b, t, d = hidden.shape
  n = b * (t - 1)
  pad = -n % chunk
  x = jnp.pad(hidden[:, :-1].reshape(n, d), ((0, pad), (0, 0)))
  tgt = jnp.pad(ids[:, 1:].reshape(n), (0, pad))
  valid = jnp.arange(n + pad) < n

  def score(args: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
    xc, tc, ok = args
    logits = adapter.head(params, xc[None]).astype(jnp.float32)[0]
    picked = jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
    nlls = jax.nn.logsumexp(logits, axis=-1) - picked
    return jnp.sum(jnp.where(ok, nlls, 0.0))

  k = (n + pad) // chunk
  return jnp.sum(jax.lax.map(score, (x.reshape(k, chunk, d),
                                     tgt.reshape(k, chunk),
                                     valid.reshape(k, chunk))))


# Streams.


def device_batches(ids: np.ndarray, batch_size: int) -> BatchStream:
  """Host `(N, T)` -> device batches; a stream is a list of these (no
  device-side slicing, so nothing moves implicitly)."""
  return [jax.device_put(ids[lo:lo + batch_size])
          for lo in range(0, ids.shape[0], batch_size)]


def embed_stream(adapter: Adapter, params: Params, ids: np.ndarray,
                 batch_size: int) -> BatchStream:
  """Host segments `(N, T)` -> the stream of their embeddings."""
  return [embed(adapter, params, b)
          for b in device_batches(np.asarray(ids), batch_size)]


def advance_stream(adapter: Adapter, layer_params: Params,
                   stream: BatchStream, *,
                   offload: bool = False) -> BatchStream:
  """Every batch of `stream` through one decoder layer; with `offload` the
  batches live in host memory and visit the device one at a time."""
  return [keep(advance(adapter, layer_params, jax.device_put(h)), offload)
          for h in stream]


def keep(batch: jax.Array, offload: bool) -> jax.Array | np.ndarray:
  """Where a stream keeps a batch between layers: on the device, or (with
  `offload`, the walk's `--offload_streams` [ours]) in host memory."""
  return np.asarray(jax.device_get(batch)) if offload else batch


def dense_stream(adapter: Adapter, params: Params, ids: np.ndarray, *,
                 batch_size: int, layers: int | None = None) -> BatchStream:
  """The dense model's states entering layer `layers` (default: after the
  last layer) for host segments `(N, T)`."""
  stream = embed_stream(adapter, params, ids, batch_size)
  stop = adapter.num_layers(params) if layers is None else layers
  for layer in range(stop):
    stream = advance_stream(adapter, adapter.layer_params(params, layer),
                            stream)
  return stream


def stream_ppl(adapter: Adapter, params: Params, stream: BatchStream,
               ids: BatchStream) -> float:
  """Perplexity of hidden states after the last layer `(B, T, d)` batches
  against their token batches `(B, T)`: exp of the mean next-token NLL,
  summed per batch on the host in float64."""
  total = sum(float(jax.device_get(nll(adapter, params, jax.device_put(h),
                                       i)))
              for h, i in zip(stream, ids, strict=True))
  count = sum(i.shape[0] * (i.shape[1] - 1) for i in ids)
  return float(np.exp(total / count))


def perplexity(adapter: Adapter, params: Params, segments: np.ndarray, *,
               batch_size: int) -> float:
  """Perplexity of the dense `params` on host segments `(N, T)` int32,
  layer by layer exactly as a walk evaluates its dense model."""
  ids = device_batches(np.asarray(segments), batch_size)
  return stream_ppl(adapter, params, dense_stream(
      adapter, params, segments, batch_size=batch_size), ids)


def check_finite(x: jax.Array | np.ndarray, where: str) -> None:
  """Raises `NonFiniteError` naming `where` when `x` has NaN or Inf."""
  finite = (np.isfinite(x).all() if isinstance(x, np.ndarray)  # offloaded
            else jax.device_get(jnp.all(jnp.isfinite(x))))
  if not bool(finite):
    raise NonFiniteError(f"{where}: NaN or Inf")
