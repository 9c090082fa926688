"""The one source of truth for solver hyperparameters.

`SolverConfig()` holds the defaults: the paper's (MOSP, NeurIPS 2025; ALPS
for the shared ADMM machinery) in every field but three [ours]: the
preference refit (on, because without it every interior preference model
is dominated by the set's own global model), the core taken from the
global model's `|W|` and 5 stage-2 iterations (each as good at a third
less solve time); docs/METHOD_NOTES.md measures each. `PAPER` is the
paper's construction exactly. Everything else (flags, benchmarks, tests)
builds a config from here with `dataclasses.replace`, never with its own
literals.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # solvers import this module: no import cycle at run time.
  from mosp_jax.solvers.projection import Pattern

PREF_MAPS = ("power", "normalized")
CORE_RULES = ("dual", "global")
PREF_SUPPORTS = ("mix", "own")


@dataclasses.dataclass(frozen=True)
class SolverConfig:
  """Hyperparameters of the per-layer solvers (docs/METHOD_NOTES.md).

  Attributes:
    alpha: fraction of the budget `k` in the shared core `S_c`
      [paper 0.5].
    p: temperature of the preference map `lam' = T_p(lam)` [paper 0.5];
      `p = 1` is plain interpolation (the paper's ablation without it).
    core_rule: how stage 1 chooses the core `S_c`: 'dual'
      [paper-summary, `PAPER`], the second channel of stage 1's dual
      ADMM; 'global' [ours, default], the top `floor(alpha k)` of the
      global model's `|W|` (scaled units) inside `supp(W)`, so that
      stage 1 is one ALPS solve and the core costs a top-k.
    pref_map: the form of `T_p`, which the paper does not give [ours]:
      'power' `lam'_i = lam_i^(1/p)` (default; interior preferences lean
      toward the global model), 'normalized' `lam_i^(1/p) / sum_j
      lam_j^(1/p)`.
    rho0: initial ADMM penalty of stage 1 and ALPS, relative to the unit
      diagonal of the scaled Gram [paper 0.1, = ALPS].
    update_every: iterations between support checks and rho updates
      [paper eq. 50: 3].
    max_iter: iteration cap of stage 1 and ALPS [ALPS 300].
    stage2_rho: the fixed penalty of stage 2, relative to each task
      Gram's unit mean diagonal [paper 0.5].
    stage2_max_iter: iteration cap of stage 2 [ours 5; paper-summary
      10, `PAPER`].
    damping: ridge added to each Gram, relative to its mean diagonal
      [paper 0.01].
    pcg_iters: PCG iterations of the global and the task models
      [paper 10].
    pref_refit_iters: PCG iterations refitting each interior preference
      model's values on its support to `F_lam`'s Gram `H_lam` [ours,
      default 5: as good as 10 at 50%, 70% and 2:4, in less time;
      0 = the paper's weighted sum and projection, `PAPER`].
      Needs the task Grams at materialisation (a run stores them with its
      Pareto set, `pipeline.gram_store`); the task models (vertices) are
      left as they are.
    pref_support: the support of a refitted preference model outside the
      core: 'mix' (default) [paper-summary], the projection of the
      weighted sum in the concatenated Gram's scale; 'own' [ours], the
      same mix projected in the scale of the preference's own Gram
      `H_lam`. Read only under the refit.
  """
  alpha: float = 0.5
  p: float = 0.5
  core_rule: str = "global"
  pref_map: str = "power"
  rho0: float = 0.1
  update_every: int = 3
  max_iter: int = 300
  stage2_rho: float = 0.5
  stage2_max_iter: int = 5
  damping: float = 0.01
  pcg_iters: int = 10
  pref_refit_iters: int = 5
  pref_support: str = "mix"

  def __post_init__(self) -> None:
    checks = [
        ("alpha", 0.0 <= self.alpha <= 1.0, "in [0, 1]"),
        ("p", self.p > 0.0, "> 0"),
        ("core_rule", self.core_rule in CORE_RULES,
         f"one of {', '.join(CORE_RULES)}"),
        ("pref_map", self.pref_map in PREF_MAPS,
         f"one of {', '.join(PREF_MAPS)}"),
        ("rho0", self.rho0 > 0.0, "> 0"),
        ("update_every", self.update_every >= 1, ">= 1"),
        ("max_iter", self.max_iter >= 1, ">= 1"),
        ("stage2_rho", self.stage2_rho > 0.0, "> 0"),
        ("stage2_max_iter", self.stage2_max_iter >= 0, ">= 0"),
        ("damping", self.damping >= 0.0, ">= 0"),
        ("pcg_iters", self.pcg_iters >= 0, ">= 0"),
        ("pref_refit_iters", self.pref_refit_iters >= 0, ">= 0"),
        ("pref_support", self.pref_support in PREF_SUPPORTS,
         f"one of {', '.join(PREF_SUPPORTS)}"),
    ]
    for name, ok, expected in checks:
      if not ok:
        raise ValueError(
            f"{name} must be {expected}, got {getattr(self, name)!r}")


# The defaults: the paper's settings but for three of ours (above); the
# default of every solver entry point and flag.
DEFAULT = SolverConfig()
# The paper's construction exactly: the dual core, 10 stage-2 iterations,
# the projected mix without refit.
PAPER = dataclasses.replace(DEFAULT, core_rule="dual", stage2_max_iter=10,
                            pref_refit_iters=0)
# Device dtypes of the walk's weights and activations (`RunConfig.dtype`).
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """What a whole-model run prunes, on which data, and where it writes.

  Attributes:
    model: model spec for `bridge.hf_import.load_model` ('smollm2-135m', a
      local directory, a .gguf file, a hub id), 'tiny-llama' (a random
      2-layer Llama built from a config, for smoke tests) or
      'random:<paper model>[:<n_layers>]' (`models.paper_configs`).
    tasks: source names or .txt/.jsonl paths (`mosp_jax.data`), one per
      objective.
    pattern: `Unstructured(sparsity)` or `NM(n, m)` per linear.
    nsamples, seqlen: calibration segments per task.
    test_tokens: test tokens per task (cut into `seqlen` segments).
    prefs: `(K, m)` preferences of the models to build (vertices included).
    batch_size: sequences per forward batch.
    seed: calibration-window seed (the split and test set use seed 0).
    out_dir: the run directory.
    streams: which pruned model the calibration streams run through:
      'global' (MOSP's `W`, the default [ours]) or 'task' (task i's
      stream through `W_i`).
    dtype: device dtype of the weights and activations, 'float32' or
      'bfloat16' [ours; the Grams and solvers compute in float32 either
      way].
    trust_pickle: allow a model with pickled PyTorch weights (`*.bin`);
      unpickling can run code, so they are refused otherwise.
  """
  model: str
  tasks: tuple[str, ...]
  pattern: Pattern
  nsamples: int
  seqlen: int
  test_tokens: int
  prefs: tuple[tuple[float, ...], ...]
  batch_size: int
  seed: int
  out_dir: str
  streams: str = "global"
  dtype: str = "float32"
  trust_pickle: bool = False

  def __post_init__(self) -> None:
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
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
    if self.streams not in ("global", "task"):
      raise ValueError(f"streams must be 'global' or 'task', got "
                       f"{self.streams!r}")
    if self.test_tokens < self.seqlen:
      raise ValueError(f"test_tokens ({self.test_tokens}) must be at least "
                       f"seqlen ({self.seqlen})")
