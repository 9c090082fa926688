"""Every command computes float32 matrix products in true float32
(`cli.float32_matmuls`): the solvers, the baselines, the Gram capture and
the model's forwards trace every `dot_general` at `Precision.HIGHEST`,
where JAX's default (TensorFloat32 on recent NVIDIA GPUs) leaves it unset;
a user's `JAX_DEFAULT_MATMUL_PRECISION` wins. On the CPU the two give the
same bits, so the traced programs are the reference, not the numbers."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from mosp_jax import cli
from mosp_jax.baselines import sparsegpt_prune
from mosp_jax.config import SolverConfig
from mosp_jax.models import adapter_for, tiny_llama
from mosp_jax.pipeline import grams as grams_lib
from mosp_jax.pipeline import streams
from mosp_jax.solvers import (
  Unstructured,
  alps_prune,
  mosp_materialize,
  mosp_pareto,
)

from .conftest import task_grams

HIGHEST = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
OPTION = "jax_default_matmul_precision"


def _dot_precisions(jaxpr) -> list:
  """The `precision` of every `dot_general` in `jaxpr` and the programs
  inside it (jit, loops, branches, custom derivatives)."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.append(eqn.params["precision"])
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if hasattr(sub, "eqns"):
          found += _dot_precisions(sub)
        elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
          found += _dot_precisions(sub.jaxpr)
  return found


def _programs() -> dict[str, list]:
  """Per program a command runs, the precisions of its products, traced
  under the current configuration (small shapes: only the programs
  matter)."""
  pattern = Unstructured(0.5)
  rng = np.random.default_rng(0)
  G = jnp.asarray(task_grams(rng, 3, 16))
  W0 = jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)
  par, _ = mosp_pareto(G, W0, pattern=pattern)
  prefs = jnp.full((1, 3), 1 / 3, jnp.float32)
  model, params = tiny_llama(97, hidden_size=32, num_layers=1)
  adapter = adapter_for(model)
  layer = adapter.layer_params(params, 0)
  ids = jnp.zeros((1, 8), jnp.int32)
  hidden = streams.embed(adapter, params, ids)
  keys = tuple(g[0] for g in adapter.linear_groups())
  traced = {
      "alps_prune": jax.make_jaxpr(
          functools.partial(alps_prune, pattern=pattern))(G[0], W0),
      "mosp_pareto": jax.make_jaxpr(
          functools.partial(mosp_pareto, pattern=pattern))(G, W0),
      # The paper's preference models are a weighted sum (no product);
      # the [ours] refit is a PCG on the Grams.
      "mosp_materialize (refit)": jax.make_jaxpr(functools.partial(
          mosp_materialize, pattern=pattern, grams=G, W0=W0,
          cfg=SolverConfig(pref_refit_iters=2)))(par, prefs),
      "sparsegpt_prune": jax.make_jaxpr(
          functools.partial(sparsegpt_prune, pattern=pattern))(G[0], W0),
      "gram capture": jax.make_jaxpr(functools.partial(
          grams_lib.batch_grams, adapter, keys=keys))(layer, hidden),
      "layer forward": jax.make_jaxpr(functools.partial(
          streams.advance, adapter))(layer, hidden),
      "head and loss": jax.make_jaxpr(functools.partial(
          streams.nll, adapter))(params, hidden, ids),
  }
  return {name: _dot_precisions(j.jaxpr) for name, j in traced.items()}


def _command(main) -> None:
  """Runs `main` as a command does (`cli.run`), with no flags."""
  flags.FLAGS.unparse_flags()
  try:
    cli.run(main, ["prog"])
  except SystemExit as e:
    assert e.code in (None, 0), e.code


@pytest.fixture
def saved_precision():
  before = getattr(jax.config, OPTION)
  yield
  jax.config.update(OPTION, before)


def test_commands_trace_every_product_in_float32(saved_precision,
                                                 monkeypatch):
  monkeypatch.delenv(cli.MATMUL_PRECISION_ENV, raising=False)
  jax.config.update(OPTION, None)
  outside = _programs()
  # JAX's default leaves products unset (TF32 on a recent GPU): the check
  # below can fail.
  for name, found in outside.items():
    assert None in found, name
  inside = {}
  _command(lambda argv: inside.update(_programs()))
  assert inside.keys() == outside.keys()
  for name, found in inside.items():
    assert found and set(found) == {HIGHEST}, (name, set(found))


def test_users_matmul_precision_wins(saved_precision, monkeypatch):
  monkeypatch.setenv(cli.MATMUL_PRECISION_ENV, "tensorfloat32")
  jax.config.update(OPTION, "tensorfloat32")  # As JAX read it at import.
  seen = []
  _command(lambda argv: seen.append(getattr(jax.config, OPTION)))
  assert seen == ["tensorfloat32"]
