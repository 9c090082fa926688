"""The one source of truth for solver hyperparameters.

`SolverConfig()` holds the paper's defaults (MOSP, NeurIPS 2025; ALPS for the
shared ADMM machinery). Everything else (flags, benchmarks, tests) builds a
config from here with `dataclasses.replace`, never with its own literals.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class SolverConfig:
  """Hyperparameters of the per-layer solvers.

  Attributes:
    alpha: fraction of the budget given to the shared core `S0` [paper 0.5].
    p: power-mean exponent of the core score; 0 = geometric mean [paper 0.5].
    rho0: initial ADMM penalty, relative to unit mean Gram diagonal
      [paper 0.1].
    update_every: iterations between support checks / rho updates [paper 3].
    max_iter: iteration cap of single-task ALPS and MOSP stage 1 [ALPS 300].
    stage2_rho: penalty MOSP stage 2 starts from [paper 0.5].
    stage2_adaptive: stage 2 raises rho by the same support-change schedule
      as stage 1 [ours, default]; False keeps it fixed at `stage2_rho` as
      the paper states, which oscillates in these units (METHOD_NOTES.md).
    stage2_max_iter: iteration cap of MOSP stage 2 [ours, = ALPS's cap].
    damping: ridge added to each Gram, relative to its mean diagonal
      [paper 0.01].
    pcg_iters: PCG refinement iterations [paper 10].
    pref_admm_iters: ADMM iterations on `H_lam` that re-choose each
      preference model's support outside the core after METHOD.md section
      5's assembly [ours; 0 = the paper's assembly]; see
      `solvers.mosp.assemble` and docs/METHOD_NOTES.md.
    pref_swap_rounds: support-swap rounds per preference model after the
      assembly [ours; 0 = the paper's]: a Jacobi-scaled gradient step on
      `H_lam`, the top of its saliency outside the core, PCG; the best
      model seen is kept, so never worse than the paper's assembly.
  """
  alpha: float = 0.5
  p: float = 0.5
  rho0: float = 0.1
  update_every: int = 3
  max_iter: int = 300
  stage2_rho: float = 0.5
  stage2_adaptive: bool = True
  stage2_max_iter: int = 300
  damping: float = 0.01
  pcg_iters: int = 10
  pref_admm_iters: int = 0
  pref_swap_rounds: int = 0

  def __post_init__(self):
    checks = [
        ("alpha", 0.0 <= self.alpha <= 1.0, "in [0, 1]"),
        ("p", self.p >= 0.0, ">= 0"),
        ("rho0", self.rho0 > 0.0, "> 0"),
        ("update_every", self.update_every >= 1, ">= 1"),
        ("max_iter", self.max_iter >= 1, ">= 1"),
        ("stage2_rho", self.stage2_rho > 0.0, "> 0"),
        ("stage2_max_iter", self.stage2_max_iter >= 1, ">= 1"),
        ("damping", self.damping >= 0.0, ">= 0"),
        ("pcg_iters", self.pcg_iters >= 0, ">= 0"),
        ("pref_admm_iters", self.pref_admm_iters >= 0, ">= 0"),
        ("pref_swap_rounds", self.pref_swap_rounds >= 0, ">= 0"),
    ]
    for name, ok, expected in checks:
      if not ok:
        raise ValueError(
            f"{name} must be {expected}, got {getattr(self, name)!r}")


# The paper's settings; the default of every solver entry point.
PAPER = SolverConfig()


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """What a whole-model run prunes, on which data, and where it writes.

  Attributes:
    model: model spec for `bridge.hf_import.load_model` ('smollm2-135m', a
      local directory, a .gguf file, a hub id) or 'tiny-llama' (a random
      2-layer Llama built from a config, for smoke tests).
    tasks: source names or .txt/.jsonl paths (`mosp_jax.data`), one per
      objective.
    pattern: `Unstructured(sparsity)` or `NM(n, m)` per linear.
    nsamples, seqlen: calibration segments per task.
    test_tokens: test tokens per task (cut into `seqlen` segments).
    prefs: `(K, m)` preferences of the models to build (vertices included).
    batch_size: sequences per forward batch.
    seed: calibration-window seed (the split and test set use seed 0).
    out_dir: the run directory.
  """
  model: str
  tasks: tuple[str, ...]
  pattern: object
  nsamples: int
  seqlen: int
  test_tokens: int
  prefs: tuple[tuple[float, ...], ...]
  batch_size: int
  seed: int
  out_dir: str

  def __post_init__(self):
    if len(self.tasks) < 1:
      raise ValueError("tasks: give at least one task")
    if len(set(self.tasks)) != len(self.tasks):
      raise ValueError(f"tasks: duplicate names in {list(self.tasks)}")
    for name, value in (("nsamples", self.nsamples),
                        ("seqlen", self.seqlen),
                        ("test_tokens", self.test_tokens),
                        ("batch_size", self.batch_size)):
      if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if self.test_tokens < self.seqlen:
      raise ValueError(f"test_tokens ({self.test_tokens}) must be at least "
                       f"seqlen ({self.seqlen})")
