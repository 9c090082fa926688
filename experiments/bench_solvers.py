r"""Benchmark of the per-layer solvers; ratios are measured in one run.

  python -m experiments.bench_solvers --out=bench.json [--large]

For each shape it times (after compilation) a fixed number of ADMM
iterations and a plain jitted matmul of the same shapes, and reports the
FLOP rate ADMM achieves relative to that matmul. It then times MOSP with
m tasks and K preferences against one ALPS solve on the same layer (the
naive front costs K ALPS solves). Inputs are random correlated Grams with
uneven channel scales (shapes of SmolLM2-135M: 576 hidden, 1536 MLP).
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from mosp_jax.config import SolverConfig
from mosp_jax.solvers import Unstructured, alps_prune, mosp_prune, prune_mask
from mosp_jax.solvers import mosp as mosp_lib
from mosp_jax.solvers.admm import apply_inverse, eig, run_admm
from mosp_jax.solvers.scaling import scale_problem

_OUT = flags.DEFINE_string("out", None, "Where to write the JSON results.")
_LARGE = flags.DEFINE_bool(
    "large", False, "Also run 4096x4096 and 11008x4096 (Llama-2-7B shapes).")
_ITERS = flags.DEFINE_integer("iters", 20, "ADMM iterations per timing.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timings per measurement; "
                                "the best is kept.")
_SPARSITY = flags.DEFINE_float("sparsity", 0.5, "Sparsity of the problems.")
_TASKS = flags.DEFINE_integer("tasks", 3, "m, tasks for the MOSP timing.")
_PREFS = flags.DEFINE_integer("prefs", 15, "K, preferences for MOSP.")

SHAPES = [(576, 576), (576, 1536), (1536, 576)]
LARGE_SHAPES = [(4096, 4096), (11008, 4096)]


def _best_times(fns, repeats: int) -> list[float]:
  """Best wall time of each function; runs are interleaved so that load
  from other processes hits every function alike (the ratios are what
  counts on a shared machine)."""
  for fn in fns:
    jax.block_until_ready(fn())  # compile + warm up
  best = [float("inf")] * len(fns)
  for _ in range(repeats):
    for i, fn in enumerate(fns):
      t = time.perf_counter()
      jax.block_until_ready(fn())
      best[i] = min(best[i], time.perf_counter() - t)
  return best


def _grams(rng: np.random.Generator, m: int, n: int) -> np.ndarray:
  """m task Grams sharing half their structure, with outlier channels."""
  tokens = 2 * n
  shared = rng.standard_normal((n // 4, n), np.float32) / np.sqrt(n)
  out = []
  for _ in range(m):
    own = rng.standard_normal((n // 4, n), np.float32) / np.sqrt(n)
    X = rng.standard_normal((tokens, n // 2), np.float32) @ np.concatenate(
        [shared, own])
    X += 0.3 * rng.standard_normal((tokens, n), np.float32)
    X *= np.exp(rng.standard_normal(n)).astype(np.float32)
    out.append(X.T @ X / tokens)
  return np.stack(out)


def bench_shape(n_in: int, n_out: int, rng, iters: int, repeats: int,
                pattern) -> dict:
  """ADMM iterations/s and FLOP rate vs a plain matmul, same shapes."""
  grams = jax.device_put(_grams(rng, 1, n_in))
  W0 = jax.device_put(rng.standard_normal((n_in, n_out), np.float32))
  cfg = SolverConfig()
  sc = jax.jit(lambda g, w: scale_problem(g, w, damping=cfg.damping))(
      grams, W0)
  Q, L = jax.jit(eig)(sc.G)

  def project(Z):
    return jax.vmap(lambda z: prune_mask(jnp.square(z), pattern))(Z), ()

  @jax.jit
  def admm_fixed(Q, L, G, B0):
    B = B0[None]
    mask, _ = project(B)
    # update_every > max_iter: no support check, exactly `iters` iterations.
    it, _, info = run_admm(
        Q, L, G @ B0, (B, jnp.where(mask, B, 0.0), jnp.zeros_like(B)),
        project, k=pattern.keep(n_in, n_out), rho0=cfg.rho0, adaptive=False,
        update_every=iters + 1, max_iter=iters)
    return it.D, info.iters

  @jax.jit
  def matmuls(Q, L, R):
    # The same two products one ADMM iteration does, nothing else.
    return apply_inverse(Q, L, jnp.float32(0.1), R)

  t_admm, t_mm = _best_times(
      [lambda: admm_fixed(Q, L, sc.G, sc.B0),
       lambda: matmuls(Q, L, sc.B0[None])], repeats)
  flops_iter = 4.0 * n_in * n_in * n_out
  admm_gflops = flops_iter * iters / t_admm / 1e9
  mm_gflops = flops_iter / t_mm / 1e9
  return {"n_in": n_in, "n_out": n_out,
          "admm_iters_per_s": iters / t_admm,
          "admm_gflops": admm_gflops, "matmul_gflops": mm_gflops,
          "ratio_to_matmul": admm_gflops / mm_gflops}


def bench_mosp_vs_alps(n_in: int, n_out: int, m: int, K: int, rng,
                       repeats: int, pattern) -> dict:
  grams = jax.device_put(_grams(rng, m, n_in))
  W0 = jax.device_put(rng.standard_normal((n_in, n_out), np.float32))
  prefs_np = rng.dirichlet(np.ones(m), K).astype(np.float32)
  prefs = jax.device_put(prefs_np)
  H = jax.device_put(np.einsum("k,kij->ij", prefs_np[0], _np(grams)))
  with jax.transfer_guard("disallow"):
    t_alps, t_mosp = _best_times(
        [lambda: alps_prune(H, W0, pattern=pattern),
         lambda: mosp_prune(grams, W0, prefs, pattern=pattern)], repeats)
    res = mosp_prune(grams, W0, prefs, pattern=pattern)
    _, _, ainfo = alps_prune(H, W0, pattern=pattern)
  parts = _mosp_breakdown(grams, W0, prefs, pattern, repeats)
  return {"n_in": n_in, "n_out": n_out, "m": m, "K": K,
          "alps_s": t_alps, "mosp_s": t_mosp, "ratio": t_mosp / t_alps,
          "naive_front_ratio": float(K),
          "alps_iters": int(ainfo.admm.iters),
          "mosp_stage1_iters": int(res.info.stage1.iters),
          "mosp_stage2_iters": [int(i) for i in res.info.stage2.iters],
          "mosp_breakdown_s": parts}


def _mosp_breakdown(grams, W0, prefs, pattern, repeats: int) -> dict:
  """Seconds spent in each MOSP stage (each jitted alone)."""
  cfg = SolverConfig()
  m = grams.shape[0]
  prep = jax.jit(lambda g, w: (lambda sc: (sc, eig(sc.G)))(
      scale_problem(g, w, damping=cfg.damping)))
  sc, (Q, L) = prep(grams, W0)
  s1 = jax.jit(lambda: mosp_lib.stage1(
      sc, Q, L, pattern=pattern, alpha=cfg.alpha, p=cfg.p, rho0=cfg.rho0,
      update_every=cfg.update_every, max_iter=cfg.max_iter))
  core, it1, _ = s1()
  s2 = jax.jit(lambda: mosp_lib.stage2(
      sc, Q, L, core, it1, pattern=pattern, alpha=cfg.alpha,
      rho=cfg.stage2_rho, adaptive=cfg.stage2_adaptive,
      update_every=cfg.update_every, max_iter=cfg.stage2_max_iter))
  it2, _ = s2()
  all_prefs = jnp.concatenate([jnp.eye(m), prefs])
  asm = jax.jit(lambda: mosp_lib.assemble(
      sc, core, it2.D, all_prefs, pattern=pattern, alpha=cfg.alpha,
      pcg_iters=cfg.pcg_iters))
  times = _best_times([lambda: prep(grams, W0), s1, s2, asm], repeats)
  return dict(zip(["scale_eig", "stage1", "stage2", "assemble_pcg"], times,
                  strict=True))


def _np(x) -> np.ndarray:
  return np.asarray(jax.device_get(x))


def _write_json(path: str, obj: dict) -> None:
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, suffix=".json.tmp")
  with os.fdopen(fd, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def main(argv):
  del argv
  if _OUT.value is None:
    raise app.UsageError("--out is required (a path for the JSON results)")
  rng = np.random.default_rng(0)
  pattern = Unstructured(_SPARSITY.value)
  dev = jax.devices()[0]
  device = f"{dev.platform}:{dev.device_kind} x{jax.device_count()}"
  shapes = SHAPES + (LARGE_SHAPES if _LARGE.value else [])
  rows = []
  for n_in, n_out in shapes:
    print(f"timing ADMM {n_in}x{n_out} ...", flush=True)
    rows.append(bench_shape(n_in, n_out, rng, _ITERS.value,
                            _REPEATS.value, pattern))
  print(f"timing MOSP (m={_TASKS.value}, K={_PREFS.value}) vs ALPS ...",
        flush=True)
  cmp = bench_mosp_vs_alps(576, 1536, _TASKS.value, _PREFS.value, rng,
                           _REPEATS.value, pattern)
  result = {"device": device, "sparsity": _SPARSITY.value, "shapes": rows,
            "mosp_vs_alps": cmp}
  _write_json(_OUT.value, result)
  print(f"\ndevice: {device}   sparsity {_SPARSITY.value}")
  print(f"{'shape':>12} {'iters/s':>9} {'ADMM GF/s':>10} {'matmul GF/s':>12}"
        f" {'ratio':>6}")
  for r in rows:
    print(f"{r['n_in']:>5}x{r['n_out']:<6} {r['admm_iters_per_s']:9.2f} "
          f"{r['admm_gflops']:10.1f} {r['matmul_gflops']:12.1f} "
          f"{r['ratio_to_matmul']:6.2f}")
  print(f"MOSP m={cmp['m']} K={cmp['K']} on {cmp['n_in']}x{cmp['n_out']}: "
        f"{cmp['mosp_s']:.2f} s vs one ALPS {cmp['alps_s']:.2f} s -> "
        f"ratio {cmp['ratio']:.2f} (naive front: {cmp['K']}x)")
  print("  MOSP stages (s): " + ", ".join(
      f"{k} {v:.2f}" for k, v in cmp["mosp_breakdown_s"].items()) +
        f"; iterations: stage 1 {cmp['mosp_stage1_iters']}, stage 2 "
        f"{cmp['mosp_stage2_iters']}, ALPS {cmp['alps_iters']}")
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
