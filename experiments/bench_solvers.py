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
of them, so the ratio can exceed 1), and one exact top-k (the projection
of every ADMM iteration) against those two products. It then times MOSP
with m tasks and K preferences (its Pareto set, then the K models)
against one ALPS solve on the concatenated Gram of the same layer (the
paper's baseline; a naive front costs K ALPS solves), at each of
`--solve_shapes`: MOSP with the default settings without the preference
refit (`ratio`), the same with it (`ratio_refit`: what a run does), a
per-stage breakdown, and the paper's construction (`config.PAPER`,
`ratio_paper`; `--nopaper` skips it). Inputs are random correlated Grams
with uneven channel scales (shapes of SmolLM2-135M: 576 hidden, 1536
MLP; `--large` adds Llama-2-7B's linears to both measurements: 4096x4096
for q/k/v/o, 4096x11008 for gate/up, 11008x4096 for down).

Every timed function is compiled ahead (`jax.jit(...).lower().compile()`),
so no warm-up run is needed: at Llama-2-7B's shapes on a CPU one solve
takes minutes, and `--repeats=1` times each once.

With --mesh it also runs MOSP on a device mesh (`--mesh_layer`, m tasks;
`experiments.lib.bench_mesh`) and records under "mesh": the per-device
bytes of the ADMM iterates and their loop workspace against one device,
the time per ADMM iteration on both, and whether full MOSP runs give the
same masks and objectives on the mesh as on one device.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments.lib.bench_mesh import bench_mesh
from experiments.lib.bench_problems import compiled, random_grams, timed
from mosp_jax import cli, timing
from mosp_jax.config import DEFAULT, PAPER
from mosp_jax.pipeline import artifact
from mosp_jax.solvers import (
  ParetoLayer,
  Pattern,
  Unstructured,
  alps_prune,
  concat_gram,
  mosp_materialize,
  mosp_prune,
  projection,
  prune_mask,
  sharding,
)
from mosp_jax.solvers import alps as alps_lib
from mosp_jax.solvers import mosp as mosp_lib
from mosp_jax.solvers import pcg as pcg_lib
from mosp_jax.solvers.admm import eig, eig_solve, run_admm
from mosp_jax.solvers.scaling import scale_problem, scale_tasks

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
_PAPER = flags.DEFINE_bool(
    "paper", True, "Also time the paper's construction (config.PAPER: "
    "the dual core, 10 stage-2 iterations, no refit) beside the defaults "
    "(--nopaper skips it: at 11008x4096 it costs about 20 minutes on a "
    "2-core CPU).")
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



def bench_shape(n_in: int, n_out: int, rng: np.random.Generator, iters: int,
                repeats: int, pattern: Pattern) -> dict[str, Any]:
  """ADMM iterations/s and FLOP rate vs a plain matmul, same shapes."""
  grams = jax.device_put(random_grams(rng, 1, n_in))
  W0 = jax.device_put(rng.standard_normal((n_in, n_out), np.float32))
  cfg = DEFAULT
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

  def one_projection(B0):
    return project(B0[None])[0]

  (t_admm, t_mm, t_proj), _ = timing.best_times(
      [compiled(admm_fixed, Q, L, sc.G, sc.B0),
       compiled(matmuls, Q, L, sc.B0),
       compiled(one_projection, sc.B0)], repeats=repeats)
  flops_iter = 4.0 * n_in * n_in * n_out
  admm_gflops = flops_iter * iters / t_admm / 1e9
  mm_gflops = flops_iter / t_mm / 1e9
  return {"n_in": n_in, "n_out": n_out,
          "admm_iters_per_s": iters / t_admm,
          "admm_gflops": admm_gflops, "matmul_gflops": mm_gflops,
          "ratio_to_matmul": admm_gflops / mm_gflops,
          # One exact top-k (the projection of every ADMM iteration)
          # against the two products of one eigenbasis step.
          "step_s": t_mm, "projection_s": t_proj,
          "projection_to_step": t_proj / t_mm}


def bench_mosp_vs_alps(n_in: int, n_out: int, m: int, K: int,
                       rng: np.random.Generator, repeats: int,
                       pattern: Pattern, *, paper: bool = True,
                       breakdown: bool = True) -> dict[str, Any]:
  """MOSP (m tasks, K preferences) against one ALPS solve on the
  concatenated Gram, interleaved: the defaults without and with the
  preference refit; with `paper` also `config.PAPER`, with `breakdown`
  each stage of the defaults alone."""
  grams = jax.device_put(random_grams(rng, m, n_in))
  W0 = jax.device_put(rng.standard_normal((n_in, n_out), np.float32))
  prefs = jax.device_put(rng.dirichlet(np.ones(m), K).astype(np.float32))
  H = jax.jit(concat_gram)(grams)
  no_refit = dataclasses.replace(DEFAULT, pref_refit_iters=0)
  configs = [no_refit, DEFAULT] + ([PAPER] if paper else [])
  calls = [compiled(lambda h, w: alps_prune(h, w, pattern=pattern), H, W0)]
  calls += [compiled(functools.partial(
      lambda g, w, p, cfg: mosp_prune(g, w, p, pattern=pattern, cfg=cfg),
      cfg=cfg), grams, W0, prefs) for cfg in configs]
  with jax.transfer_guard("disallow"):
    times, outs = timing.best_times(calls, repeats=repeats)
  t_alps, t_mosp, t_refit = times[:3]
  (_, _, ainfo), res = outs[:2]
  out = {"n_in": n_in, "n_out": n_out, "m": m, "K": K,
         "alps_s": t_alps, "mosp_s": t_mosp, "ratio": t_mosp / t_alps,
         "mosp_refit_s": t_refit, "ratio_refit": t_refit / t_alps,
         "naive_front_ratio": float(K),
         "alps_iters": int(ainfo.admm.iters),
         "mosp_stage1_iters": int(res.info.stage1.iters),
         "mosp_stage2_iters": [int(i) for i in res.info.stage2.iters]}
  if paper:
    out["mosp_paper_s"] = times[3]
    out["ratio_paper"] = times[3] / t_alps
  if breakdown:
    out["mosp_breakdown_s"] = _mosp_breakdown(grams, W0, prefs, res.pareto,
                                              pattern, repeats)
  return out


def _mosp_breakdown(grams: jax.Array, W0: jax.Array, prefs: jax.Array,
                    pareto: ParetoLayer, pattern: Pattern, repeats: int
                    ) -> dict[str, float]:
  """Seconds spent in each stage of MOSP with the defaults, each compiled
  alone and fed the previous stage's output (one MOSP's work per
  repeat); `pareto` is the layer's Pareto set from the whole solve, for
  the preference models (`materialize`, then `refit` alone)."""
  cfg = DEFAULT
  n_in, n_out = W0.shape
  core_count = projection.core_count(pattern, n_in, n_out, cfg.alpha)
  dual = cfg.core_rule == "dual"
  t = functools.partial(timed, repeats=repeats)
  times = {}
  times["scale_eig"], (sc, (Q, L)) = t(
      lambda g, w: (lambda sc: (sc, eig(sc.G)))(
          scale_problem(concat_gram(g), w, damping=cfg.damping)), grams, W0)
  times["stage1_admm"], sup = t(
      lambda sc, Q, L: alps_lib.admm_support(
          sc, Q, L, pattern=pattern, rho0=cfg.rho0,
          update_every=cfg.update_every, max_iter=cfg.max_iter,
          core_count=core_count if dual else 0)[0], sc, Q, L)
  times["stage1_pcg"], X = t(lambda sc, sup: pcg_lib.masked_pcg(
      sc.G, sc.B0, sup.mask, sup.D, iters=cfg.pcg_iters)[0], sc, sup)
  if not dual:
    times["core"], core = t(lambda X, mask: projection.core_select(
        jnp.abs(X), pattern, core_count, mask), X, sup.mask)
    sup = sup._replace(core=core)
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
  no_refit = dataclasses.replace(cfg, pref_refit_iters=0)
  times["materialize"], (Wp, masks) = t(
      lambda par, p: mosp_materialize(par, p, pattern=pattern,
                                      cfg=no_refit), pareto, prefs)
  times["refit"], _ = t(
      lambda g, w, Wp, masks, p: mosp_lib.refit(
          g, w, Wp, masks, p, damping=jnp.float32(cfg.damping),
          iters=cfg.pref_refit_iters), grams, W0, Wp, masks, prefs)
  return times


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


def _print_summary(result: dict[str, Any]) -> None:
  """The measurements of `main`'s JSON record as a few lines of text."""
  print(f"\ndevice: {result['device']}   sparsity {result['sparsity']}")
  print(f"{'shape':>12} {'iters/s':>9} {'ADMM GF/s':>10} {'matmul GF/s':>12}"
        f" {'ratio':>6} {'top-k / step':>13}")
  for r in result["shapes"]:
    print(f"{r['n_in']:>5}x{r['n_out']:<6} {r['admm_iters_per_s']:9.2f} "
          f"{r['admm_gflops']:10.1f} {r['matmul_gflops']:12.1f} "
          f"{r['ratio_to_matmul']:6.2f} {r['projection_to_step']:13.2f}")
  for cmp in result["mosp_vs_alps"]:
    print(f"MOSP m={cmp['m']} K={cmp['K']} on {cmp['n_in']}x{cmp['n_out']}: "
          f"{cmp['mosp_s']:.2f} s vs one ALPS {cmp['alps_s']:.2f} s -> "
          f"ratio {cmp['ratio']:.2f} (naive front: {cmp['K']}x); with "
          f"the refit {cmp['mosp_refit_s']:.2f} s -> ratio "
          f"{cmp['ratio_refit']:.2f}" + (
              f"; the paper's construction {cmp['mosp_paper_s']:.2f} s"
              f" -> ratio {cmp['ratio_paper']:.2f}"
              if "ratio_paper" in cmp else ""))
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


def main(argv: list[str]) -> None:
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
        f.pattern, paper=_PAPER.value,
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
  _print_summary(result)
  print(f"wrote {f.out}")


if __name__ == "__main__":
  cli.run(main)
