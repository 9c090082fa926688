"""Layer-input Grams, accumulated over streamed batches of activations.

For a decoder layer and one task's activation stream `(N, T, d)`, the input
of every linear is captured by the adapter (Flax method interception) batch
by batch, and `X^T X` is summed per group of linears that share an input
(q/k/v; gate/up). Each batch's product is formed in float32 on the device
and summed on the host in float64, so long streams do not lose precision;
the result is divided by the token count (a per-token mean,
docs/METHOD_NOTES.md).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from mosp_jax.models.base import Adapter, Params


class NonFiniteError(FloatingPointError):
  """NaN or Inf in activations, Grams or weights; names the place."""


@functools.partial(jax.jit, static_argnames=("adapter", "keys"))
def batch_grams(adapter: Adapter, layer_params: Params, hidden: jax.Array,
                *, keys: tuple[str, ...]) -> dict[str, jax.Array]:
  """Unnormalised float32 Grams `X^T X` `(n_in, n_in)` of one batch
  `hidden (B, T, d)`, for the input of each linear group in `keys`."""
  _, xs = adapter.apply_block(layer_params, hidden, capture=True)
  out = {}
  for key in keys:
    x = xs[key].astype(jnp.float32)
    x = x.reshape(-1, x.shape[-1])
    out[key] = x.T @ x
  return out


def layer_grams(adapter: Adapter, layer_params: Params,
                stream: Iterable[jax.Array | np.ndarray],
                *, where: str = "",
                sums: dict[str, np.ndarray] | None = None
                ) -> dict[str, np.ndarray]:
  """Per-token mean Gram of each linear group's input for one stream.

  Args:
    adapter: the model family adapter (`mosp_jax.models`).
    layer_params: parameters of the decoder layer (dense weights).
    stream: batches `(B, T, d)` of the activations entering the layer, on
      the device or in host memory (an offloaded stream, `streams.keep`,
      visits the device one batch at a time).
    where: a label for error messages (e.g. 'layer 3, task math').
    sums: the float64 accumulators, by group, kept by the caller across
      calls and overwritten by each (the layer walk keeps one for the
      whole walk; `accumulate` says why); None: fresh ones.

  Returns:
    `{first linear of each group: (n_in, n_in) float32}`; the Gram of a
    group is keyed by its first linear's name.

  Raises:
    NonFiniteError: a Gram has NaN or Inf (names `where` and the group).
    ValueError: `stream` is empty.
  """
  keys = tuple(g[0] for g in adapter.linear_groups())
  sums = {} if sums is None else sums
  tokens = 0
  for batch in stream:
    got = jax.device_get(batch_grams(adapter, layer_params,
                                      jax.device_put(batch), keys=keys))
    for k in keys:
      sums[k] = accumulate(sums.get(k), got[k], first=tokens == 0)
    tokens += batch.shape[0] * batch.shape[1]
  if tokens == 0:
    raise ValueError(f"{where}: the stream is empty; no Gram of "
                     f"{', '.join(map(repr, keys))}")
  out = {}
  for k in keys:
    out[k] = finish(sums[k], tokens)
    if not np.isfinite(out[k]).all():
      raise NonFiniteError(f"{where}: the Gram of {k!r} has NaN or Inf "
                           "(the activations entering it are not finite)")
  return out


def accumulate(acc: np.ndarray | None, gram: np.ndarray, *,
               first: bool = False) -> np.ndarray:
  """`acc + gram` in float64, in place: `acc` (float64; None: a new one)
  and `gram` (float32, one batch's `X^T X`) of one shape; `first`
  overwrites `acc` with `gram`. Returns the accumulator.

  In place and reused [ours] because a paper-scale Gram is large
  (Llama-2-7B's `down_proj` input: 11008^2, 0.90 GiB in float64) and
  fresh memory is slow: numpy asks for transparent huge pages on large
  arrays, and a kernel that compacts memory to find them stalls on the
  first touch (6.1 s for that array on the 2-core CPU, then 0.13 s
  reused; 0.5 s with 4 KiB pages). One 7B task's capture (2 batches of
  4 x 512 tokens; 16 s of it on the device) took 44-47 s with a fresh
  float64 copy and a fresh sum per batch, 26-30 s summed in place, and
  22-23 s with the walk's accumulators kept across tasks and layers
  (`sums` of `layer_grams`). The sums are bit-identical.
  """
  if acc is None or (first and acc.shape != gram.shape):
    return np.array(gram, np.float64)
  if acc.shape != gram.shape:
    raise ValueError(f"a Gram of shape {gram.shape} cannot be added to a "
                     f"sum of shape {acc.shape}")
  if first:
    np.copyto(acc, gram)
  else:
    np.add(acc, gram, out=acc)  # Casts `gram` to float64 as it goes.
  return acc


def finish(acc: np.ndarray, tokens: int) -> np.ndarray:
  """The per-token mean Gram: `acc / tokens` in float64 (in place:
  `acc` is consumed), then float32."""
  np.divide(acc, tokens, out=acc)
  return acc.astype(np.float32)
