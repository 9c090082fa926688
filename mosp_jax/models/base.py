"""The adapter protocol: a HF Flax causal LM, one decoder layer at a time.

The pruning pipeline walks a model layer by layer (docs/METHOD_NOTES.md,
"Whole model") and
needs only this:

  h = adapter.embed(params, input_ids)                 # (B, T, d)
  for i in range(adapter.num_layers(params)):
    h, xs = adapter.apply_layer(params, i, h, capture=True)
    # xs['self_attn.q_proj']: (B, T, n_in), the input of that linear
  logits = adapter.head(params, h)                     # (B, T, V)

Conventions shared by every family:

- Sequences are causal, unpadded, of one length T per batch, at positions
  0..T-1 (calibration and test segments are cut to a fixed length). The
  attention mask and position ids are therefore derived from `hidden.shape`
  and are not threaded through the walk.
- A linear's name is its module path inside the decoder layer, dot-joined
  (`'self_attn.q_proj'`, `'mlp.down_proj'`, GPT-2's fused `'attn.c_attn'`).
- Kernels are exchanged in the Flax `Dense` layout `(n_in, n_out)`, so
  `y = x @ W (+ b)`; an adapter whose family stores another layout (GPT-2's
  `FlaxConv1D` keeps `(n_out, n_in)`) transposes in `get_kernel` /
  `set_kernel`.
- Layers run through the HF Flax modules themselves (no re-implemented layer
  math). Inputs of linears are captured with `flax.linen.intercept_methods`
  on the linear modules' `__call__`.
- A family whose layers differ in kind but not in parameters (Gemma 3's
  local and global attention) declares the kind as data:
  `layer_constants(i)`, small arrays that `layer_params` and
  `layer_source.DenseLayers.layer` add to layer i's subtree and that
  `apply_block` passes to the layer module after the hidden states [ours].
- Everything is a pure function of `params`; nothing is jitted here. Jit
  `apply_block` once (`jax.jit(adapter.apply_block,
  static_argnames='capture')`): all layers share its shapes, so it compiles
  once for the whole model, unlike `apply_layer` with a static `i`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Protocol, cast, runtime_checkable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Params = Mapping[str, Any]


@runtime_checkable
class Adapter(Protocol):
  """What the pruning pipeline may call on a model family."""

  family: ClassVar[str]
  # Path of the dict holding layers '0', '1', ... in the params tree.
  layers_path: ClassVar[tuple[str, ...]]

  @property
  def config(self) -> Any:
    """The HF config of the model."""

  @property
  def dtype(self) -> Any:
    """The computation dtype of the Flax modules."""

  def with_dtype(self, dtype: Any) -> Adapter:
    """The same adapter computing in `dtype`."""

  def num_layers(self, params: Params) -> int:
    """Number of decoder layers in `params`."""

  def linear_groups(self) -> list[list[str]]:
    """Linears of one layer grouped by shared input (one Gram per group)."""

  def linear_names(self) -> list[str]:
    """All linears of one layer, in `linear_groups` order."""

  def embed(self, params: Params, input_ids: jax.Array) -> jax.Array:
    """input_ids: (B, T) int -> hidden (B, T, d) entering layer 0."""

  def layer_params(self, params: Params, i: int) -> Params:
    """The parameter subtree of decoder layer i (with its
    `layer_constants`)."""

  def layer_constants(self, i: int) -> dict[str, Any]:
    """Per-layer inputs of `apply_block` that are not weights (Gemma 3's
    attention kind), keyed beside the layer's modules; {} for most."""

  def apply_block(
      self, layer_params: Params, hidden: jax.Array, *, capture: bool = False
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Runs one decoder layer given its own parameters; see `apply_layer`."""

  def apply_layer(
      self, params: Params, i: int, hidden: jax.Array, *, capture: bool = False
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """hidden (B, T, d) -> (hidden_out (B, T, d), {linear: (B, T, n_in)})."""

  def get_kernel(self, params: Params, i: int, name: str) -> jax.Array:
    """Kernel of linear `name` in layer i, as (n_in, n_out)."""

  def set_kernel(
      self, params: Params, i: int, name: str, w: jax.Array | np.ndarray
  ) -> Params:
    """New params with linear `name` of layer i replaced by w (n_in, n_out)."""

  def get_layer_kernel(self, layer_params: Params, name: str) -> jax.Array:
    """Kernel of linear `name` in one layer's subtree, as (n_in, n_out)."""

  def set_layer_kernel(self, layer_params: Params, name: str,
                       w: jax.Array | np.ndarray) -> Params:
    """A new layer subtree with linear `name` replaced by w (n_in, n_out)."""

  def head(self, params: Params, hidden: jax.Array) -> jax.Array:
    """hidden (B, T, d) after the last layer -> logits (B, T, V)."""


def tree_get(tree: Params, path: Sequence[str]) -> Any:
  """tree[path[0]][path[1]]...; a KeyError names the missing step."""
  node = tree
  for depth, key in enumerate(path):
    if not isinstance(node, Mapping) or key not in node:
      have = sorted(node) if isinstance(node, Mapping) else type(node).__name__
      raise KeyError(
          f"no {'/'.join(path[:depth + 1])!r} in params; "
          f"{'/'.join(path[:depth]) or '<root>'} holds {have}")
    node = node[key]
  return node


def tree_set(tree: Params, path: Sequence[str], value: Any) -> dict:
  """A new tree equal to `tree` but with `value` at `path` (must exist).

  Only the dicts along `path` are copied; every other leaf is shared.
  """
  tree_get(tree, path)  # Raises a readable KeyError if the path is missing.
  new = dict(tree)
  if len(path) == 1:
    new[path[0]] = value
  else:
    new[path[0]] = tree_set(tree[path[0]], path[1:], value)
  return new


@dataclasses.dataclass(frozen=True, eq=False)
class BaseAdapter:
  """Shared mechanics; a family fills in the class variables and hooks.

  Attributes:
    config: the HF config of the model.
    dtype: the computation dtype of the Flax modules (parameters keep
      their own dtype).
  """

  config: Any
  dtype: jnp.dtype = jnp.float32

  family: ClassVar[str] = ""
  # Path of the dict holding layers '0', '1', ... in the params tree.
  layers_path: ClassVar[tuple[str, ...]] = ()
  groups: ClassVar[tuple[tuple[str, ...], ...]] = ()
  # Module classes whose __call__ is a linear to capture.
  linear_types: ClassVar[tuple[type[nn.Module], ...]] = (nn.Dense,)
  # True where the family stores kernels as (n_out, n_in).
  kernel_is_out_in: ClassVar[bool] = False

  def __post_init__(self) -> None:
    self._check_config()

  # Hooks for a family.

  def _check_config(self) -> None:
    """Raises for a config variant the family's Flax modules do not run."""

  def _model_module(self) -> nn.Module:
    """The whole-model Flax module (used for `embed` and `head`)."""
    raise NotImplementedError

  def _block_module(self) -> nn.Module:
    """A standalone Flax module of one decoder layer."""
    raise NotImplementedError

  def _block_args(self, hidden: jax.Array) -> tuple:
    """Positional arguments of the layer module's __call__ after hidden."""
    raise NotImplementedError

  @staticmethod
  def _embed(module: nn.Module, input_ids: jax.Array) -> jax.Array:
    raise NotImplementedError

  @staticmethod
  def _head(module: nn.Module, hidden: jax.Array) -> jax.Array:
    raise NotImplementedError

  # The protocol.

  def with_dtype(self, dtype: Any) -> Adapter:
    return dataclasses.replace(self, dtype=dtype)

  def num_layers(self, params: Params) -> int:
    layers = tree_get(params, self.layers_path)
    n = len(layers)
    if sorted(layers) != sorted(str(i) for i in range(n)):
      raise ValueError(
          f"{'/'.join(self.layers_path)} should hold layers '0'..'{n - 1}', "
          f"found {sorted(layers)}")
    return n

  def linear_groups(self) -> list[list[str]]:
    return [list(g) for g in self.groups]

  def linear_names(self) -> list[str]:
    return [name for g in self.groups for name in g]

  def embed(self, params: Params, input_ids: jax.Array) -> jax.Array:
    ids = jnp.asarray(input_ids, jnp.int32)
    # `apply` without `mutable` returns the output alone.
    return cast(jax.Array, self._model_module().apply(
        {"params": params}, ids, method=type(self)._embed))

  def layer_params(self, params: Params, i: int) -> Params:
    layer = tree_get(params, self.layers_path + (str(i),))
    constants = self.layer_constants(i)
    if not constants:
      return layer
    return {**layer, **{k: jax.device_put(v) for k, v in constants.items()}}

  def layer_constants(self, i: int) -> dict[str, Any]:
    return {}

  def apply_block(
      self, layer_params: Params, hidden: jax.Array, *, capture: bool = False
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Runs one decoder layer given its own parameter subtree.

    Args:
      layer_params: `layer_params(params, i)`.
      hidden: (B, T, d) input of the layer.
      capture: also return the input of every linear of the layer.

    Returns:
      (hidden_out (B, T, d), captured), captured mapping each name of
      `linear_names()` to its input (B, T, n_in), in the computation dtype;
      empty when `capture` is False.
    """
    block = self._block_module()
    names = self.layer_constants(0)
    missing = [k for k in names if k not in layer_params]
    if missing:
      raise KeyError(
          f"{self.family}: the layer subtree lacks {missing}; take it from "
          "adapter.layer_params(params, i)")
    variables = {"params": {k: v for k, v in layer_params.items()
                            if k not in names}}
    args = ((hidden,) + self._block_args(hidden)
            + tuple(layer_params[k] for k in names))
    if not capture:
      return block.apply(variables, *args)[0], {}
    captured: dict[str, jax.Array] = {}
    lead = hidden.shape[:-1]

    def interceptor(next_fun: Callable[..., Any], call_args: Sequence[Any],
                    call_kwargs: Mapping[str, Any], context: Any) -> Any:
      module = context.module
      if (context.method_name == "__call__"
          and isinstance(module, self.linear_types)):
        name = ".".join(module.path)
        if name in captured:
          raise RuntimeError(f"linear {name!r} was called twice in one layer")
        x = call_args[0]
        # OPT flattens (B, T) before its MLP; restore the token axes.
        captured[name] = x.reshape(lead + x.shape[-1:])
      return next_fun(*call_args, **call_kwargs)

    with nn.intercept_methods(interceptor):
      out = block.apply(variables, *args)[0]
    if sorted(captured) != sorted(self.linear_names()):
      raise RuntimeError(
          f"{self.family}: captured linears {sorted(captured)} differ from "
          f"the declared {sorted(self.linear_names())}")
    return out, captured

  def apply_layer(
      self, params: Params, i: int, hidden: jax.Array, *, capture: bool = False
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Runs decoder layer i; see `apply_block` for shapes."""
    return self.apply_block(
        self.layer_params(params, i), hidden, capture=capture)

  def _kernel_path(self, name: str) -> tuple[str, ...]:
    """Path of linear `name`'s kernel inside one layer's subtree."""
    if name not in self.linear_names():
      raise KeyError(
          f"{self.family} has no linear {name!r}; its linears are "
          f"{self.linear_names()}")
    return tuple(name.split(".")) + ("kernel",)

  def get_layer_kernel(self, layer_params: Params, name: str) -> jax.Array:
    k = tree_get(layer_params, self._kernel_path(name))
    return k.T if self.kernel_is_out_in else k

  def set_layer_kernel(self, layer_params: Params, name: str,
                       w: jax.Array | np.ndarray) -> Params:
    """A new layer subtree with one kernel replaced; cast to the stored
    dtype. `w`: (n_in, n_out)."""
    path = self._kernel_path(name)
    old = tree_get(layer_params, path)
    want = old.shape[::-1] if self.kernel_is_out_in else old.shape
    if tuple(w.shape) != tuple(want):
      raise ValueError(
          f"{name}: kernel must be (n_in, n_out) = {tuple(want)}, "
          f"got {tuple(w.shape)}")
    w = jnp.asarray(w, old.dtype)
    return tree_set(layer_params, path, w.T if self.kernel_is_out_in else w)

  def get_kernel(self, params: Params, i: int, name: str) -> jax.Array:
    return self.get_layer_kernel(self.layer_params(params, i), name)

  def set_kernel(
      self, params: Params, i: int, name: str, w: jax.Array | np.ndarray
  ) -> Params:
    """New params with one kernel replaced (`set_layer_kernel` on layer
    i's subtree; every other leaf is shared)."""
    where = self.layers_path + (str(i),)
    try:
      layer = self.set_layer_kernel(tree_get(params, where), name, w)
    except ValueError as e:
      raise ValueError(f"layer {i} {e}") from None
    return tree_set(params, where, layer)

  def head(self, params: Params, hidden: jax.Array) -> jax.Array:
    return cast(jax.Array, self._model_module().apply(
        {"params": params}, hidden, method=type(self)._head))

  # Shared helpers for families.

  @staticmethod
  def positions(hidden: jax.Array) -> jax.Array:
    """(B, T) int32 positions 0..T-1."""
    b, t = hidden.shape[:2]
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))

  @staticmethod
  def full_mask(hidden: jax.Array) -> jax.Array:
    """(B, T) int32 attention mask of ones (no padding)."""
    return jnp.ones(hidden.shape[:2], jnp.int32)
