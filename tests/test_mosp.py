"""MOSP on one layer against independent references and invariants."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mosp_jax.config import DEFAULT, PAPER
from mosp_jax.solvers import (
  NM,
  ParetoLayer,
  Unstructured,
  alps_prune,
  masked_pcg,
  mosp_materialize,
  mosp_pareto,
  mosp_prune,
)
from mosp_jax.solvers import mosp as mosp_lib
from mosp_jax.solvers.scaling import concat_gram, scale_problem, scale_tasks

from .conftest import guarded, rel_err, task_grams

CFG = PAPER  # The paper's construction; DEFAULT's additions below.
PREFS = np.array([[1 / 3, 1 / 3, 1 / 3], [0.5, 0.25, 0.25],
                  [0.0, 0.5, 0.5], [0.1, 0.2, 0.7]], np.float32)
N_IN, N_OUT = 48, 40
PATTERNS = [Unstructured(0.5), Unstructured(0.7), NM(2, 4)]


def run(grams, W0, prefs, pattern, cfg=CFG):
  return guarded(lambda g, w, p: mosp_prune(g, w, p, pattern=pattern,
                                            cfg=cfg), grams, W0, prefs,
                 jit=False)


def pareto(grams, W0, pattern, cfg=CFG):
  return guarded(lambda g, w: mosp_pareto(g, w, pattern=pattern, cfg=cfg),
                 grams, W0, jit=False)


@pytest.fixture(scope="module")
def layer():
  rng = np.random.default_rng(7)
  grams = task_grams(rng, 3, N_IN)
  W0 = rng.standard_normal((N_IN, N_OUT)).astype(np.float32)
  return grams, W0


def groups(mask, m=4):
  """`(..., n_in, n_out)` -> kept entries per N:M group."""
  *lead, n_in, n_out = mask.shape
  return mask.reshape(*lead, n_in // m, m, n_out).sum(-2)


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_global_model_is_alps_on_the_concatenated_gram(layer, pattern):
  """Stage 1's W is ALPS on H = mean_i G_i: the core rides along."""
  grams, W0 = layer
  par, info = pareto(grams, W0, pattern)
  W, mask, ainfo = guarded(
      lambda h, w: alps_prune(h, w, pattern=pattern, cfg=CFG),
      np.mean(grams.astype(np.float64), 0).astype(np.float32), W0,
      jit=False)
  np.testing.assert_array_equal(par.W != 0, mask)
  np.testing.assert_allclose(par.W, W, rtol=1e-5, atol=1e-6)
  assert int(info.stage1.iters) == int(ainfo.admm.iters)


@pytest.mark.parametrize("core_rule", ["dual", "global"])
@pytest.mark.parametrize("n_in, n_out", [(48, 16), (48, 12), (48, 40)])
def test_global_model_is_alps_bit_for_bit(n_in, n_out, core_rule):
  """The same W as `alps_prune` on the same `H`, to the bit, also where
  one channel's columns and both channels' columns would pick different
  linear steps (48 x 16: 48 < 3 * 16 is false, 48 < 3 * 32 true; on
  SmolLM2's 576 x 192 k/v projections that choice made W differ)."""
  rng = np.random.default_rng(n_in + n_out)
  grams = task_grams(rng, 3, n_in)
  W0 = rng.standard_normal((n_in, n_out)).astype(np.float32)
  pattern = Unstructured(0.5)
  par, _ = mosp_pareto(jnp.asarray(grams), jnp.asarray(W0), pattern=pattern,
                       cfg=dataclasses.replace(CFG, core_rule=core_rule))
  H = concat_gram(jnp.asarray(grams))
  W, _, _ = alps_prune(H, jnp.asarray(W0), pattern=pattern, cfg=CFG)
  np.testing.assert_array_equal(np.asarray(par.W), np.asarray(W))


@pytest.mark.parametrize("core_rule", ["dual", "global"])
@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_core_is_floor_alpha_k_inside_the_global_support(layer, pattern,
                                                         alpha, core_rule):
  grams, W0 = layer
  cfg = dataclasses.replace(CFG, alpha=alpha, core_rule=core_rule)
  par, _ = pareto(grams, W0, pattern, cfg)
  k = pattern.keep(N_IN, N_OUT)
  assert not (par.core & (par.W == 0)).any()
  np.testing.assert_array_equal((par.W != 0).sum(), k)
  if isinstance(pattern, NM):
    np.testing.assert_array_equal(groups(par.core),
                                  math.floor(alpha * pattern.n))
  else:
    assert par.core.sum() == math.floor(alpha * k)
  # Every task model keeps the core and the budget.
  for Wi in par.W_tasks:
    assert not (par.core & (Wi == 0)).any()
    assert (Wi != 0).sum() <= k


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_global_core_rule_is_the_top_of_the_scaled_global_model(layer,
                                                                  pattern):
  """`core_rule='global'` [ours]: the core is the top floor(alpha k) of
  `|d w|` inside supp(W) (per N:M group), by a numpy sort; the global
  model is the same as the paper's rule gives."""
  grams, W0 = layer
  par, _ = pareto(grams, W0, pattern,
                  dataclasses.replace(CFG, core_rule="global"))
  paper, _ = pareto(grams, W0, pattern)
  np.testing.assert_array_equal(par.W, paper.W)
  score = np.abs(par.W * par.d[:, None])
  score[par.W == 0] = -1
  want = np.zeros_like(par.core)
  if isinstance(pattern, NM):
    count = math.floor(CFG.alpha * pattern.n)
    for lo in range(0, N_IN, pattern.m):
      rows = np.arange(lo, lo + pattern.m)
      for c in range(N_OUT):
        top = np.argsort(-score[rows, c], kind="stable")[:count]
        want[rows[top], c] = True
  else:
    count = math.floor(CFG.alpha * pattern.keep(N_IN, N_OUT))
    top = np.argsort(-score.ravel(), kind="stable")[:count]
    want.ravel()[top] = True
  np.testing.assert_array_equal(par.core, want)


def test_stage2_without_iterations_returns_the_global_model(layer):
  grams, W0 = layer
  pattern = Unstructured(0.6)

  def stage2_from_w(g, w):
    sc = scale_problem(concat_gram(g), w, damping=CFG.damping)
    par, _ = mosp_pareto(g, w, pattern=pattern, cfg=CFG)
    G = scale_tasks(g, sc.d, damping=CFG.damping)
    X = par.W * sc.d[:, None]
    it, info = mosp_lib.stage2(G, sc.B0, par.core, X, pattern=pattern,
                               alpha=CFG.alpha, rho=jnp.float32(0.5),
                               max_iter=0)
    return it, info, X

  it, info, X = guarded(stage2_from_w, grams, W0)
  np.testing.assert_array_equal(info.iters, 0)
  for i in range(3):
    np.testing.assert_array_equal(it.D[i], X)
    np.testing.assert_array_equal(it.mask[i], X != 0)


def test_task_models_are_stage2_then_pcg_on_their_gram(layer):
  """Stage 3 is PCG on G_i over each stage-2 support, and every task
  model is better on its own task than the global model."""
  grams, W0 = layer
  pattern = Unstructured(0.6)
  par, info = pareto(grams, W0, pattern)
  assert (info.stage2.iters >= 1).all() and (info.stage2.iters <= 10).all()
  np.testing.assert_allclose(info.stage2.rho, 0.5)
  damped = [g + CFG.damping * np.mean(np.diag(g)) * np.eye(N_IN)
            for g in grams.astype(np.float64)]
  for i, Wi in enumerate(par.W_tasks):
    mask = Wi != 0
    # Independent reference: the least-squares optimum on the support,
    # column by column; 10 PCG steps from stage 2 get close to it.
    opt = np.zeros((N_IN, N_OUT))
    for c in range(N_OUT):
      s = mask[:, c]
      opt[s, c] = np.linalg.solve(damped[i][np.ix_(s, s)],
                                  (damped[i] @ W0[:, c])[s])
    assert rel_err(damped[i], W0, Wi) <= 1.05 * rel_err(damped[i], W0, opt)
    assert rel_err(grams[i], W0, Wi) < rel_err(grams[i], W0, par.W)


def test_stage2_vmap_equals_a_loop(layer):
  grams, W0 = layer
  pattern = NM(2, 4)

  def both(g, w):
    sc = scale_problem(concat_gram(g), w, damping=CFG.damping)
    par, _ = mosp_pareto(g, w, pattern=pattern, cfg=CFG)
    G = scale_tasks(g, sc.d, damping=CFG.damping)
    X = par.W * sc.d[:, None]
    kw = dict(pattern=pattern, alpha=CFG.alpha, rho=jnp.float32(0.5),
              max_iter=CFG.stage2_max_iter)
    batched, _ = mosp_lib.stage2(G, sc.B0, par.core, X, **kw)
    looped = [mosp_lib.stage2(G[i:i + 1], sc.B0, par.core, X, **kw)[0]
              for i in range(g.shape[0])]
    pcg = jax.vmap(lambda gi, m, x: masked_pcg(gi, sc.B0, m, x, iters=10)[0])
    one = [masked_pcg(G[i], sc.B0, looped[i].mask[0], looped[i].D[0],
                      iters=10)[0] for i in range(g.shape[0])]
    return (batched.mask, batched.D, pcg(G, batched.mask, batched.D),
            jnp.concatenate([it.mask for it in looped]),
            jnp.concatenate([it.D for it in looped]), jnp.stack(one))

  bm, bd, bx, lm, ld, lx = guarded(both, grams, W0)
  np.testing.assert_array_equal(bm, lm)
  # Only the float32 summation order differs.
  np.testing.assert_allclose(bd, ld, rtol=1e-4, atol=1e-5 * np.abs(ld).max())
  np.testing.assert_allclose(bx, lx, rtol=1e-4, atol=1e-5 * np.abs(lx).max())


def reference_preference(par, lam, pattern, alpha, p):
  """numpy `P_{k,S_c}(W + sum_i lam'_i (W_i - W))`, `lam' = lam^(1/p)`:
  the core plus the top `k - |S_c|` of `|d w|` outside it (per N:M group),
  ties to the lower index."""
  lam = np.asarray(lam, np.float64) ** (1.0 / p)
  mix = (np.asarray(par.W, np.float64)
         + np.einsum("m,mio->io", lam, par.W_tasks - par.W[None]))
  score = np.abs(mix * par.d[:, None])
  score[par.core] = -1
  keep = par.core.copy()
  n_in, n_out = mix.shape
  if isinstance(pattern, NM):
    count = pattern.n - math.floor(alpha * pattern.n)
    for g in range(n_in // pattern.m):
      for c in range(n_out):
        rows = slice(g * pattern.m, (g + 1) * pattern.m)
        order = np.argsort(-score[rows, c], kind="stable")[:count]
        keep[g * pattern.m + order, c] = True
  else:
    k = pattern.keep(n_in, n_out)
    count = k - math.floor(alpha * k)
    order = np.argsort(-score.ravel(), kind="stable")[:count]
    keep.ravel()[order] = True
  return np.where(keep, mix, 0.0), keep


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("p", [0.5, 1.0])
def test_preferences_are_the_projected_mix(layer, pattern, p):
  grams, W0 = layer
  cfg = dataclasses.replace(CFG, p=p)
  r = run(grams, W0, PREFS, pattern, cfg)
  k = pattern.keep(N_IN, N_OUT)
  P = 3 + len(PREFS)
  np.testing.assert_array_equal(r.masks.sum((1, 2)), [k] * P)
  if isinstance(pattern, NM):
    np.testing.assert_array_equal(groups(r.masks), pattern.n)
  assert (r.masks & r.pareto.core[None]).sum() == P * r.pareto.core.sum()
  assert not (r.weights * ~r.masks).any()
  for i in range(3):  # the vertices are the task models, exactly
    np.testing.assert_array_equal(r.weights[i], r.pareto.W_tasks[i])
  for j, lam in enumerate(PREFS):
    want, keep = reference_preference(r.pareto, lam, pattern, CFG.alpha, p)
    np.testing.assert_array_equal(r.masks[3 + j], keep)
    np.testing.assert_allclose(r.weights[3 + j], want, rtol=1e-5,
                               atol=1e-7)


def test_materialize_needs_only_the_pareto_set(layer):
  """Each preference alone equals its row of a batch (to the last bit of
  the mix), from (S_c, W, W_i, d) only; the normalized map sums to one."""
  grams, W0 = layer
  pattern = Unstructured(0.6)
  par, _ = pareto(grams, W0, pattern)
  par = ParetoLayer(*par)

  def mat(prefs, cfg=CFG):
    return guarded(lambda pa, p: mosp_materialize(pa, p, pattern=pattern,
                                                  cfg=cfg), par, prefs,
                   jit=False)

  batch = mat(PREFS)
  for j in range(len(PREFS)):
    one = mat(PREFS[j:j + 1])
    np.testing.assert_allclose(one[0][0], batch[0][j], rtol=1e-6, atol=0)
    np.testing.assert_array_equal(one[1][0], batch[1][j])
  lam = guarded(lambda p: mosp_lib.pref_map(p, p=0.5, kind="normalized"),
                PREFS)
  np.testing.assert_allclose(lam.sum(1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(lam, PREFS ** 2 / (PREFS ** 2).sum(
      1, keepdims=True), rtol=1e-6)


def _f_lam(grams, W0, weights, prefs):
  """Independent numpy `(P,)` preference objective `sum_i lam_i f_i` on
  the damped Grams (what a refit minimises)."""
  damped = [g + CFG.damping * np.mean(np.diag(g)) * np.eye(len(g))
            for g in np.asarray(grams, np.float64)]
  err = np.array([[rel_err(g, W0, w) for g in damped] for w in weights])
  return np.sum(prefs * err, axis=1)


@pytest.mark.parametrize("pattern", [Unstructured(0.6), NM(2, 4)], ids=str)
def test_refit_lowers_f_lam_and_keeps_supports(layer, pattern):
  """[ours] The refit keeps every support and the vertices, and lowers
  the preference objective of every interior model."""
  grams, W0 = layer
  paper = run(grams, W0, PREFS, pattern)
  r = run(grams, W0, PREFS, pattern,
          dataclasses.replace(CFG, pref_refit_iters=10))
  np.testing.assert_array_equal(r.masks, paper.masks)
  np.testing.assert_array_equal(r.weights[:3], paper.weights[:3])
  assert not (r.weights * ~r.masks).any()
  prefs = np.concatenate([np.eye(3), PREFS])
  f_paper = _f_lam(grams, W0, paper.weights, prefs)[3:]
  f_refit = _f_lam(grams, W0, r.weights, prefs)[3:]
  assert (f_refit < f_paper).all()
  with pytest.raises(ValueError, match="pass grams and W0"):
    mosp_materialize(ParetoLayer(*paper.pareto), PREFS, pattern=pattern,
                     cfg=dataclasses.replace(CFG, pref_refit_iters=10))


@pytest.mark.parametrize("pattern", [Unstructured(0.6), NM(2, 4)], ids=str)
def test_own_support_keeps_the_budget_and_lowers_f_lam(layer, pattern):
  """[ours] `pref_support='own'` chooses an interior model's support in
  its own Gram's scale: the core kept, the exact budget (per N:M group),
  the vertices untouched, and the objective below the projected mix."""
  grams, W0 = layer
  paper = run(grams, W0, PREFS, pattern)
  own = run(grams, W0, PREFS, pattern,
            dataclasses.replace(CFG, pref_refit_iters=10, pref_support="own"))
  np.testing.assert_array_equal(own.weights[:3], paper.weights[:3])
  assert not (own.weights * ~own.masks).any()
  budget = pattern.keep(N_IN, N_OUT)
  assert (own.masks.sum((1, 2)) == budget).all()
  if isinstance(pattern, NM):
    assert (groups(own.masks) == 2).all()
  core = np.asarray(own.pareto.core)
  assert (own.masks[3:] | ~core[None]).all()
  prefs = np.concatenate([np.eye(3), PREFS])
  f_mix = _f_lam(grams, W0, paper.weights, prefs)[3:]
  f_own = _f_lam(grams, W0, own.weights, prefs)[3:]
  assert (f_own < f_mix).all()


def test_default_set_is_a_refitted_trade_off(layer):
  """The defaults (core from |W|, 5 stage-2 iterations, the refit): the
  exact budget, the core in every model, each vertex best on its task,
  and each interior model below its own unrefitted construction."""
  grams, W0 = layer
  r = run(grams, W0, PREFS, Unstructured(0.6), DEFAULT)
  mix = run(grams, W0, PREFS, Unstructured(0.6),
            dataclasses.replace(DEFAULT, pref_refit_iters=0))
  assert (r.masks.sum((1, 2)) == Unstructured(0.6).keep(N_IN, N_OUT)).all()
  assert (r.masks | ~np.asarray(r.pareto.core)[None]).all()
  np.testing.assert_array_equal(r.masks, mix.masks)
  err = np.array([[rel_err(grams[i], W0, w) for i in range(3)]
                  for w in r.weights])
  assert [int(np.argmin(err[:, i])) for i in range(3)] == [0, 1, 2]
  prefs = np.concatenate([np.eye(3), PREFS])
  assert (_f_lam(grams, W0, r.weights, prefs)[3:]
          < _f_lam(grams, W0, mix.weights, prefs)[3:]).all()


def test_front_is_a_trade_off(layer):
  grams, W0 = layer
  r = run(grams, W0, PREFS, Unstructured(0.6))
  err = np.array([[rel_err(grams[i], W0, w) for i in range(3)]
                  for w in r.weights])
  for i in range(3):  # vertex i is the best model on task i
    assert np.argmin(err[:, i]) == i


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
  if case == "dead_inputs":  # weights on inputs that never fire go first
    assert not r.masks[:, :4].any()


def test_bad_shapes_raise(layer):
  grams, W0 = layer
  with pytest.raises(ValueError, match="prefs must be"):
    run(grams, W0, PREFS[:, :2], Unstructured(0.5))
  with pytest.raises(ValueError, match="grams must be"):
    run(grams[:, :10, :10], W0, PREFS, Unstructured(0.5))
