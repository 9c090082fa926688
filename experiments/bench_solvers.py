r"""Benchmark of the per-layer solvers; ratios are measured in one run.

  python -m experiments.bench_solvers --out=bench.json [--large]
  python -m experiments.bench_solvers --out=bench_7b.json \
      --solve_shapes=4096x4096 --repeats=1
  XLA_FLAGS=--xla_force_host_platform_device_count=4 \
      python -m experiments.bench_solvers --mesh=4 --out=bench_mesh.json

For each shape it times (after compilation) a fixed number of ADMM
iterations and a plain jitted matmul of the same shapes, and reports the
FLOP rate ADMM achieves relative to that matmul (the two products of the
eigenbasis step; with the explicit inverse one ADMM iteration does half
of them, so the ratio can exceed 1). It then times MOSP with m tasks and
K preferences (its Pareto set, then the K models) against one ALPS solve
on the concatenated Gram of the same layer (the paper's baseline; a naive
front costs K ALPS solves), with a per-stage breakdown, and MOSP with
`core_rule='global'` (the core from `|W|`, [ours]) beside them, at each of
`--solve_shapes`. Inputs are random correlated Grams with uneven channel
scales (shapes of SmolLM2-135M: 576 hidden, 1536 MLP; `--large` adds
Llama-2-7B's linears to both measurements: 4096x4096 for q/k/v/o,
4096x11008 for gate/up, 11008x4096 for down).

Every timed function is compiled ahead (`jax.jit(...).lower().compile()`),
so no warm-up run is needed: at Llama-2-7B's shapes on a CPU one solve
takes minutes, and `--repeats=1` times each once.

With --mesh it also runs MOSP on a device mesh (`--mesh_layer`, m tasks)
and records under "mesh": the per-device bytes of the ADMM iterates and
their loop workspace (outputs + temporaries of the compiled fixed-count
ADMM loop, from XLA's memory analysis) against one device, the time per
ADMM iteration on both, and whether full MOSP runs (pareto + materialize)
give the same masks and objectives on the mesh as on one device.
"""

from __future__ import annotations

import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from mosp_jax import cli
from mosp_jax.config import SolverConfig
from mosp_jax.pipeline import artifact
from mosp_jax.solvers import (
  Unstructured,
  alps_prune,
  concat_gram,
  mosp_materialize,
  mosp_prune,
  projection,
  prune_mask,
  relative_error,
  sharding,
)
from mosp_jax.solvers import alps as alps_lib
from mosp_jax.solvers import mosp as mosp_lib
from mosp_jax.solvers import pcg as pcg_lib
from mosp_jax.solvers.admm import eig, eig_solve, run_admm
from mosp_jax.solvers.scaling import Scaled, scale_problem, scale_tasks

_OUT = flags.DEFINE_string("out", None, "Where to write the JSON results.")
_LARGE = flags.DEFINE_bool(
    "large", False, "Also time ADMM and MOSP against ALPS at Llama-2-7B's "
    "linears: 4096x4096, 4096x11008, 11008x4096.")
_SOLVE_SHAPES = flags.DEFINE_list(
    "solve_shapes", ["576x1536"], "n_in x n_out of each MOSP-against-ALPS "
    "timing (--large adds Llama-2-7B's).")
_ITERS = flags.DEFINE_integer("iters", 20, "ADMM iterations per timing.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timings per measurement; "
                                "the best is kept.")
_SPARSITY = flags.DEFINE_float("sparsity", 0.5, "Sparsity of the problems.")
_TASKS = flags.DEFINE_integer("tasks", 3, "m, tasks for the MOSP timing.")
_PREFS = flags.DEFINE_integer("prefs", 15, "K, preferences for MOSP.")
_GLOBAL_CORE = flags.DEFINE_bool(
    "global_core", True, "Also time MOSP with --core_rule=global beside "
    "MOSP and ALPS (--noglobal_core skips it: at 11008x4096 it costs about "
    "20 minutes on a 2-core CPU).")
_BREAKDOWN = flags.DEFINE_bool(
    "breakdown", True, "Also time each MOSP stage alone (one more MOSP's "
    "work per repeat; --nobreakdown skips it).")
_MESH = flags.DEFINE_string(
    "mesh", "", "Also benchmark the solvers on this device mesh ('4', "
    "'2x2'; on CPU with XLA_FLAGS=--xla_force_host_platform_device_count).")
_MESH_LAYER = flags.DEFINE_string("mesh_layer", "1536x2048",
                                  "n_in x n_out of the mesh benchmark.")
_MESH_PREFS = flags.DEFINE_integer("mesh_prefs", 3, "K, preferences of the "
                                   "mesh equality check.")

SHAPES = [(576, 576), (576, 1536), (1536, 576)]
LARGE_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]


def _compiled(fn, *args):
  """`fn` jitted and compiled ahead for `args`, as a call without
  arguments (arrays stay arguments, so XLA cannot fold them as
  constants); its timings never include compilation."""
  exe = jax.jit(fn).lower(*args).compile()
  return lambda: exe(*args)


def _best_times(calls, repeats: int) -> tuple[list[float], list[Any]]:
  """Best wall time (s) of each compiled call and its last output; runs
  are interleaved so that load from other processes hits every call
  alike (the ratios are what counts on a shared machine)."""
  best = [float("inf")] * len(calls)
  outs: list[Any] = [None] * len(calls)
  for _ in range(repeats):
    for i, call in enumerate(calls):
      t = time.perf_counter()
      outs[i] = jax.block_until_ready(call())
      best[i] = min(best[i], time.perf_counter() - t)
  return best, outs


def _timed(fn, *args, repeats: int) -> tuple[float, Any]:
  """`(best seconds, output)` of `fn(*args)`, compiled ahead."""
  (t,), (out,) = _best_times([_compiled(fn, *args)], repeats)
  return t, out


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
  sc = jax.jit(lambda g, w: scale_problem(g[0], w, damping=cfg.damping))(
      grams, W0)
  Q, L = jax.jit(eig)(sc.G)

  def project(Z):
    return jax.vmap(lambda z: prune_mask(jnp.abs(z), pattern))(Z), ()

  def admm_fixed(Q, L, G, B0):
    B = B0[None]
    mask, _ = project(B)
    # update_every > max_iter: no support check, exactly `iters` iterations.
    it, _, info = run_admm(
        eig_solve(Q, L, n_out, cfg.update_every), G @ B0,
        (B, jnp.where(mask, B, 0.0), jnp.zeros_like(B)), project,
        k=pattern.keep(n_in, n_out), rho0=cfg.rho0, adaptive=False,
        update_every=iters + 1, max_iter=iters)
    return it.D, info.iters

  def matmuls(Q, L, R):
    # The two products of one eigenbasis step, nothing else.
    QtR = Q.T @ R
    return Q @ (QtR * (1.0 / (L + 0.1))[:, None])

  (t_admm, t_mm), _ = _best_times(
      [_compiled(admm_fixed, Q, L, sc.G, sc.B0),
       _compiled(matmuls, Q, L, sc.B0)], repeats)
  flops_iter = 4.0 * n_in * n_in * n_out
  admm_gflops = flops_iter * iters / t_admm / 1e9
  mm_gflops = flops_iter / t_mm / 1e9
  return {"n_in": n_in, "n_out": n_out,
          "admm_iters_per_s": iters / t_admm,
          "admm_gflops": admm_gflops, "matmul_gflops": mm_gflops,
          "ratio_to_matmul": admm_gflops / mm_gflops}


def bench_mosp_vs_alps(n_in: int, n_out: int, m: int, K: int, rng,
                       repeats: int, pattern, *, global_core: bool = True,
                       breakdown: bool = True) -> dict:
  """MOSP (m tasks, K preferences) against one ALPS solve on the
  concatenated Gram, interleaved; with `global_core` also MOSP with
  `core_rule='global'`, with `breakdown` each MOSP stage alone."""
  grams = jax.device_put(_grams(rng, m, n_in))
  W0 = jax.device_put(rng.standard_normal((n_in, n_out), np.float32))
  prefs = jax.device_put(rng.dirichlet(np.ones(m), K).astype(np.float32))
  H = jax.jit(concat_gram)(grams)
  calls = [_compiled(lambda h, w: alps_prune(h, w, pattern=pattern), H, W0),
           _compiled(lambda g, w, p: mosp_prune(g, w, p, pattern=pattern),
                     grams, W0, prefs)]
  if global_core:
    global_cfg = SolverConfig(core_rule="global")
    calls.append(_compiled(
        lambda g, w, p: mosp_prune(g, w, p, pattern=pattern,
                                   cfg=global_cfg), grams, W0, prefs))
  with jax.transfer_guard("disallow"):
    times, outs = _best_times(calls, repeats)
  t_alps, t_mosp = times[:2]
  (_, _, ainfo), res = outs[:2]
  out = {"n_in": n_in, "n_out": n_out, "m": m, "K": K,
         "alps_s": t_alps, "mosp_s": t_mosp, "ratio": t_mosp / t_alps,
         "naive_front_ratio": float(K),
         "alps_iters": int(ainfo.admm.iters),
         "mosp_stage1_iters": int(res.info.stage1.iters),
         "mosp_stage2_iters": [int(i) for i in res.info.stage2.iters]}
  if global_core:
    # The core taken from |W| instead of the dual ADMM [ours].
    out["mosp_global_core_s"] = times[2]
    out["ratio_global_core"] = times[2] / t_alps
  if breakdown:
    out["mosp_breakdown_s"] = _mosp_breakdown(grams, W0, prefs, res.pareto,
                                              pattern, repeats)
  return out


def _mosp_breakdown(grams, W0, prefs, pareto, pattern, repeats: int
                    ) -> dict:
  """Seconds spent in each MOSP stage, each compiled alone and fed the
  previous stage's output (one MOSP's work per repeat); `pareto` is the
  layer's Pareto set from the whole solve, for `materialize`."""
  cfg = SolverConfig()
  n_in, n_out = W0.shape
  core_count = projection.core_count(pattern, n_in, n_out, cfg.alpha)
  t = functools.partial(_timed, repeats=repeats)
  times = {}
  times["scale_eig"], (sc, (Q, L)) = t(
      lambda g, w: (lambda sc: (sc, eig(sc.G)))(
          scale_problem(concat_gram(g), w, damping=cfg.damping)), grams, W0)
  times["stage1_admm"], sup = t(
      lambda sc, Q, L: alps_lib.admm_support(
          sc, Q, L, pattern=pattern, rho0=cfg.rho0,
          update_every=cfg.update_every, max_iter=cfg.max_iter,
          core_count=core_count)[0], sc, Q, L)
  times["stage1_pcg"], X = t(lambda sc, sup: pcg_lib.masked_pcg(
      sc.G, sc.B0, sup.mask, sup.D, iters=cfg.pcg_iters)[0], sc, sup)
  G = jax.jit(lambda g, d: scale_tasks(g, d, damping=cfg.damping))(
      grams, sc.d)
  times["stage2"], it2 = t(lambda G, sc, sup, X: mosp_lib.stage2(
      G, sc.B0, sup.core, X, pattern=pattern, alpha=cfg.alpha,
      rho=jnp.float32(cfg.stage2_rho), max_iter=cfg.stage2_max_iter)[0],
      G, sc, sup, X)
  times["stage3_pcg"], _ = t(lambda G, sc, it2: jax.vmap(
      lambda g, mask, D: pcg_lib.masked_pcg(g, sc.B0, mask, D,
                                            iters=cfg.pcg_iters))(
      G, it2.mask, it2.D), G, sc, it2)
  times["materialize"], _ = t(
      lambda par, p: mosp_materialize(par, p, pattern=pattern), pareto,
      prefs)
  return times


def _memory(compiled) -> dict:
  """Per-device bytes of a compiled executable (XLA memory analysis)."""
  ma = compiled.memory_analysis()
  return {"argument": int(ma.argument_size_in_bytes),
          "output": int(ma.output_size_in_bytes),
          "temp": int(ma.temp_size_in_bytes),
          "alias": int(ma.alias_size_in_bytes)}


class _Pair(NamedTuple):
  """One measurement on one device and on the mesh."""

  one: Any
  mesh: Any


def bench_mesh(spec: str, n_in: int, n_out: int, m: int, K: int, rng,
               iters: int, repeats: int, pattern) -> tuple[dict, dict]:
  """MOSP on a device mesh vs one device: `("mesh" fields, details)`."""
  mesh = sharding.make_mesh(spec)
  if mesh is None:  # make_mesh('') is one device: nothing to compare.
    raise ValueError("bench_mesh needs a mesh spec ('4', '2x2'), got ''")
  sharding.check_layer(mesh, n_out)
  grams_np = _grams(rng, m, n_in)
  W0_np = rng.standard_normal((n_in, n_out), np.float32)
  prefs_np = rng.dirichlet(np.ones(m), K).astype(np.float32)
  mem, loop_s = _mesh_admm_loop(mesh, grams_np, W0_np, iters=iters,
                                repeats=repeats, pattern=pattern)
  res, mosp_s, err = _mesh_mosp(mesh, grams_np, W0_np, prefs_np,
                                pattern=pattern)
  masks_equal = bool(np.array_equal(res.one.masks, res.mesh.masks) and
                     np.array_equal(res.one.pareto.core,
                                    res.mesh.pareto.core))
  iterate_bytes = lambda ma: ma["output"] + ma["temp"]  # noqa: E731
  fields = {
      "devices": mesh.size,
      "bytes_per_device": iterate_bytes(mem.mesh),
      "single_device_bytes": iterate_bytes(mem.one),
      "masks_equal": masks_equal,
      "max_rel_objective_diff": float(np.max(np.abs(err.mesh - err.one) /
                                             np.abs(err.one))),
      "iter_s": loop_s.mesh / iters,
      "single_iter_s": loop_s.one / iters,
  }
  details = {
      "spec": spec, "mesh_shape": dict(mesh.shape), "n_in": n_in,
      "n_out": n_out, "m": m, "K": K, "pattern": str(pattern),
      "timed_iters": iters,
      "bytes": "outputs + temporaries of the compiled fixed-count stage-1 "
               "ADMM loop per device; arguments (Grams, eigenvectors: "
               "replicated) listed apart",
      "memory_analysis_mesh": mem.mesh, "memory_analysis_single": mem.one,
      "mosp_s": {"single": mosp_s.one, "mesh": mosp_s.mesh},
      "mask_entries_differing": int(np.sum(res.one.masks != res.mesh.masks)),
      "stage1_iters": [int(res.one.info.stage1.iters),
                       int(res.mesh.info.stage1.iters)],
      "stage2_iters": [_np(res.one.info.stage2.iters).tolist(),
                       _np(res.mesh.info.stage2.iters).tolist()],
  }
  return fields, details


def _mesh_admm_loop(mesh, grams: np.ndarray, W0: np.ndarray, *, iters: int,
                    repeats: int, pattern) -> tuple[_Pair, _Pair]:
  """`iters` stage-1 ADMM iterations compiled for one device and for the
  mesh (iterates split by output column).

  Args:
    mesh: the device mesh.
    grams: `(m, n_in, n_in)` task Grams; their concatenation is solved.
    W0: `(n_in, n_out)` dense weights.
    iters: iterations of the fixed-count loop.
    repeats: timings per side; the best is kept.
    pattern: the sparsity pattern.

  Returns:
    `(memory, seconds)`: per side, the `_memory` of the compiled loop and
    its best wall time for `iters` iterations.
  """
  n_in, n_out = W0.shape
  layout = sharding.layout_for(mesh)
  cfg = SolverConfig()
  sc = jax.jit(lambda g, w: scale_problem(concat_gram(g), w,
                                          damping=cfg.damping))(
      *jax.device_put((grams, W0)))
  Q, L = jax.jit(eig)(sc.G)

  core_count = projection.core_count(pattern, n_in, n_out, cfg.alpha)

  def admm_fixed(Q, L, G, B0):
    """`iters` stage-1 ADMM iterations (the global model and the core),
    no support checks."""
    scaled = Scaled(G=G, B0=B0, d=jnp.ones(n_in))
    sup, _ = alps_lib.admm_support(
        scaled, Q, L, pattern=pattern, rho0=cfg.rho0,
        update_every=iters + 1, max_iter=iters, core_count=core_count)
    return sup

  one_args = (Q, L, sc.G, sc.B0)
  put = sharding.place
  mesh_args = (put(Q, layout.replicated), put(L, layout.replicated),
               put(sc.G, layout.replicated), put(sc.B0, layout.weights))
  one = jax.jit(admm_fixed).lower(*one_args).compile()
  shd = jax.jit(admm_fixed).lower(*mesh_args).compile()
  mem_one, mem_shd = _memory(one), _memory(shd)
  (t_one, t_shd), _ = _best_times([lambda: one(*one_args),
                                   lambda: shd(*mesh_args)], repeats)
  return _Pair(mem_one, mem_shd), _Pair(t_one, t_shd)


def _mesh_mosp(mesh, grams_np: np.ndarray, W0_np: np.ndarray,
               prefs_np: np.ndarray, *, pattern
               ) -> tuple[_Pair, _Pair, _Pair]:
  """Full MOSP (pareto + materialize) on one device and on the mesh.

  Returns:
    `(results, seconds, errors)`: per side, `mosp_prune`'s result on the
    host, its wall time (one run, compilation included) and the
    `(models, m)` relative errors of its weights, computed on one device.
  """
  grams, W0, prefs = jax.device_put((grams_np, W0_np, prefs_np))
  with jax.transfer_guard("disallow"):
    t = time.perf_counter()
    r_one = jax.device_get(mosp_prune(grams, W0, prefs, pattern=pattern))
    s_one = time.perf_counter() - t
    t = time.perf_counter()
    r_shd = jax.device_get(mosp_prune(grams, W0, prefs, pattern=pattern,
                                      mesh=mesh))
    s_shd = time.perf_counter() - t
  rel = jax.jit(jax.vmap(jax.vmap(relative_error, (0, None, None)),
                         (None, None, 0)))
  e_one, e_shd = (_np(rel(grams, W0, jax.device_put(r.weights)))
                  for r in (r_one, r_shd))
  return _Pair(r_one, r_shd), _Pair(s_one, s_shd), _Pair(e_one, e_shd)


def _np(x) -> np.ndarray:
  return np.asarray(jax.device_get(x))


def _shape(text: str, flag: str) -> tuple[int, int]:
  """'N_INxN_OUT' -> `(n_in, n_out)`; raises `cli.UsageError` naming
  `flag`."""
  try:
    n_in, n_out = (int(x) for x in text.strip().lower().split("x"))
    if min(n_in, n_out) < 1:
      raise ValueError
  except ValueError as e:
    raise cli.UsageError(f"{flag}: expected 'N_INxN_OUT' with positive "
                         f"integers, got {text!r}") from e
  return n_in, n_out


class _Flags(NamedTuple):
  """The validated flags `main` needs."""

  out: str
  solve_shapes: list[tuple[int, int]]
  mesh_layer: tuple[int, int]
  pattern: Unstructured


def _check_flags() -> _Flags:
  """Validates every flag before any timing. Raises `cli.UsageError`."""
  out = _OUT.value
  if not out:
    raise cli.UsageError("--out is required (a path for the JSON results)")
  cli.check_out_file(out, flag="--out")
  with cli.usage_errors("--sparsity"):
    pattern = Unstructured(_SPARSITY.value)
  for flag in (_ITERS, _REPEATS, _TASKS, _PREFS, _MESH_PREFS):
    if flag.value < 1:
      raise cli.UsageError(f"--{flag.name} must be >= 1, got {flag.value}")
  solve = [_shape(t, "--solve_shapes") for t in _SOLVE_SHAPES.value]
  solve += [s for s in (LARGE_SHAPES if _LARGE.value else [])
            if s not in solve]
  with cli.usage_errors("--mesh"):
    mesh_shape = sharding.parse_mesh_spec(_MESH.value)
  n_in, n_out = _shape(_MESH_LAYER.value, "--mesh_layer")
  if mesh_shape:
    devices = int(np.prod(mesh_shape))
    if devices > jax.device_count():
      raise cli.UsageError(
          f"--mesh={_MESH.value} needs {devices} devices, found "
          f"{jax.device_count()}; on CPU set XLA_FLAGS=--xla_force_host_"
          f"platform_device_count={devices}")
    if n_out % devices:
      raise cli.UsageError(f"--mesh_layer {_MESH_LAYER.value}: {n_out} "
                           f"output columns do not split over {devices} "
                           "devices")
  return _Flags(out, solve, (n_in, n_out), pattern)


def main(argv):
  del argv  # cli.run refuses positional arguments.
  f = _check_flags()
  rng = np.random.default_rng(0)
  dev = jax.devices()[0]
  device = f"{dev.platform}:{dev.device_kind} x{jax.device_count()}"
  shapes = SHAPES + (LARGE_SHAPES if _LARGE.value else [])
  # Written after every measurement: a run stopped by a time limit (the
  # GPU check's) keeps what it measured.
  result: dict[str, Any] = {"device": device, "sparsity": _SPARSITY.value,
                            "repeats": _REPEATS.value, "shapes": [],
                            "mosp_vs_alps": []}
  rows, cmps = result["shapes"], result["mosp_vs_alps"]
  for n_in, n_out in shapes:
    print(f"timing ADMM {n_in}x{n_out} ...", flush=True)
    rows.append(bench_shape(n_in, n_out, rng, _ITERS.value,
                            _REPEATS.value, f.pattern))
    artifact.write_json(f.out, result)
  for n_in, n_out in f.solve_shapes:
    print(f"timing MOSP (m={_TASKS.value}, K={_PREFS.value}) vs ALPS, "
          f"{n_in}x{n_out} ...", flush=True)
    cmps.append(bench_mosp_vs_alps(
        n_in, n_out, _TASKS.value, _PREFS.value, rng, _REPEATS.value,
        f.pattern, global_core=_GLOBAL_CORE.value,
        breakdown=_BREAKDOWN.value))
    artifact.write_json(f.out, result)
  if _MESH.value:
    mesh_in, mesh_out = f.mesh_layer
    print(f"timing MOSP on mesh {_MESH.value!r}, {mesh_in}x{mesh_out}, "
          f"m={_TASKS.value} ...", flush=True)
    result["mesh"], result["mesh_setup"] = bench_mesh(
        _MESH.value, mesh_in, mesh_out, _TASKS.value, _MESH_PREFS.value, rng,
        _ITERS.value, _REPEATS.value, f.pattern)
    artifact.write_json(f.out, result)
  print(f"\ndevice: {device}   sparsity {_SPARSITY.value}")
  print(f"{'shape':>12} {'iters/s':>9} {'ADMM GF/s':>10} {'matmul GF/s':>12}"
        f" {'ratio':>6}")
  for r in rows:
    print(f"{r['n_in']:>5}x{r['n_out']:<6} {r['admm_iters_per_s']:9.2f} "
          f"{r['admm_gflops']:10.1f} {r['matmul_gflops']:12.1f} "
          f"{r['ratio_to_matmul']:6.2f}")
  for cmp in cmps:
    print(f"MOSP m={cmp['m']} K={cmp['K']} on {cmp['n_in']}x{cmp['n_out']}: "
          f"{cmp['mosp_s']:.2f} s vs one ALPS {cmp['alps_s']:.2f} s -> "
          f"ratio {cmp['ratio']:.2f} (naive front: {cmp['K']}x)" + (
              f"; with --core_rule=global {cmp['mosp_global_core_s']:.2f} s"
              f" -> ratio {cmp['ratio_global_core']:.2f}"
              if "ratio_global_core" in cmp else ""))
    stages = cmp.get("mosp_breakdown_s")
    print("  " + (("MOSP stages (s): " + ", ".join(
        f"{k} {v:.2f}" for k, v in stages.items()) + "; ") if stages else "")
          + f"iterations: stage 1 {cmp['mosp_stage1_iters']}, stage 2 "
          f"{cmp['mosp_stage2_iters']}, ALPS {cmp['alps_iters']}")
  if "mesh" in result:
    r, d = result["mesh"], result["mesh_setup"]
    print(f"mesh {d['spec']} ({r['devices']} devices), {d['n_in']}x"
          f"{d['n_out']}, m={d['m']}: iterate bytes/device "
          f"{r['bytes_per_device'] / 2**20:.1f} MiB vs one device "
          f"{r['single_device_bytes'] / 2**20:.1f} MiB; ADMM "
          f"{r['iter_s'] * 1e3:.0f} ms/iter vs {r['single_iter_s'] * 1e3:.0f}"
          f"; masks equal {r['masks_equal']}, max rel objective diff "
          f"{r['max_rel_objective_diff']:.1e}")
  print(f"wrote {f.out}")


if __name__ == "__main__":
  cli.run(main)
