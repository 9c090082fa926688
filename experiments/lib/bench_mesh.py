"""MOSP on a device mesh against one device (`python -m
experiments.bench_solvers --mesh=4`, its "mesh" record): the per-device
bytes of the ADMM iterates and their loop workspace (outputs +
temporaries of the compiled fixed-count ADMM loop, from XLA's memory
analysis) against one device, the time per ADMM iteration on both, and
whether full MOSP runs (pareto + materialize) give the same masks and
objectives on the mesh as on one device.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from experiments.lib.bench_problems import random_grams
from mosp_jax import timing
from mosp_jax.config import SolverConfig
from mosp_jax.solvers import (
  Pattern,
  concat_gram,
  mosp_prune,
  projection,
  relative_error,
  sharding,
)
from mosp_jax.solvers import alps as alps_lib
from mosp_jax.solvers.admm import eig
from mosp_jax.solvers.scaling import Scaled, scale_problem


def _memory(compiled: Any) -> dict[str, int]:
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


def bench_mesh(spec: str, n_in: int, n_out: int, m: int, K: int,
               rng: np.random.Generator, iters: int, repeats: int,
               pattern: Pattern) -> tuple[dict[str, Any], dict[str, Any]]:
  """MOSP on a device mesh vs one device: `("mesh" fields, details)`."""
  mesh = sharding.make_mesh(spec)
  if mesh is None:  # make_mesh('') is one device: nothing to compare.
    raise ValueError("bench_mesh needs a mesh spec ('4', '2x2'), got ''")
  sharding.check_layer(mesh, n_out)
  grams_np = random_grams(rng, m, n_in)
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


def _mesh_admm_loop(mesh: Mesh, grams: np.ndarray, W0: np.ndarray, *,
                    iters: int, repeats: int, pattern: Pattern
                    ) -> tuple[_Pair, _Pair]:
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
  (t_one, t_shd), _ = timing.best_times([lambda: one(*one_args),
                                         lambda: shd(*mesh_args)],
                                        repeats=repeats)
  return _Pair(mem_one, mem_shd), _Pair(t_one, t_shd)


def _mesh_mosp(mesh: Mesh, grams_np: np.ndarray, W0_np: np.ndarray,
               prefs_np: np.ndarray, *, pattern: Pattern
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


def _np(x: Any) -> np.ndarray:
  return np.asarray(jax.device_get(x))

