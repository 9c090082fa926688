"""The one owner per linear against independent references: numpy Grams
and errors, the solvers called directly, the adapter's kernels."""

import dataclasses

import jax
import numpy as np
import pytest

from mosp_jax import baselines
from mosp_jax.config import SolverConfig
from mosp_jax.models import adapter_for, tiny_llama
from mosp_jax.pipeline.linear_problem import LinearProblem, layer_problems
from mosp_jax.solvers import Unstructured, mosp_materialize, mosp_pareto

from .conftest import rel_err, task_grams

PATTERN = Unstructured(0.5)
CFG = SolverConfig(max_iter=20, stage2_max_iter=10)
NO_REFIT = dataclasses.replace(CFG, pref_refit_iters=0)
REFIT = dataclasses.replace(CFG, pref_refit_iters=5)


@pytest.fixture(scope="module")
def prob():
  rng = np.random.default_rng(0)
  G = task_grams(rng, 3, 16)
  W0 = rng.standard_normal((16, 8)).astype(np.float32)
  return LinearProblem("mlp.up_proj", *jax.device_put((W0, G)), PATTERN)


def test_baseline_grams_are_the_protocols(prob):
  G = np.asarray(prob.grams, np.float64)
  W0 = np.asarray(prob.W0, np.float64)
  lam = np.array([0.5, 0.0, 0.5], np.float32)
  with jax.transfer_guard("disallow"):
    concat, mixed = jax.device_get((
        prob.baseline_gram("concat"),
        prob.baseline_gram("mixed", jax.device_put(lam))))
    assert prob.baseline_gram("data-free") is None
  np.testing.assert_allclose(concat, G.mean(axis=0), rtol=1e-5)
  energy = np.einsum("io,mij,jo->m", W0, G, W0)
  np.testing.assert_allclose(mixed, np.tensordot(lam / energy, G, axes=1),
                             rtol=1e-4)
  with pytest.raises(ValueError, match="protocol must be one of"):
    prob.baseline_gram("mixes")
  with pytest.raises(ValueError, match="needs a preference"):
    prob.baseline_gram("mixed")


def test_baseline_is_the_method_on_the_protocols_gram(prob):
  with jax.transfer_guard("disallow"):
    got = prob.baseline("sparsegpt", "concat", CFG)
    want = baselines.prune_single("sparsegpt", prob.baseline_gram("concat"),
                                  prob.W0, pattern=PATTERN, cfg=CFG)
  np.testing.assert_array_equal(jax.device_get(got), jax.device_get(want))
  no_data = dataclasses.replace(prob, grams=None)
  mag = jax.device_get(no_data.baseline("magnitude", "data-free", CFG))
  assert np.count_nonzero(mag) == PATTERN.keep(16, 8)
  with pytest.raises(ValueError, match="mlp.up_proj: this solve needs"):
    no_data.baseline("wanda", "concat", CFG)


@pytest.mark.parametrize("cfg", [NO_REFIT, REFIT], ids=["paper", "refit"])
def test_preference_models_use_the_grams_exactly_under_the_refit(prob,
                                                                 cfg):
  prefs = np.array([[1, 0, 0], [0.2, 0.3, 0.5]], np.float32)
  with jax.transfer_guard("disallow"):
    prefs_dev = jax.device_put(prefs)
    pareto, _ = prob.pareto(cfg)
    W, M = jax.device_get(prob.preference_models(pareto, prefs_dev, cfg))
    direct = mosp_pareto(prob.grams, prob.W0, pattern=PATTERN, cfg=cfg)[0]
    # Passing the Grams always (refit or not) is the solver's own rule.
    want = jax.device_get(mosp_materialize(
        direct, prefs_dev, pattern=PATTERN, cfg=cfg, grams=prob.grams,
        W0=prob.W0))
    np.testing.assert_array_equal(jax.device_get(pareto.W),
                                  jax.device_get(direct.W))
    np.testing.assert_array_equal(W, want[0])
    np.testing.assert_array_equal(M, want[1])
    without = dataclasses.replace(prob, grams=None)
    if cfg.pref_refit_iters > 0:
      with pytest.raises(ValueError, match="needs the task Grams"):
        without.preference_models(pareto, prefs_dev, cfg)
    else:  # The paper's materialisation reads no Gram.
      np.testing.assert_array_equal(jax.device_get(
          without.preference_models(pareto, prefs_dev, cfg)[0]), W)
  assert np.all(M.sum(axis=(1, 2)) == PATTERN.keep(16, 8))


def test_errors_are_the_relative_reconstruction_errors(prob):
  rng = np.random.default_rng(1)
  W = rng.standard_normal((2, 16, 8)).astype(np.float32)
  W[0, :4] = 0.0
  with jax.transfer_guard("disallow"):
    errs, zeros = jax.device_get(prob.errors(jax.device_put(W)))
  G, W0 = np.asarray(prob.grams), np.asarray(prob.W0)
  want = [[rel_err(G[t], W0, W[p]) for t in range(3)] for p in range(2)]
  np.testing.assert_allclose(errs, want, rtol=1e-4)
  np.testing.assert_array_equal(zeros, [32, 0])


def test_layer_problems_read_each_group_once_in_the_adapters_order():
  model, params = tiny_llama(vocab_size=32, seed=0)
  adapter = adapter_for(model)
  lp = adapter.layer_params(params, 1)
  asked = []

  def gram(key):
    asked.append(key)
    return None

  probs = list(layer_problems(adapter, lp, gram, pattern=PATTERN))
  assert [p.name for p in probs] == adapter.linear_names()
  assert asked == [g[0] for g in adapter.linear_groups()]
  for p in probs:
    assert p.W0.dtype == np.float32 and p.grams is None
    np.testing.assert_array_equal(
        jax.device_get(p.W0),
        np.asarray(adapter.get_kernel(params, 1, p.name), np.float32))
