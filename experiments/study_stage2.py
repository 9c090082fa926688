r"""Stage-2 variants of MOSP on one layer: paper's fixed rho vs ours.

  python -m experiments.study_stage2 [--n_in=576 --n_out=768]

Prints, per sparsity, each task vertex's relative reconstruction error
(METHOD.md f_i) for: no stage 2, the paper's fixed rho = 0.5 (with the cap),
and the default (start at 0.5, then the support-change schedule), next to
single-task ALPS (each task's best case). Also the stage-2 iterations and
the last support change per iteration as a fraction of the budget.
Synthetic correlated Grams (the benchmark's); see docs/METHOD_NOTES.md.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments.bench_solvers import _grams
from mosp_jax.config import PAPER
from mosp_jax.solvers import Unstructured, alps_prune, relative_error
from mosp_jax.solvers import mosp as mosp_lib
from mosp_jax.solvers.admm import eig
from mosp_jax.solvers.scaling import scale_problem

_N_IN = flags.DEFINE_integer("n_in", 576, "Layer inputs.")
_N_OUT = flags.DEFINE_integer("n_out", 768, "Layer outputs.")
_SPARSITIES = flags.DEFINE_list("sparsities", ["0.5", "0.7"], "Sparsities.")


def vertex_errors(grams, W0, pattern, cfg, stage2: bool):
  m = grams.shape[0]

  @jax.jit
  def run(grams, W0):
    sc = scale_problem(grams, W0, damping=cfg.damping)
    Q, L = eig(sc.G)
    core, it, _ = mosp_lib.stage1(
        sc, Q, L, pattern=pattern, alpha=cfg.alpha, p=cfg.p, rho0=cfg.rho0,
        update_every=cfg.update_every, max_iter=cfg.max_iter)
    info = None
    if stage2:
      it, info = mosp_lib.stage2(
          sc, Q, L, core, it, pattern=pattern, alpha=cfg.alpha,
          rho=cfg.stage2_rho, adaptive=cfg.stage2_adaptive,
          update_every=cfg.update_every, max_iter=cfg.stage2_max_iter)
    X, _, _ = mosp_lib.assemble(sc, core, it.D, jnp.eye(m), pattern=pattern,
                                alpha=cfg.alpha, pcg_iters=cfg.pcg_iters)
    W = X / sc.d[None, :, None]
    errs = jnp.stack([relative_error(grams[i], W0, W[i]) for i in range(m)])
    return errs, info

  errs, info = run(grams, W0)
  return np.asarray(errs), info


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  grams = jnp.asarray(_grams(rng, 3, _N_IN.value))
  W0 = jnp.asarray(rng.standard_normal((_N_IN.value, _N_OUT.value),
                                       np.float32))
  variants = [
      ("no stage 2", PAPER, False),
      ("paper: fixed rho 0.5, cap 100",
       dataclasses.replace(PAPER, stage2_adaptive=False,
                           stage2_max_iter=100), True),
      ("ours: from 0.5 + schedule", PAPER, True),
  ]
  for s in map(float, _SPARSITIES.value):
    pattern = Unstructured(s)
    k = pattern.keep(_N_IN.value, _N_OUT.value)
    alps = [float(relative_error(grams[i], W0,
                                 alps_prune(grams[i], W0,
                                            pattern=pattern)[0]))
            for i in range(3)]
    print(f"\nsparsity {s}: layer {_N_IN.value}x{_N_OUT.value}, 3 tasks")
    print(f"  {'single-task ALPS (best case)':34} "
          f"{' '.join(f'{e:.4f}' for e in alps)}")
    for name, cfg, st2 in variants:
      errs, info = vertex_errors(grams, W0, pattern, cfg, st2)
      extra = ""
      if info is not None:
        extra = (f"  iters {np.asarray(info.iters).tolist()}  last s/k "
                 f"{np.round(np.asarray(info.supp_change) / k, 4).tolist()}")
      print(f"  {name:34} {' '.join(f'{e:.4f}' for e in errs)}{extra}")


if __name__ == "__main__":
  app.run(main)
