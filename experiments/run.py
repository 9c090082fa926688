r"""Prune a model for several tasks with MOSP and evaluate its Pareto set.

  python -m experiments.run --flagfile=experiments/configs/quick.flags
  python -m experiments.run --flagfile=experiments/configs/smoke.flags \
      --out_dir=/tmp/smoke

Writes into --out_dir: flags.txt (the resolved flags), results.json,
report.md, pareto.png and pareto/ (the compact Pareto set: per linear the
core support, the global and the task models and the column scale, from
which any preference is materialised later with no Gram and no solve, e.g.
by `python -m bridge.export`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import shutil
import sys
import time

import jax
import numpy as np
from absl import flags, logging

from bridge import pruned as bridge_pruned
from mosp_jax import cli
from mosp_jax import data as data_lib
from mosp_jax.config import PREF_MAPS, RunConfig, SolverConfig
from mosp_jax.pipeline import artifact, front_plot, preferences
from mosp_jax.pipeline.checkpoint import LayerCheckpoint
from mosp_jax.pipeline.prune import prune_and_evaluate
from mosp_jax.solvers import NM, Unstructured
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
flags.DEFINE_integer("seed", 0, "Seed of the calibration windows.")
flags.DEFINE_string("out_dir", None, "Run directory (created).")
flags.DEFINE_bool("overwrite", False, "Start afresh in an --out_dir that "
                  "holds another run (its outputs are deleted). Without it, "
                  "the same configuration resumes and another is refused.")
flags.DEFINE_integer("pause_after_layer", -1, "Debug: sleep "
                     "--pause_seconds after checkpointing this layer (to "
                     "test preemption).")
flags.DEFINE_float("pause_seconds", 0.0, "See --pause_after_layer.")
flags.DEFINE_string("export_pref", "none", "After the run, export this "
                    "preference ('centroid' or weights, e.g. 0.5,0.25,0.25; "
                    "'none': skip) to <out_dir>/export_<pref>/ as a PyTorch "
                    "checkpoint and check its parity "
                    "(bridge.parity_check); the result goes to "
                    "results.json['export'].")
# Solver hyperparameters: defaults are SolverConfig's (the paper's).
flags.DEFINE_float("alpha", _D.alpha, "Share of the budget k in the shared "
                   "core S_c [paper 0.5].")
flags.DEFINE_float("p", _D.p, "Temperature of the preference map "
                   "lam' = T_p(lam) [paper 0.5]; 1 = plain interpolation.")
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
                     "Stage-2 ADMM cap [paper-summary 10].")
flags.DEFINE_float("damping", _D.damping, "Ridge relative to mean diag "
                   "[paper 0.01].")
flags.DEFINE_integer("pcg_iters", _D.pcg_iters, "PCG iterations [paper "
                     "10].")
flags.DEFINE_integer("pref_refit_iters", _D.pref_refit_iters, "PCG "
                     "iterations refitting each interior preference model "
                     "on F_lam's Gram [ours; 0 = the paper's weighted sum "
                     "and projection]; the artifact then keeps the task "
                     "Grams.")
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


def _pattern(f) -> object:
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
        streams=f.streams)
  except cli.UsageError:
    raise
  except ValueError as e:
    raise cli.UsageError(f"--{e}") from e
  return run, solver


def mesh_from_flags(f=FLAGS):
  """Starts multi-host JAX if asked, then builds the `--mesh` (None for
  one device). Must run before anything else uses JAX; errors name the
  flag."""
  with cli.usage_errors():
    sharding_lib.initialize_distributed(f.coordinator_address,
                                        f.num_processes, f.process_id)
  with cli.usage_errors("--mesh"):
    return sharding_lib.make_mesh(f.mesh)


CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
CHECKPOINT_DIR = "checkpoint"
# What a run writes into --out_dir; --overwrite deletes only these (and
# the export_<preference>/ folders of --export_pref).
RUN_OUTPUTS = (CONFIG_FILE, "flags.txt", RESULTS_FILE, "report.md",
               "pareto.png", "pareto", CHECKPOINT_DIR)
EXPORT_PREFIX = "export_"


def config_record(run: RunConfig, solver: SolverConfig) -> dict:
  """The configuration a run directory belongs to (JSON-normalised)."""
  rec = dataclasses.asdict(run)
  rec.pop("out_dir")
  rec["pattern"] = {"kind": type(run.pattern).__name__,
                    **dataclasses.asdict(run.pattern)}
  rec["solver"] = dataclasses.asdict(solver)
  return json.loads(json.dumps(rec))


def check_run_dir(run: RunConfig, solver: SolverConfig, *,
                  overwrite: bool) -> tuple[pathlib.Path, bool]:
  """Checks --out_dir without writing anything; returns `(path,
  resuming)`.

  A directory holding a run of the same configuration is resumed; one
  holding anything else is refused (`cli.UsageError`) unless `overwrite`.
  """
  out = cli.check_out_dir(run.out_dir, flag="--out_dir")
  if not (out.is_dir() and any(out.iterdir())) or overwrite:
    return out, False
  cfg = out / CONFIG_FILE
  try:
    prev = json.loads(cfg.read_text()) if cfg.is_file() else None
  except (OSError, ValueError):
    prev = None
  record = config_record(run, solver)
  if prev == record:
    return out, True
  if not isinstance(prev, dict):
    raise cli.UsageError(f"--out_dir {out} is not empty and holds no run; "
                         "choose a new directory or pass --overwrite")
  diff = sorted(k for k in set(prev) | set(record)
                if prev.get(k) != record.get(k))
  raise cli.UsageError(f"--out_dir {out} holds a run with another "
                       f"configuration (differs in: {', '.join(diff)}); "
                       "pass --overwrite or choose a new directory")


def run_outputs(out: pathlib.Path) -> list[pathlib.Path]:
  """Every output of a run in `out` (what --overwrite deletes)."""
  found = [out / name for name in RUN_OUTPUTS if (out / name).exists()]
  return found + sorted(p for p in out.glob(f"{EXPORT_PREFIX}*")
                        if p.is_dir())


def start_run_dir(run: RunConfig, solver: SolverConfig, *, overwrite: bool,
                  resuming: bool) -> pathlib.Path:
  """Makes --out_dir the run's: deletes the previous run's outputs when
  `overwrite`, creates it and writes its `config.json` (kept when
  resuming). Call it once the inputs are validated, so that a run refused
  by validation leaves nothing behind."""
  out = pathlib.Path(run.out_dir)
  if overwrite:
    for p in run_outputs(out):
      if p.is_dir():
        shutil.rmtree(p)
      else:
        p.unlink()
  out.mkdir(parents=True, exist_ok=True)
  if not resuming:
    artifact.write_json(out / CONFIG_FILE, config_record(run, solver))
  return out


def prepare_run_dir(run: RunConfig, solver: SolverConfig, *,
                    overwrite: bool) -> tuple[pathlib.Path, bool]:
  """`check_run_dir`, then `start_run_dir`; returns `(path, resuming)`."""
  out, resuming = check_run_dir(run, solver, overwrite=overwrite)
  start_run_dir(run, solver, overwrite=overwrite, resuming=resuming)
  return out, resuming


_NOTHING_REDONE = ("{out} already holds this run's results; nothing was "
                   "redone (--overwrite redoes the run)")


def is_finished(out: pathlib.Path, resuming: bool) -> bool:
  """Whether --out_dir already holds the complete results of this
  configuration (nothing to redo)."""
  return (resuming and (out / RESULTS_FILE).exists()
          and not (out / CHECKPOINT_DIR).exists())


TINY_LLAMA = bridge_pruned.TINY_LLAMA
TINY_LLAMA_CONTEXT = 2048
TINY_LLAMA_LAYERS = 2


def model_shape(spec: str) -> tuple[int | None, int | None]:
  """`(context tokens, decoder layers)` of a model spec, read from its
  config alone (None where the config does not say); `cli.UsageError`
  when --model names no file, or a `random:` spec that is unknown, has a
  bad layer count or is over the memory limit of random models."""
  if spec == TINY_LLAMA:
    return TINY_LLAMA_CONTEXT, TINY_LLAMA_LAYERS
  from mosp_jax.models import paper_configs
  with cli.usage_errors("--model"):
    random_spec = paper_configs.parse_random_spec(spec)
    if random_spec is not None:  # A config without weights: check its size.
      paper_configs.check_random_spec(random_spec)
      config = random_spec.config()
      return config.max_position_embeddings, random_spec.num_layers
  from bridge import hf_import
  try:
    config = hf_import.load_config(spec)
  except FileNotFoundError as e:
    raise cli.UsageError(f"--model: {e}") from e
  context = (getattr(config, "max_position_embeddings", None)
             or getattr(config, "n_positions", None))
  layers = (getattr(config, "num_hidden_layers", None)
            or getattr(config, "n_layer", None))
  return context, layers


def check_model_fits(run: RunConfig) -> None:
  """Fails fast (`cli.UsageError`) when --model names no file or --seqlen
  exceeds the model's context; reads the model config only."""
  context, _ = model_shape(run.model)
  if context is not None and run.seqlen > context:
    raise cli.UsageError(f"--seqlen {run.seqlen} exceeds the context of "
                         f"{run.model} ({context} tokens)")


def check_inputs(run: RunConfig) -> None:
  """Validates what can be validated before any tokenizer or model is
  loaded: the model's context against --seqlen (`cli.UsageError`) and
  every local task file (readable, UTF-8, enough documents; ValueError
  naming the file)."""
  for task in run.tasks:
    if task not in data_lib.SOURCES:
      data_lib.check_task(task)
  check_model_fits(run)


load_tokenizer = bridge_pruned.load_tokenizer
load_model = bridge_pruned.load_dense


def load_data(run: RunConfig, tokenizer
              ) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Per task, `(nsamples, seqlen)` calibration and `(n_test, seqlen)`
  test segments, int32, every task cut to the same number of test
  segments; a ValueError names the task that is too small."""
  calib, test = [], []
  for task in run.tasks:
    td = data_lib.load_task(task, tokenizer, nsamples=run.nsamples,
                            seqlen=run.seqlen, test_tokens=run.test_tokens,
                            seed=run.seed)
    calib.append(td.calib)
    test.append(td.test)
  n_test = min(t.shape[0] for t in test)
  return calib, [t[:n_test] for t in test]


def _report(run: RunConfig, res, sparsity: list[float], seconds: dict,
            info: dict) -> str:
  tasks = list(run.tasks)
  lines = [f"# MOSP run: {run.model}, {run.pattern}", "",
           f"Tasks: {', '.join(tasks)}. Calibration {run.nsamples} x "
           f"{run.seqlen} tokens per task; test {info['test_segments']} "
           f"segments of {run.seqlen} tokens per task.", "",
           "Perplexity (lower is better); bold = best preference model on "
           "that task. The global model W (stage 1: ALPS on the "
           "concatenated calibration data) is part of the Pareto set.", "",
           "| preference | " + " | ".join(tasks) + " | sparsity |",
           "|---" * (len(tasks) + 2) + "|",
           "| dense | " + " | ".join(f"{x:.2f}" for x in res.dense_ppl)
           + " | 0 |"]
  best = res.ppl.argmin(axis=0)
  for p, (pref, row) in enumerate(zip(res.prefs, res.ppl, strict=True)):
    cells = [f"**{x:.2f}**" if best[t] == p else f"{x:.2f}"
             for t, x in enumerate(row)]
    lines.append("| " + preferences.format_pref(pref) + " | "
                 + " | ".join(cells) + f" | {sparsity[p]:.3f} |")
  lines.append("| global model W | " + " | ".join(
      f"{x:.2f}" for x in res.global_ppl) + f" | {run.pattern.sparsity:.3f}"
               " |")
  lines += ["", "Wall time (s): " + ", ".join(
      f"{k} {v:.1f}" for k, v in seconds.items()), "",
            "![fronts](pareto.png)", ""]
  return "\n".join(lines)


def run_experiment(run: RunConfig, solver: SolverConfig, *,
                   overwrite: bool = False, log=print,
                   on_layer_done=None,
                   mesh: jax.sharding.Mesh | None = None) -> dict:
  """Runs the whole job, resuming a killed run of the same configuration;
  returns the results dict also written to disk.

  Everything that can be checked (flags, --out_dir, task files, the
  tokenised data) is checked before --out_dir is touched or the model is
  loaded, and a model that fails to load takes its config.json back, so
  a refused run leaves nothing that blocks the corrected one.

  Raises:
    cli.UsageError: --out_dir holds another run, --seqlen is too long.
    ValueError, OSError, ...: a task file or the model cannot be used.
  """
  out, resuming = check_run_dir(run, solver, overwrite=overwrite)
  if is_finished(out, resuming):
    log(_NOTHING_REDONE.format(out=out))
    return json.loads((out / RESULTS_FILE).read_text())
  check_inputs(run)
  t0 = time.perf_counter()
  log(f"loading the tokenizer and {len(run.tasks)} tasks ...")
  tokenizer = load_tokenizer(run.model)
  calib, test = load_data(run, tokenizer)
  n_test = test[0].shape[0]
  t_data = time.perf_counter() - t0
  existed = out.exists()
  start_run_dir(run, solver, overwrite=overwrite, resuming=resuming)
  log(f"loading the model {run.model} ...")
  try:
    adapter, params, tokenizer = load_model(run.model, tokenizer)
  except BaseException:
    if not resuming:  # A model that cannot be loaded claims no run dir.
      (out / CONFIG_FILE).unlink(missing_ok=True)
      if not existed and not any(out.iterdir()):
        out.rmdir()
    raise
  dense_sha256 = bridge_pruned.params_sha256(params)
  params = jax.device_put(params)
  t_model = time.perf_counter() - t0 - t_data
  n_layers = adapter.num_layers(params)
  log(f"model {run.model}: {n_layers} layers; data: "
      f"{len(run.tasks)} tasks x ({run.nsamples} calibration, {n_test} "
      f"test) x {run.seqlen} tokens; {len(run.prefs)} models")
  log(f"pruning {n_layers} layers (layer 1 also compiles; the ETA counts "
      "from layer 2 on) ...")
  prefs = np.asarray(run.prefs, np.float32)
  checkpoint = LayerCheckpoint(out / CHECKPOINT_DIR)
  with jax.transfer_guard("disallow"):
    res = prune_and_evaluate(
        adapter, params, calib, test, prefs, pattern=run.pattern, cfg=solver,
        batch_size=run.batch_size, streams=run.streams,
        artifact_dir=str(out / "pareto"),
        checkpoint=checkpoint, log=log, on_layer_done=on_layer_done,
        mesh=mesh)
  sparsity = res.sparsity.tolist()
  seconds = {"load_model": t_model, "load_data": t_data, **res.seconds,
             "wall": time.perf_counter() - t0}
  artifact.write_json(out / "pareto" / artifact.META, {
      "model": run.model, "tasks": list(run.tasks),
      "pattern": dataclasses.asdict(run.pattern) | {
          "kind": type(run.pattern).__name__},
      "solver": dataclasses.asdict(solver), "prefs": prefs.tolist(),
      "num_layers": len(res.layers),
      "groups": adapter.linear_groups(), "dense_sha256": dense_sha256})
  results = {
      "model": run.model, "sparsity": run.pattern.sparsity,
      "pattern": str(run.pattern), "tasks": list(run.tasks),
      "dense_ppl": dict(zip(run.tasks, res.dense_ppl.tolist(), strict=True)),
      "models": [{"preference": pref.tolist(),
                  "ppl": dict(zip(run.tasks, row.tolist(), strict=True)),
                  "sparsity": s}
                 for pref, row, s in zip(res.prefs, res.ppl, sparsity,
                                         strict=True)],
      "global_model": {"ppl": dict(zip(run.tasks, res.global_ppl.tolist(),
                                       strict=True))},
      "timings": seconds, "layers": res.layers,
      "solver": dataclasses.asdict(solver),
      "test": {"segments": n_test, "seqlen": run.seqlen, "sha256": {
          task: bridge_pruned.segments_sha256(t)
          for task, t in zip(run.tasks, test, strict=True)}}}
  artifact.write_json(out / RESULTS_FILE, results)
  artifact.write_text(out / "report.md", _report(
      run, res, sparsity, seconds, {"test_segments": n_test}))
  front_plot.plot_fronts(out / "pareto.png", list(run.tasks), res.prefs,
                     res.ppl, res.dense_ppl,
                     title=f"{run.model}, {run.pattern}",
                     extra={"global model W": res.global_ppl[None]})
  checkpoint.remove()  # results are complete; the artifact stays
  return results


def summary_lines(res: dict) -> list[str]:
  """The console summary of a run's results: PPL per model and timings."""
  tasks = res["tasks"]
  rows = [("dense", [res["dense_ppl"][t] for t in tasks])]
  rows += [(preferences.format_pref(m["preference"]),
            [m["ppl"][t] for t in tasks]) for m in res["models"]]
  rows.append(("global model W", [res["global_model"]["ppl"][t]
                                  for t in tasks]))
  w = max(len("preference"), *(len(r[0]) for r in rows))
  cols = [max(10, len(t)) for t in tasks]
  lines = ["perplexity (lower is better):",
           "  " + "preference".ljust(w) + "".join(
               f"  {t:>{c}}" for t, c in zip(tasks, cols, strict=True))]
  lines += ["  " + label.ljust(w) + "".join(
      f"  {x:>{c}.2f}" for x, c in zip(vals, cols, strict=True))
            for label, vals in rows]
  lines.append("seconds: " + ", ".join(
      f"{k} {v:.1f}" for k, v in res["timings"].items()))
  return lines


def main(argv):
  del argv  # cli.run refuses positional arguments.
  log = functools.partial(print, flush=True)
  mesh = mesh_from_flags()
  run, solver = configs_from_flags()
  if FLAGS.export_pref != "none":  # Fail before the run, not after.
    with cli.usage_errors("--export_pref"):
      bridge_pruned.parse_preference(FLAGS.export_pref, run.tasks,
                                     flag="--export_pref")
  logging.info("run config: %s", run)
  logging.info("solver config: %s", solver)
  logging.info("solver mesh: %s", mesh and dict(mesh.shape))

  def pause(layer: int) -> None:
    if layer == FLAGS.pause_after_layer:
      time.sleep(FLAGS.pause_seconds)

  out, resuming = check_run_dir(run, solver, overwrite=FLAGS.overwrite)
  if is_finished(out, resuming):
    log(_NOTHING_REDONE.format(out=out))
  else:
    # Bad input and non-finite numbers end the run with one `error:` line
    # (cli.run); what was already written (artifact layers, checkpoint)
    # stays valid, and the same command resumes.
    res = run_experiment(run, solver, overwrite=FLAGS.overwrite, log=log,
                         on_layer_done=pause, mesh=mesh)
    artifact.write_text(out / "flags.txt", FLAGS.flags_into_string())
    log("\n".join(summary_lines(res)))
    log(f"wrote {out}/results.json, report.md, pareto.png, pareto/")
  if FLAGS.export_pref != "none":
    export_and_check(out, FLAGS.export_pref)


def export_and_check(out: pathlib.Path, pref: str) -> None:
  """--export_pref: export + parity into results.json; exits 1 on failure.
  Skipped when results.json already records a passing export of `pref`."""
  from bridge import parity_check
  res = json.loads((out / RESULTS_FILE).read_text())
  tag = bridge_pruned.preference_tag(pref)
  done = res.get("export") or {}
  if (done.get("ok") and pathlib.Path(done.get("checkpoint", "")).name
      == f"{EXPORT_PREFIX}{tag}" and (out / f"{EXPORT_PREFIX}{tag}").is_dir()):
    print(f"{out / (EXPORT_PREFIX + tag)} already passed its parity check; "
          "nothing was redone", flush=True)
    return
  print(f"exporting preference {pref} and checking its parity ...",
        flush=True)
  res["export"] = parity_check.export_and_check(
      out, pref, log=functools.partial(print, flush=True))
  artifact.write_json(out / RESULTS_FILE, res)
  if not res["export"]["ok"]:
    sys.exit(cli.EXIT_FAILURE)


if __name__ == "__main__":
  cli.run(main)
