"""The dense model, read one decoder layer at a time (bounded memory).

The layer walk (`walk.walk_layers`) never needs the whole model: it embeds
with the embedding table, prunes and advances one decoder layer, and
scores with the final norm and head. A `DenseLayers` gives it exactly
that: `outer` (every parameter outside the decoder layers, on the device
for the whole walk) and `layer(i)` (decoder layer i, put on the device
when the walk reaches it and dropped after). Device memory then holds one
layer's weights, not the model's [ours; the paper's 48 GB runs need it].

Where the weights come from is one function, `read(path) -> float32
array` per parameter:

  from_tree          a whole parameter tree already in host memory (the
                     tiny smoke model, a user's Flax folder);
  from_safetensors   a Flax checkpoint file ('.'-joined paths, our model
                     cache, `bridge.flax_checkpoint.save_flax_dir`), read tensor
                     by tensor with `safetensors.safe_open`: host memory
                     holds one layer too;
  from_random        a paper model's config with seeded random weights
                     (`paper_configs.random_tree`), drawn when read: a
                     random Llama-2-7B walks without 27 GB of weights.

All three give the same arrays as the whole-model load of the same source
(tested), and `sha256()` equals `run_record.params_sha256` of that whole
tree, reading one tensor at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from mosp_jax.models.base import Adapter, Params
from mosp_jax.pipeline import run_record

Path = tuple[str, ...]
Read = Callable[[Path], np.ndarray | jax.Array]


class DenseLayers:
  """A dense model as the walk reads it: `outer` once, `layer(i)` per layer.

  Attributes:
    num_layers: decoder layers of the model.
    outer: every parameter outside the decoder layers (embeddings, final
      norm, untied head), device arrays of `dtype`; `adapter.embed` and
      `adapter.head` take it as their params.
    dtype: dtype of the weights on the device (the stored weights are
      float32; `bfloat16` halves their bytes).
    what: the source, for messages.
  """

  def __init__(self, adapter: Adapter, shapes: Mapping[Path, Any],
               read: Read, *, what: str, dtype: Any = jnp.float32):
    """
    Args:
      adapter: the family adapter (its `layers_path` locates the layers).
      shapes: every parameter's path and `.shape`.
      read: path -> the parameter's float32 values (host array).
      what: the source, for messages.
      dtype: device dtype of the weights.
    """
    self._prefix = tuple(adapter.layers_path)
    self._constants = adapter.layer_constants
    self._shapes = dict(shapes)
    self._read = read
    self.what = what
    self.dtype = jnp.dtype(dtype)
    # The adapter's own check that the layers are '0'..'L-1'.
    self.num_layers = adapter.num_layers(unflatten_dict(self._shapes))
    n = len(self._prefix)
    self.outer: Params = unflatten_dict({
        p: self._put(p) for p in self._shapes if p[:n] != self._prefix})

  @property
  def shapes(self) -> dict[Path, Any]:
    """Every parameter's path and `.shape` (float32 as stored)."""
    return dict(self._shapes)

  def _put(self, path: Path) -> jax.Array:
    x = self._read(path)
    if isinstance(x, np.ndarray):  # Cast on the host: `dtype` bytes move.
      x = np.asarray(x, self.dtype)
    return jnp.asarray(jax.device_put(x), self.dtype)

  def layer(self, i: int) -> Params:
    """Decoder layer i's parameter subtree, device arrays of `dtype`, with
    the adapter's `layer_constants(i)` (device arrays as they are)."""
    if not 0 <= i < self.num_layers:
      raise IndexError(f"{self.what}: no layer {i} of {self.num_layers}")
    prefix = self._prefix + (str(i),)
    n = len(prefix)
    layer = unflatten_dict({p[n:]: self._put(p) for p in self._shapes
                            if p[:n] == prefix})
    return layer | {k: jax.device_put(v)
                    for k, v in self._constants(i).items()}

  def layer_bytes(self) -> int:
    """Device bytes of one decoder layer's weights."""
    prefix = self._prefix + ("0",)
    return sum(int(np.prod(s.shape)) * self.dtype.itemsize
               for p, s in self._shapes.items() if p[:len(prefix)] == prefix)

  def sha256(self) -> str:
    """`run_record.params_sha256` of the whole float32 tree, reading one
    parameter at a time."""
    keys = {jax.tree_util.keystr(tuple(jax.tree_util.DictKey(k)
                                       for k in p)): p
            for p in self._shapes}
    return run_record.leaves_sha256(keys, lambda key: self._read(keys[key]))


def from_tree(adapter: Adapter, params: Params, *, what: str = "params",
              dtype: Any = jnp.float32) -> DenseLayers:
  """A whole parameter tree (host numpy or device arrays), as it is."""
  flat = flatten_dict(params)
  return DenseLayers(adapter, flat, flat.__getitem__, what=what, dtype=dtype)


def from_safetensors(adapter: Adapter, path: str, *,
                     dtype: Any = jnp.float32) -> DenseLayers:
  """A Flax checkpoint file of '.'-joined parameter paths, read one tensor
  at a time (the caller checks `shapes` against the model's)."""
  from safetensors import safe_open

  with safe_open(path, "np") as f:
    shapes = {tuple(k.split(".")): jax.ShapeDtypeStruct(
        tuple(f.get_slice(k).get_shape()), jnp.float32) for k in f.keys()}

  def read(p: Path) -> np.ndarray:
    with safe_open(path, "np") as f:
      return f.get_tensor(".".join(p))

  return DenseLayers(adapter, shapes, read, what=path, dtype=dtype)


def from_random(adapter: Adapter, shapes: Mapping[Path, Any], *, std: float,
                seed: int = 0, what: str = "random",
                dtype: Any = jnp.float32) -> DenseLayers:
  """Seeded random weights of `shapes`, each drawn when read: the same
  values as `paper_configs.random_tree` of the whole tree."""
  from mosp_jax.models import paper_configs

  def read(p: Path) -> np.ndarray:
    # A bare leaf is drawn as itself, keyed by its whole path.
    return cast(np.ndarray, paper_configs.random_tree(
        shapes[p], std=std, seed=seed, prefix="/".join(p)))

  return DenseLayers(adapter, shapes, read, what=what, dtype=dtype)
