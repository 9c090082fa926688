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
def _batch_grams(adapter: Adapter, layer_params: Params, hidden: jax.Array,
                 *, keys: tuple[str, ...]) -> dict[str, jax.Array]:
  _, xs = adapter.apply_block(layer_params, hidden, capture=True)
  out = {}
  for key in keys:
    x = xs[key].astype(jnp.float32)
    x = x.reshape(-1, x.shape[-1])
    out[key] = x.T @ x
  return out


def layer_grams(adapter: Adapter, layer_params: Params,
                stream: Iterable[jax.Array | np.ndarray],
                *, where: str = "") -> dict[str, np.ndarray]:
  """Per-token mean Gram of each linear group's input for one stream.

  Args:
    adapter: the model family adapter (`mosp_jax.models`).
    layer_params: parameters of the decoder layer (dense weights).
    stream: batches `(B, T, d)` of the activations entering the layer, on
      the device or in host memory (an offloaded stream, `walk.keep`,
      visits the device one batch at a time).
    where: a label for error messages (e.g. 'layer 3, task math').

  Returns:
    `{first linear of each group: (n_in, n_in) float32}`; the Gram of a
    group is keyed by its first linear's name.

  Raises:
    NonFiniteError: a Gram has NaN or Inf (names `where` and the group).
    ValueError: `stream` is empty.
  """
  keys = tuple(g[0] for g in adapter.linear_groups())
  acc: dict[str, np.ndarray | None] = dict.fromkeys(keys)
  tokens = 0
  for batch in stream:
    got = jax.device_get(_batch_grams(adapter, layer_params,
                                      jax.device_put(batch), keys=keys))
    for k in keys:
      g = np.asarray(got[k], np.float64)
      prev = acc[k]
      acc[k] = g if prev is None else prev + g
    tokens += batch.shape[0] * batch.shape[1]
  out = {}
  for k in keys:
    total = acc[k]
    if total is None:
      raise ValueError(f"{where}: the stream is empty; no Gram of {k!r}")
    g = total / tokens
    if not np.isfinite(g).all():
      raise NonFiniteError(f"{where}: the Gram of {k!r} has NaN or Inf "
                           "(the activations entering it are not finite)")
    out[k] = g.astype(np.float32)
  return out
