"""The flags every command shares, and the one place they become configs.

`experiments.run`, `experiments.compare` and the tests import this module
(defining the flags once); each command adds only its own flags. Solver
flags default to `SolverConfig()` (the paper's settings) and are named
like its fields.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from absl import flags

from experiments.lib import runner
from mosp_jax import cli
from mosp_jax import data as data_lib
from mosp_jax.config import (
  CORE_RULES,
  DTYPES,
  PREF_MAPS,
  PREF_SUPPORTS,
  RunConfig,
  SolverConfig,
)
from mosp_jax.pipeline import preferences
from mosp_jax.solvers import NM, Pattern, Unstructured
from mosp_jax.solvers import sharding as sharding_lib

_D = SolverConfig()

# What is pruned, on which data.
flags.DEFINE_string("model", "smollm2-135m", "Model spec: 'smollm2-135m', a "
                    "local dir, a .gguf file, a hub id, 'tiny-llama', or "
                    "'random:<paper model>[:<n_layers>]' (random weights, "
                    "e.g. random:llama-2-7b:2).")
flags.DEFINE_list("tasks", ["general", "math", "pycode"], "Task sources "
                  "(general, math, pycode, c4, gsm8k, code) or .txt/.jsonl "
                  "paths, one per objective.")
flags.DEFINE_float("sparsity", 0.5, "Unstructured sparsity per linear, "
                   "in [0, 1).")
flags.DEFINE_string("nm", "", "N:M sparsity as 'N:M' (e.g. 2:4); overrides "
                    "--sparsity.")
flags.DEFINE_integer("nsamples", 128, "Calibration segments per task.")
flags.DEFINE_integer("seqlen", 2048, "Tokens per segment.")
flags.DEFINE_integer("test_tokens", 128 * 2048, "Test tokens per task.")
flags.DEFINE_integer("pref_grid", 2, "Preferences on the simplex grid with "
                     "this many steps per axis (vertices included).")
flags.DEFINE_bool("pref_centroid", True, "Add the balanced preference.")
flags.DEFINE_string("prefs", "", "Explicit preferences, ';'-separated, "
                    "each ','-separated weights (e.g. '0.5,0.25,0.25'); "
                    "replaces --pref_grid/--pref_centroid. Vertices are "
                    "always added.")
flags.DEFINE_enum("streams", "global", ["global", "task"], "Which pruned "
                  "model the calibration streams run through to the next "
                  "layer: global (MOSP's global model W, the ALPS-concat "
                  "baseline's own) or task (task i's stream through W_i) "
                  "[ours: the paper does not say].")
flags.DEFINE_integer("batch_size", 8, "Sequences per forward batch.")
flags.DEFINE_enum("dtype", "float32", list(DTYPES), "Device dtype of the "
                  "weights and activations of the walk; the Grams and "
                  "solvers compute in float32 either way [ours].")
flags.DEFINE_bool("offload_streams", False, "Keep the activation streams "
                  "in host memory between layers, one batch on the device "
                  "at a time (chosen by the plan when they do not fit on "
                  "the device) [ours].")
flags.DEFINE_bool("trust_pickle", False, "Allow a --model whose PyTorch "
                  "weights are pickled (*.bin): unpickling can run code, "
                  "so give it only for files you trust. Memory-mappable "
                  "pickles are converted tensor by tensor [ours].")
flags.DEFINE_integer("seed", 0, "Seed of the calibration windows.")
flags.DEFINE_string("out_dir", None, "Run directory (created).")
flags.DEFINE_bool("overwrite", False, "Start afresh in an --out_dir that "
                  "holds another run (its outputs are deleted). Without it, "
                  "the same configuration resumes and another is refused.")
# Solver hyperparameters: defaults are SolverConfig's (the paper's but for
# three of ours; configs/paper.flags sets the paper's).
flags.DEFINE_float("alpha", _D.alpha, "Share of the budget k in the shared "
                   "core S_c [paper 0.5].")
flags.DEFINE_float("p", _D.p, "Temperature of the preference map "
                   "lam' = T_p(lam) [paper 0.5]; 1 = plain interpolation.")
flags.DEFINE_enum("core_rule", _D.core_rule, list(CORE_RULES), "How "
                  "stage 1 chooses the core S_c: dual [paper-summary], the "
                  "dual ADMM's core channel; global [ours, default], the top "
                  "alpha k of |W| inside supp(W), stage 1 then one ALPS "
                  "solve.")
flags.DEFINE_enum("pref_map", _D.pref_map, list(PREF_MAPS), "Form of T_p "
                  "[ours; the paper's is not known]: power lam^(1/p), "
                  "normalized lam^(1/p) / sum.")
flags.DEFINE_float("rho0", _D.rho0, "Initial ADMM penalty of stage 1 and "
                   "ALPS [paper 0.1].")
flags.DEFINE_integer("update_every", _D.update_every,
                     "ADMM iterations between rho updates [paper 3].")
flags.DEFINE_integer("max_iter", _D.max_iter, "Stage-1 / ALPS ADMM cap "
                     "[ALPS 300].")
flags.DEFINE_float("stage2_rho", _D.stage2_rho, "Fixed stage-2 penalty "
                   "[paper 0.5].")
flags.DEFINE_integer("stage2_max_iter", _D.stage2_max_iter,
                     "Stage-2 ADMM cap [ours 5; paper-summary 10].")
flags.DEFINE_float("damping", _D.damping, "Ridge relative to mean diag "
                   "[paper 0.01].")
flags.DEFINE_integer("pcg_iters", _D.pcg_iters, "PCG iterations [paper "
                     "10].")
flags.DEFINE_integer("pref_refit_iters", _D.pref_refit_iters, "PCG "
                     "iterations refitting each interior preference model "
                     "on F_lam's Gram [ours, default 5; 0 = the paper's "
                     "construction, a weighted sum and projection]; the "
                     "Pareto set then keeps the task Grams (compact).")
flags.DEFINE_enum("pref_support", _D.pref_support, list(PREF_SUPPORTS),
                  "Support of a refitted preference model outside the "
                  "core: mix [paper-summary], the projected weighted sum; "
                  "own [ours], the same mix projected in the scale of the "
                  "preference's own Gram.")
# The plan (mosp_jax/pipeline/plan/): experiments.run's walk, and the
# MOSP walk of a whole-model experiments.compare.
flags.DEFINE_bool("plan", True, "Before loading the model, print the "
                  "run's memory and time plan (bytes per term, seconds per "
                  "phase from the config and the device's matmul rate "
                  "measured now) and refuse a run that does not fit.")
flags.DEFINE_bool("plan_only", False, "Print the plan and exit (0 when it "
                  "fits, 2 when not); loads no weights, writes nothing.")
flags.DEFINE_float("device_memory_gb", 0.0, "Device memory the plan may "
                   "use, in GiB (2^30 bytes); 0 = detect (the GPU "
                   "allocator's limit, or the host's MemAvailable on "
                   "CPU).")
flags.DEFINE_bool("plan_for_gpu", False, "With --plan_only and "
                  "--device_memory_gb: plan for a GPU of that memory from "
                  "this machine (the host copies of the weights and Grams "
                  "do not count against it; the seconds stay at this "
                  "machine's measured rates).")
# Devices: the mesh the per-layer solvers run on, and multi-host setup.
flags.DEFINE_string("mesh", "", "Device mesh of the per-layer solvers: '' "
                    "(one device), 'C' (output columns split over C "
                    "devices) or 'TxC' (tasks x columns), e.g. '4', '2x2'.")
flags.DEFINE_string("coordinator_address", "", "Multi-host: host:port of "
                    "process 0 (jax.distributed.initialize).")
flags.DEFINE_integer("num_processes", 1, "Multi-host: number of processes; "
                     "> 1 calls jax.distributed.initialize.")
flags.DEFINE_integer("process_id", 0, "Multi-host: this process's index.")

FLAGS = flags.FLAGS

# Flag name -> SolverConfig field (same names); checked by a test.
SOLVER_FLAGS = tuple(f.name for f in dataclasses.fields(SolverConfig))

# experiments.run's own flags that a shared flagfile may set
# (experiments/configs/quick.flags sets --export_pref): the other commands
# reading the same flagfile accept and ignore them.
RUN_ONLY_FLAGS = ("export_pref", "pause_after_layer", "pause_seconds")


def accepting_run_only_flags(argv: list[str]) -> list[str]:
  """`argv` with absl's `--undefok` for `RUN_ONLY_FLAGS`, for a command
  that reads experiments.run's flagfiles but does not define those flags
  (a misspelt flag is still refused)."""
  return [*argv, "--undefok=" + ",".join(RUN_ONLY_FLAGS)]


def _pattern(f) -> Pattern:
  if f.nm:
    try:
      n, m = (int(x) for x in f.nm.split(":"))
    except ValueError as e:
      raise cli.UsageError(f"--nm: expected 'N:M' with integers, got "
                           f"{f.nm!r}") from e
    with cli.usage_errors("--nm"):
      return NM(n, m)
  with cli.usage_errors("--sparsity"):
    return Unstructured(f.sparsity)


def _prefs(f, m: int) -> np.ndarray:
  if f.prefs:
    try:
      rows = [[float(x) for x in row.split(",")]
              for row in f.prefs.split(";") if row.strip()]
      prefs = np.asarray(rows, np.float32)
    except ValueError as e:
      raise cli.UsageError(f"--prefs: expected ';'-separated rows of ','-"
                           f"separated numbers, got {f.prefs!r}") from e
    with cli.usage_errors("--prefs"):
      preferences.check_prefs(prefs, m, flag="--prefs")
  else:
    if f.pref_grid < 1:
      raise cli.UsageError(f"--pref_grid must be >= 1, got {f.pref_grid}")
    prefs = preferences.simplex_grid(m, f.pref_grid)
    if f.pref_centroid:
      prefs = preferences.with_centroid(prefs)
  return preferences.ensure_vertices(prefs)


def check_task_flag(task: str) -> None:
  """A `--tasks` entry is a known source or an existing .txt/.jsonl file;
  raises UsageError otherwise (its contents are checked by
  `check_inputs`)."""
  if task in data_lib.SOURCES:
    return
  if not task.endswith((".txt", ".jsonl")):
    raise cli.UsageError(f"--tasks: unknown task {task!r}; known: "
                         f"{', '.join(data_lib.SOURCES)}, or a .txt/.jsonl "
                         "file")
  if not os.path.exists(task):
    raise cli.UsageError(f"--tasks: no file {task!r}")
  if not os.path.isfile(task):
    raise cli.UsageError(f"--tasks: {task!r} is a folder, not a .txt/.jsonl "
                         "file")


def configs_from_flags(f=FLAGS) -> tuple[RunConfig, SolverConfig]:
  """The one place flags become configs; a bad value raises
  `cli.UsageError` naming the flag."""
  cli.check_finite_flags(f)
  if not f.out_dir:
    raise cli.UsageError("--out_dir is required (the run directory)")
  try:
    solver = SolverConfig(**{name: getattr(f, name) for name in
                             SOLVER_FLAGS})
  except ValueError as e:
    raise cli.UsageError(f"--{e}") from e
  tasks = tuple(t.strip() for t in f.tasks if t.strip())
  if not tasks:
    raise cli.UsageError("--tasks: give at least one task")
  for t in tasks:
    check_task_flag(t)
  prefs = _prefs(f, len(tasks))
  try:
    run = RunConfig(
        model=f.model, tasks=tasks, pattern=_pattern(f),
        nsamples=f.nsamples, seqlen=f.seqlen, test_tokens=f.test_tokens,
        prefs=tuple(tuple(float(x) for x in r) for r in prefs),
        batch_size=f.batch_size, seed=f.seed, out_dir=f.out_dir,
        streams=f.streams, dtype=f.dtype, trust_pickle=f.trust_pickle)
  except cli.UsageError:
    raise
  except ValueError as e:
    raise cli.UsageError(f"--{e}") from e
  return run, solver


def device_memory_bytes(f=FLAGS) -> int | None:
  """--device_memory_gb in bytes; None = detect."""
  if f.plan_for_gpu and not (f.plan_only and f.device_memory_gb > 0):
    raise cli.UsageError("--plan_for_gpu: needs --plan_only and "
                         "--device_memory_gb (the GPU's memory)")
  if f.device_memory_gb < 0:
    raise cli.UsageError(f"--device_memory_gb must be >= 0 (0 = detect), "
                         f"got {f.device_memory_gb}")
  return int(f.device_memory_gb * 2**30) if f.device_memory_gb else None


def print_plan_if_asked(run: RunConfig, solver: SolverConfig, *,
                        memory_bytes: int | None, log=print,
                        f=FLAGS) -> bool:
  """--plan_only: the checks that need no weights, then the plan
  (`runner.plan_run`), and True, so the command returns; nothing is
  loaded or written. False without the flag."""
  if not f.plan_only:
    return False
  runner.check_inputs(run, weights=False)
  runner.plan_run(run, solver, memory_bytes=memory_bytes,
                  for_gpu=f.plan_for_gpu, offload_streams=f.offload_streams,
                  log=log)
  return True


def mesh_from_flags(f=FLAGS):
  """Starts multi-host JAX if asked, then builds the `--mesh` (None for
  one device). Must run before anything else uses JAX; errors name the
  flag."""
  with cli.usage_errors():
    sharding_lib.initialize_distributed(f.coordinator_address,
                                        f.num_processes, f.process_id)
  with cli.usage_errors("--mesh"):
    return sharding_lib.make_mesh(f.mesh)
