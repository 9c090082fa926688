"""MOSP on one layer: invariants, vertices, vmap == loop, degenerate input."""

import dataclasses

import jax
import numpy as np
import pytest

from mosp_jax.config import SolverConfig
from mosp_jax.solvers import NM, Unstructured, masked_pcg, mosp_prune
from mosp_jax.solvers import mosp as mosp_lib
from mosp_jax.solvers.admm import eig
from mosp_jax.solvers.scaling import scale_problem

from .conftest import guarded, rel_err, task_grams

CFG = SolverConfig()
PREFS = np.array([[1 / 3, 1 / 3, 1 / 3], [0.5, 0.25, 0.25],
                  [0.0, 0.5, 0.5]], np.float32)


def run(grams, W0, prefs, pattern, cfg=CFG):
  return guarded(lambda g, w, p: mosp_prune(g, w, p, pattern=pattern,
                                            cfg=cfg), grams, W0, prefs,
                 jit=False)


@pytest.fixture(scope="module")
def layer():
  rng = np.random.default_rng(7)
  grams = task_grams(rng, 3, 48)
  W0 = rng.standard_normal((48, 40)).astype(np.float32)
  return grams, W0


@pytest.mark.parametrize("pattern", [Unstructured(0.5), Unstructured(0.7),
                                     NM(2, 4)])
def test_exact_counts_and_core(layer, pattern):
  grams, W0 = layer
  r = run(grams, W0, PREFS, pattern)
  k = pattern.keep(*W0.shape)
  P = r.masks.shape[0]
  assert P == 3 + len(PREFS)
  np.testing.assert_array_equal(r.masks.sum((1, 2)), k)
  assert not (r.weights * ~r.masks).any()
  assert (r.masks & r.pareto.core[None]).sum() == P * r.pareto.core.sum()
  if isinstance(pattern, NM):
    np.testing.assert_array_equal(
        r.pareto.core.reshape(12, 4, 40).sum(1), 1)  # floor(0.5 * 2)
    np.testing.assert_array_equal(r.masks.reshape(P, 12, 4, 40).sum(2), 2)
  else:
    assert r.pareto.core.sum() == int(np.floor(0.5 * k))
  assert np.isfinite(r.weights).all()


def test_front_is_a_trade_off(layer):
  grams, W0 = layer
  r = run(grams, W0, PREFS, Unstructured(0.6))
  err = np.array([[rel_err(grams[i], W0, w) for i in range(3)]
                  for w in r.weights])
  # Vertex i is the best model on task i; the balanced one is never the
  # worst on any task.
  for i in range(3):
    assert np.argmin(err[:, i]) == i
    assert err[3, i] < err[:3, i].max()


def test_vertices_equal_independent_task_models(layer):
  """At lam = e_i the model is PCG on G_i over S0 | S_i from D_i."""
  grams, W0 = layer
  pattern = Unstructured(0.6)
  r = run(grams, W0, np.zeros((0, 3), np.float32), pattern)

  def task_models(g, w):
    sc = scale_problem(g, w, damping=CFG.damping)
    Q, L = eig(sc.G)
    core, it1, _ = mosp_lib.stage1(
        sc, Q, L, pattern=pattern, alpha=CFG.alpha, p=CFG.p,
        rho0=CFG.rho0, update_every=CFG.update_every,
        max_iter=CFG.max_iter)
    it2, _ = mosp_lib.stage2(sc, Q, L, core, it1, pattern=pattern,
                             alpha=CFG.alpha, rho=CFG.stage2_rho,
                             adaptive=CFG.stage2_adaptive,
                             update_every=CFG.update_every,
                             max_iter=CFG.stage2_max_iter)
    out = [masked_pcg(sc.G[i], sc.B0, it2.mask[i], it2.D[i],
                      iters=CFG.pcg_iters)[0] / sc.d[:, None]
           for i in range(g.shape[0])]
    return it2.mask, out

  masks, models = guarded(task_models, grams, W0)
  for i in range(3):
    np.testing.assert_array_equal(r.masks[i], masks[i])
    np.testing.assert_allclose(r.weights[i], models[i], rtol=1e-4,
                               atol=1e-5 * np.abs(models[i]).max())


def test_vmap_over_tasks_and_prefs_equals_loop(layer):
  grams, W0 = layer
  pattern = Unstructured(0.6)

  def stages(g, w, prefs, loop):
    sc = scale_problem(g, w, damping=CFG.damping)
    Q, L = eig(sc.G)
    core, it1, _ = mosp_lib.stage1(
        sc, Q, L, pattern=pattern, alpha=CFG.alpha, p=CFG.p,
        rho0=CFG.rho0, update_every=CFG.update_every,
        max_iter=CFG.max_iter)
    kw = dict(pattern=pattern, alpha=CFG.alpha, rho=CFG.stage2_rho,
              adaptive=CFG.stage2_adaptive, update_every=CFG.update_every,
              max_iter=CFG.stage2_max_iter)
    if not loop:
      it2, _ = mosp_lib.stage2(sc, Q, L, core, it1, **kw)
      X, masks, _ = mosp_lib.assemble(sc, core, it2.D, prefs,
                                      pattern=pattern, alpha=CFG.alpha,
                                      pcg_iters=CFG.pcg_iters)
      return it2.D, X, masks
    Ds = []
    for i in range(g.shape[0]):
      sub = sc._replace(G=sc.G[i:i + 1], energy=sc.energy[i:i + 1])
      one = jax.tree.map(lambda a, i=i: a[i:i + 1], it1)
      it2, _ = mosp_lib.stage2(sub, Q[i:i + 1], L[i:i + 1], core, one, **kw)
      Ds.append(it2.D[0])
    D = jax.numpy.stack(Ds)
    outs = [mosp_lib.assemble(sc, core, D, prefs[j:j + 1], pattern=pattern,
                              alpha=CFG.alpha, pcg_iters=CFG.pcg_iters)
            for j in range(prefs.shape[0])]
    return (D, jax.numpy.concatenate([o[0] for o in outs]),
            jax.numpy.concatenate([o[1] for o in outs]))

  batched = guarded(lambda *a: stages(*a, loop=False), grams, W0, PREFS)
  looped = guarded(lambda *a: stages(*a, loop=True), grams, W0, PREFS)
  # Only the float32 summation order differs.
  for a, b in zip(batched[:2], looped[:2], strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())
  np.testing.assert_array_equal(batched[2], looped[2])


def _f_lam(grams, W0, weights, prefs):
  """Independent numpy `(P,)` preference objective on the damped Grams
  (the objective the solvers minimise)."""
  damped = [g + CFG.damping * np.mean(np.diag(g)) * np.eye(len(g))
            for g in np.asarray(grams, np.float64)]
  err = np.array([[rel_err(g, W0, w) for g in damped] for w in weights])
  return np.sum(prefs * err, axis=1)


@pytest.mark.parametrize("pattern", [Unstructured(0.6), NM(2, 4)])
@pytest.mark.parametrize("refine", [{"pref_swap_rounds": 3},
                                    {"pref_admm_iters": 10}])
def test_preference_refinement(layer, pattern, refine):
  """[ours] Re-choosing each preference's support outside the core keeps
  the invariants and lowers F_lam; swaps keep the best model seen, so no
  preference ever gets worse than the paper's assembly."""
  grams, W0 = layer
  paper = run(grams, W0, PREFS, pattern)
  r = run(grams, W0, PREFS, pattern, dataclasses.replace(CFG, **refine))
  P = r.masks.shape[0]
  np.testing.assert_array_equal(r.masks.sum((1, 2)),
                                pattern.keep(*W0.shape))
  if isinstance(pattern, NM):
    np.testing.assert_array_equal(
        r.masks.reshape(P, 12, 4, 40).sum(2), 2)
  assert (r.masks & r.pareto.core[None]).sum() == P * r.pareto.core.sum()
  assert not (r.weights * ~r.masks).any()
  np.testing.assert_array_equal(r.pareto.core, paper.pareto.core)
  prefs = np.concatenate([np.eye(3), PREFS])
  f_paper = _f_lam(grams, W0, paper.weights, prefs)
  f_new = _f_lam(grams, W0, r.weights, prefs)
  interior = prefs.max(1) < 1
  assert f_new[interior].mean() < 0.99 * f_paper[interior].mean()
  if "pref_swap_rounds" in refine:
    assert (f_new <= f_paper * (1 + 1e-4)).all()


def test_paper_fixed_rho_stage2(layer):
  """The paper's fixed-rho stage 2 stays available and within its cap."""
  grams, W0 = layer
  cfg = dataclasses.replace(CFG, stage2_adaptive=False, stage2_max_iter=7)
  r = run(grams, W0, PREFS, Unstructured(0.6), cfg)
  assert (r.info.stage2.iters <= 7).all()
  np.testing.assert_allclose(r.info.stage2.rho, 0.5)
  np.testing.assert_array_equal(r.masks.sum((1, 2)),
                                Unstructured(0.6).keep(*W0.shape))


def test_sparsity_zero_gives_dense(layer):
  grams, W0 = layer
  r = run(grams, W0, PREFS, Unstructured(0.0))
  assert r.masks.all()
  for w in r.weights:
    np.testing.assert_allclose(w, W0, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["dead_inputs", "rank_deficient",
                                  "sparsity_0.99", "one_output"])
def test_degenerate_inputs(case):
  rng = np.random.default_rng(3)
  n, n_out, sparsity = 24, 10, 0.5
  grams = task_grams(rng, 3, n)
  if case == "dead_inputs":
    grams[:, :, :4] = 0
    grams[:, :4, :] = 0
  elif case == "rank_deficient":
    X = rng.standard_normal((3, 100, 2)) @ rng.standard_normal((2, n))
    grams = np.einsum("mti,mtj->mij", X, X).astype(np.float32) / 100
  elif case == "sparsity_0.99":
    sparsity = 0.99
  elif case == "one_output":
    n_out = 1
  W0 = rng.standard_normal((n, n_out)).astype(np.float32)
  r = run(grams, W0, PREFS, Unstructured(sparsity))
  assert np.isfinite(r.weights).all()
  np.testing.assert_array_equal(r.masks.sum((1, 2)),
                                int(round((1 - sparsity) * n * n_out)))


def test_bad_shapes_raise(layer):
  grams, W0 = layer
  with pytest.raises(ValueError, match="prefs must be"):
    run(grams, W0, PREFS[:, :2], Unstructured(0.5))
  with pytest.raises(ValueError, match="grams must be"):
    run(grams[:, :10, :10], W0, PREFS, Unstructured(0.5))
