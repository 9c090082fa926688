"""Study: how MOSP builds a preference model from the Pareto layer.

METHOD.md section 5 picks a preference's support outside the core as the
top of the preference-weighted task saliencies and refines it with PCG on
`H_lam`. On SmolLM2 layer 15 that leaves interior preferences 8-11% above
ALPS-mixed's `F_lam`. This study compares, on the cached Grams of one real
layer (the layer-level compare's cache; it is captured on the first run):

- `paper`: METHOD.md section 5 (`mosp_materialize`, the default);
- `swapN`: then N support-swap rounds per preference [ours;
  `SolverConfig.pref_swap_rounds`];
- `admmN`: then at most N ADMM iterations on `H_lam` per preference, core
  frozen [ours; `SolverConfig.pref_admm_iters`];
- `alps`: ALPS on `H_lam`, one full run per preference (the baseline).

Prints `F_lam` per preference (mean over the linears) relative to ALPS's,
and solve seconds, all measured in one run (results in
docs/METHOD_NOTES.md, preference support refinement):

    python -m experiments.study_assembly \
      --flagfile=experiments/configs/quick.flags --out_dir=/tmp/study \
      --variants=paper,swap1,swap3,admm10 [--sparsity=0.7]
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from absl import app, flags

from experiments import layer_compare
from experiments import run as run_lib
from mosp_jax.solvers import (
  alps_prune,
  mixed_gram,
  mosp_materialize,
  mosp_pareto,
)

flags.DEFINE_list("variants", ["paper", "admm10", "swap3"], "Assemblies "
                  "to compare: paper, admmN (pref_admm_iters=N), swapN "
                  "(pref_swap_rounds=N).")
flags.DEFINE_list("study_linears", [], "Linears (default all).")
flags.DEFINE_integer("layer", -1, "Layer (-1: the middle one).")
FLAGS = flags.FLAGS

_mix = jax.jit(mixed_gram)


def _f_lam(G, W0, W, prefs):
  """`(P,)` preference objective `sum_i lam_i f_i` of each model."""
  E = W - W0[None]
  num = np.einsum("pio,mij,pjo->pm", E, G, E)
  den = np.einsum("io,mij,jo->m", W0, G, W0)
  return np.sum(prefs * num / den[None], axis=1)


def _variant(solver, name: str):
  for prefix, field in (("admm", "pref_admm_iters"),
                        ("swap", "pref_swap_rounds")):
    if name.startswith(prefix):
      return dataclasses.replace(solver, **{field: int(name[len(prefix):])})
  if name != "paper":
    raise ValueError(f"--variants: unknown {name!r}")
  return solver


def main(argv):
  del argv
  run, solver = run_lib.configs_from_flags()
  prob = layer_compare.capture_layer(run, FLAGS.layer)
  prefs = np.asarray(run.prefs, np.float32)
  names = FLAGS.study_linears or [n for g in prob.groups for n in g]
  variants = {v: _variant(solver, v) for v in FLAGS.variants}
  f = {v: [] for v in [*variants, "alps"]}
  secs = dict.fromkeys(f, 0.0)
  for name in names:
    G = jax.device_put(prob.calib[prob.group_of(name)])
    W0 = jax.device_put(prob.kernels[name])
    Gh, W0h = np.asarray(G, np.float64), np.asarray(W0, np.float64)
    for rep in range(2):  # The first pass compiles.
      for v, cfg in variants.items():
        t0 = time.perf_counter()
        par, _ = mosp_pareto(G, W0, pattern=run.pattern, cfg=cfg)
        W = jax.block_until_ready(mosp_materialize(
            G, W0, par, jax.device_put(prefs), pattern=run.pattern,
            cfg=cfg)[0])
        if rep:
          secs[v] += time.perf_counter() - t0
          f[v].append(_f_lam(Gh, W0h, np.asarray(W, np.float64), prefs))
      t0 = time.perf_counter()
      Ws = [alps_prune(_mix(G, W0, jax.device_put(lam)), W0,
                       pattern=run.pattern, cfg=solver)[0] for lam in prefs]
      W = jax.block_until_ready(np.stack(jax.device_get(Ws)))
      if rep:
        secs["alps"] += time.perf_counter() - t0
        f["alps"].append(_f_lam(Gh, W0h, np.asarray(W, np.float64), prefs))
    print(name, {v: np.round(x[-1] / f["alps"][-1], 3).tolist()
                 for v, x in f.items()}, flush=True)
  ref = np.mean(f["alps"], axis=0)
  print(f"\n{run.model} layer {prob.layer}, {run.pattern}, linears "
        f"{names}\nF_lam (mean over linears) / ALPS-mixed's, per preference "
        f"{prefs.tolist()}; seconds over all linears:")
  for v, x in f.items():
    r = np.mean(x, axis=0) / ref
    print(f"{v:>8}: " + " ".join(f"{a:.3f}" for a in r)
          + f" | interior mean {np.mean(r[prefs.max(1) < 1]):.3f} | "
          f"{secs[v]:.1f} s")


if __name__ == "__main__":
  app.run(main)
