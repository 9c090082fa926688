"""What the plan needs of a model, from its config alone.

`shapes_from_config` reads a HF config through `jax.eval_shape` of a
one-layer copy (no weight is allocated) and the family adapter, so the
plan counts exactly the linears and groups the walk prunes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax

from mosp_jax.config import RunConfig, SolverConfig
from mosp_jax.solvers import projection


@dataclasses.dataclass(frozen=True)
class Linear:
  """One linear of a decoder layer: `n` inputs, `o` outputs."""
  name: str
  n: int
  o: int


@dataclasses.dataclass(frozen=True)
class ModelShapes:
  """What the plan needs of a model, from its config.

  Attributes:
    layers: decoder layers `L`.
    hidden: hidden size `d`.
    heads, head_dim: attention heads and their width (the score
      matrices are `(B, heads, T, T)`).
    params_outside: parameters outside the decoder layers (embeddings,
      final norm, head).
    params_per_layer: parameters of one decoder layer.
    linears: the prunable linears of one decoder layer.
    groups: per group of linears sharing an input, its input width `n_g`.
  """
  layers: int
  hidden: int
  heads: int
  head_dim: int
  params_outside: int
  params_per_layer: int
  linears: tuple[Linear, ...]
  groups: tuple[int, ...]
  vocab: int


def one_layer_model(config: Any) -> tuple[Any, Any]:
  """`(uninitialised Flax model, adapter)` of a one-layer copy of a HF
  config."""
  from mosp_jax import models
  fields = config.to_dict() | {"num_hidden_layers": 1}
  if fields.get("layer_types"):  # Per-layer kinds (Gemma 3): the first.
    fields["layer_types"] = fields["layer_types"][:1]
  one = config.__class__(**fields)
  model = models.model_class(one)(one, _do_init=False)
  return model, models.adapter_for(model)


def shapes_from_config(config: Any) -> ModelShapes:
  """`ModelShapes` of a HF config, from `jax.eval_shape` of a one-layer
  copy (no weight is allocated) and the family adapter (its linears and
  groups), so the plan counts exactly what the walk prunes."""
  model, adapter = one_layer_model(config)
  tree = model.params_shape_tree

  def count(t: Any) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(t))

  per_layer = count(adapter.layer_params(tree, 0))
  linears = tuple(
      Linear(name, *jax.eval_shape(functools.partial(
          adapter.get_kernel, i=0, name=name), tree).shape)
      for name in adapter.linear_names())
  width = {lin.name: lin.n for lin in linears}
  heads = int(config.num_attention_heads)
  hidden = int(config.hidden_size)
  return ModelShapes(
      layers=int(config.num_hidden_layers), hidden=hidden, heads=heads,
      head_dim=int(getattr(config, "head_dim", None) or hidden // heads),
      params_outside=count(tree) - per_layer, params_per_layer=per_layer,
      linears=linears,
      groups=tuple(width[g[0]] for g in adapter.linear_groups()),
      vocab=int(config.vocab_size))


def stage1_channels(run: RunConfig, solver: SolverConfig, lin: Linear
                    ) -> int:
  """Stage 1's channels `c`: 2 when it carries a core strictly inside the
  budget (`alps.admm_support`; `core_rule='dual'`), else 1."""
  core = projection.core_count(run.pattern, lin.n, lin.o, solver.alpha)
  inside = 0 < core < run.pattern.unit_keep(lin.n, lin.o)
  return 2 if inside and solver.core_rule == "dual" else 1
