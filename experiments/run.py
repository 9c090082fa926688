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
import json
import os
import pathlib
import shutil
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging

from mosp_jax import data as data_lib
from mosp_jax.config import PREF_MAPS, RunConfig, SolverConfig
from mosp_jax.pipeline import artifact, pareto
from mosp_jax.pipeline.checkpoint import LayerCheckpoint
from mosp_jax.pipeline.grams import NonFiniteError
from mosp_jax.pipeline.prune import prune_and_evaluate
from mosp_jax.solvers import NM, Unstructured
from mosp_jax.solvers import sharding as sharding_lib

_D = SolverConfig()

# What is pruned, on which data.
flags.DEFINE_string("model", "smollm2-135m", "Model spec: 'smollm2-135m', a "
                    "local dir, a .gguf file, a hub id, or 'tiny-llama'.")
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
                    "checkpoint and check its parity (bridge.verify); the "
                    "result goes to results.json['export'].")
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
      raise ValueError(f"--nm: expected 'N:M' with integers, got "
                       f"{f.nm!r}") from e
    try:
      return NM(n, m)
    except ValueError as e:
      raise ValueError(f"--nm: {e}") from e
  try:
    return Unstructured(f.sparsity)
  except ValueError as e:
    raise ValueError(f"--sparsity: {e}") from e


def _prefs(f, m: int) -> np.ndarray:
  if f.prefs:
    try:
      rows = [[float(x) for x in row.split(",")]
              for row in f.prefs.split(";") if row.strip()]
      prefs = np.asarray(rows, np.float32)
    except ValueError as e:
      raise ValueError(f"--prefs: expected ';'-separated rows of ','-"
                       f"separated numbers, got {f.prefs!r}") from e
    pareto.check_prefs(prefs, m, flag="--prefs")
  else:
    if f.pref_grid < 1:
      raise ValueError(f"--pref_grid must be >= 1, got {f.pref_grid}")
    prefs = pareto.simplex_grid(m, f.pref_grid)
    if f.pref_centroid:
      prefs = pareto.with_centroid(prefs)
  return pareto.ensure_vertices(prefs)


def configs_from_flags(f=FLAGS) -> tuple[RunConfig, SolverConfig]:
  """The one place flags become configs; errors name the flag."""
  if not f.out_dir:
    raise ValueError("--out_dir is required (the run directory)")
  try:
    solver = SolverConfig(**{name: getattr(f, name) for name in
                             SOLVER_FLAGS})
  except ValueError as e:
    raise ValueError(f"--{e}") from e
  tasks = tuple(t.strip() for t in f.tasks if t.strip())
  for t in tasks:
    if t in data_lib.SOURCES:
      continue
    if not t.endswith((".txt", ".jsonl")):
      raise ValueError(f"--tasks: unknown task {t!r}; known: "
                       f"{', '.join(data_lib.SOURCES)}, or a .txt/.jsonl "
                       "file")
    if not os.path.isfile(t):
      raise ValueError(f"--tasks: no file {t!r}")
  prefs = _prefs(f, len(tasks))
  run = RunConfig(
      model=f.model, tasks=tasks, pattern=_pattern(f),
      nsamples=f.nsamples, seqlen=f.seqlen, test_tokens=f.test_tokens,
      prefs=tuple(tuple(float(x) for x in r) for r in prefs),
      batch_size=f.batch_size, seed=f.seed, out_dir=f.out_dir,
      streams=f.streams)
  return run, solver


def mesh_from_flags(f=FLAGS):
  """Starts multi-host JAX if asked, then builds the `--mesh` (None for
  one device). Must run before anything else uses JAX; errors name the
  flag."""
  sharding_lib.initialize_distributed(f.coordinator_address,
                                      f.num_processes, f.process_id)
  try:
    return sharding_lib.make_mesh(f.mesh)
  except ValueError as e:
    raise ValueError(f"--mesh: {e}") from e


CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoint"
# What a run writes into --out_dir; --overwrite deletes only these.
RUN_OUTPUTS = (CONFIG_FILE, "flags.txt", "results.json", "report.md",
               "pareto.png", "pareto", CHECKPOINT_DIR)


def config_record(run: RunConfig, solver: SolverConfig) -> dict:
  """The configuration a run directory belongs to (JSON-normalised)."""
  rec = dataclasses.asdict(run)
  rec.pop("out_dir")
  rec["pattern"] = {"kind": type(run.pattern).__name__,
                    **dataclasses.asdict(run.pattern)}
  rec["solver"] = dataclasses.asdict(solver)
  return json.loads(json.dumps(rec))


def prepare_run_dir(run: RunConfig, solver: SolverConfig, *,
                    overwrite: bool) -> tuple[pathlib.Path, bool]:
  """Creates or checks --out_dir; returns `(path, resuming)`.

  A directory holding a run of the same configuration is resumed; one
  holding anything else is refused unless `overwrite`, which deletes the
  previous run's outputs (and nothing else).
  """
  out = pathlib.Path(run.out_dir)
  record = config_record(run, solver)
  resuming = False
  if out.exists() and any(out.iterdir()):
    cfg = out / CONFIG_FILE
    prev = json.loads(cfg.read_text()) if cfg.exists() else None
    if overwrite:
      for name in RUN_OUTPUTS:
        p = out / name
        if p.is_dir():
          shutil.rmtree(p)
        elif p.exists():
          p.unlink()
    elif prev == record:
      resuming = True
    elif prev is None:
      raise ValueError(f"--out_dir {out} is not empty and holds no run; "
                       "choose a new directory or pass --overwrite")
    else:
      diff = sorted(k for k in set(prev) | set(record)
                    if prev.get(k) != record.get(k))
      raise ValueError(f"--out_dir {out} holds a run with another "
                       f"configuration (differs in: {', '.join(diff)}); "
                       "pass --overwrite or choose a new directory")
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ValueError(f"--out_dir {out}: cannot create it ({e})") from e
  if not os.access(out, os.W_OK):
    raise ValueError(f"--out_dir {out} is not writable")
  if not resuming:
    artifact.write_json(out / CONFIG_FILE, record)
  return out, resuming


def check_model_fits(run: RunConfig) -> None:
  """Fails fast when --seqlen exceeds the model's context."""
  if run.model == "tiny-llama":
    context = 2048
  else:
    from bridge import hf_import
    config = hf_import.load_config(run.model)
    context = (getattr(config, "max_position_embeddings", None)
               or getattr(config, "n_positions", None))
  if context is not None and run.seqlen > context:
    raise ValueError(f"--seqlen {run.seqlen} exceeds the context of "
                     f"{run.model} ({context} tokens)")


def load_model(spec: str):
  """(adapter, params, tokenizer) for a model spec."""
  from bridge import hf_import
  from mosp_jax import models
  if spec == "tiny-llama":
    tokenizer = hf_import.load_tokenizer(hf_import.SMOLLM2)
    model, params = models.tiny_llama(vocab_size=len(tokenizer), seed=0)
  else:
    model, params, tokenizer = hf_import.load_model(spec)
    if tokenizer is None:
      raise ValueError(f"--model {spec}: no tokenizer found with the model")
  return models.adapter_for(model), params, tokenizer


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
    lines.append("| " + ", ".join(f"{x:.2f}" for x in pref) + " | "
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
  returns the results dict also written to disk."""
  out, resuming = prepare_run_dir(run, solver, overwrite=overwrite)
  ckpt_dir = out / CHECKPOINT_DIR
  if resuming and (out / "results.json").exists() and not ckpt_dir.exists():
    log(f"{out} already holds this run's results; --overwrite redoes it")
    return json.loads((out / "results.json").read_text())
  check_model_fits(run)
  t0 = time.perf_counter()
  adapter, params, tokenizer = load_model(run.model)
  from bridge import pruned as bridge_pruned  # For bridge.export/parity.
  dense_sha256 = bridge_pruned.params_sha256(params)
  params = jax.device_put(params)
  t_model = time.perf_counter() - t0
  calib, test = [], []
  for task in run.tasks:
    td = data_lib.load_task(task, tokenizer, nsamples=run.nsamples,
                            seqlen=run.seqlen, test_tokens=run.test_tokens,
                            seed=run.seed)
    if td.test.shape[0] == 0:
      raise ValueError(f"--tasks {task}: no test segment of {run.seqlen} "
                       "tokens")
    calib.append(td.calib)
    test.append(td.test)
  n_test = min(t.shape[0] for t in test)
  test = [t[:n_test] for t in test]  # same token count for every task
  t_data = time.perf_counter() - t0 - t_model
  log(f"model {run.model}: {adapter.num_layers(params)} layers; data: "
      f"{len(run.tasks)} tasks x ({run.nsamples} calibration, {n_test} "
      f"test) x {run.seqlen} tokens; {len(run.prefs)} models")
  prefs = np.asarray(run.prefs, np.float32)
  checkpoint = LayerCheckpoint(ckpt_dir)
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
  artifact.write_json(out / "results.json", results)
  artifact.write_text(out / "report.md", _report(
      run, res, sparsity, seconds, {"test_segments": n_test}))
  pareto.plot_fronts(out / "pareto.png", list(run.tasks), res.prefs,
                     res.ppl, res.dense_ppl,
                     title=f"{run.model}, {run.pattern}")
  checkpoint.remove()  # results are complete; the artifact stays
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  try:
    mesh = mesh_from_flags()
    run, solver = configs_from_flags()
    if FLAGS.export_pref != "none":  # Fail before the run, not after.
      from bridge import pruned as bridge_pruned
      bridge_pruned.parse_preference(FLAGS.export_pref, run.tasks,
                                     flag="--export_pref")
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  logging.info("run config: %s", run)
  logging.info("solver config: %s", solver)

  def pause(layer: int) -> None:
    if layer == FLAGS.pause_after_layer:
      time.sleep(FLAGS.pause_seconds)

  logging.info("solver mesh: %s", mesh and dict(mesh.shape))
  try:
    res = run_experiment(run, solver, overwrite=FLAGS.overwrite,
                         on_layer_done=pause, mesh=mesh)
  except (ValueError, FileNotFoundError, NonFiniteError,
          data_lib.SourceUnavailableError) as e:
    # Bad input and non-finite numbers end the run with one clear line;
    # what was already written (artifact layers, checkpoint) stays valid.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  out = pathlib.Path(run.out_dir)
  artifact.write_text(out / "flags.txt", FLAGS.flags_into_string())
  print(json.dumps({k: res[k] for k in ("dense_ppl", "timings")}, indent=1))
  for mdl in res["models"]:
    print(mdl["preference"], {k: round(v, 2) for k, v in mdl["ppl"].items()})
  print(f"wrote {out}/results.json, report.md, pareto.png, pareto/")
  if FLAGS.export_pref != "none":
    export_and_check(out, FLAGS.export_pref)


def export_and_check(out: pathlib.Path, pref: str) -> None:
  """--export_pref: export + parity into results.json; exits 1 on failure."""
  from bridge import verify
  try:
    res = json.loads((out / "results.json").read_text())
    res["export"] = verify.export_and_check(out, pref, log=print)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: --export_pref {pref}: {e}", file=sys.stderr)
    sys.exit(1)
  artifact.write_json(out / "results.json", res)
  if not res["export"]["ok"]:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
