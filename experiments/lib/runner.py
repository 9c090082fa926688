"""One whole MOSP run, as `experiments.run` performs it; for the command,
the comparison and the tests.

`run_experiment(run, solver)` checks everything it can before touching
--out_dir, loads the data and the model (`bridge.load`), prunes and
evaluates (`pipeline.prune.prune_and_evaluate`, resuming a killed run of
the same configuration) and writes the run directory
(`pipeline.run_record`): results.json, report.md, pareto.png and the
Pareto set.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bridge import load
from mosp_jax import cli
from mosp_jax import data as data_lib
from mosp_jax.config import RunConfig, SolverConfig
from mosp_jax.pipeline import (
  artifact,
  front_plot,
  preferences,
  run_record,
  walk,
)
from mosp_jax.pipeline import plan as plan_lib
from mosp_jax.pipeline.checkpoint import LayerCheckpoint
from mosp_jax.pipeline.prune import prune_and_evaluate

NOTHING_REDONE = ("{out} already holds this run's results; nothing was "
                  "redone (--overwrite redoes the run)")


def check_model_fits(run: RunConfig, *, weights: bool = True) -> None:
  """Fails fast (`cli.UsageError`) when --model names no file or --seqlen
  exceeds the model's context (or, when its `weights` will be built, a
  `random:` model is over their limit); reads the model config only."""
  context, _ = load.model_shape(run.model, weights=weights,
                                trust_pickle=run.trust_pickle)
  if context is not None and run.seqlen > context:
    raise cli.UsageError(f"--seqlen {run.seqlen} exceeds the context of "
                         f"{run.model} ({context} tokens)")


def check_inputs(run: RunConfig, *, weights: bool = True) -> None:
  """Validates what can be validated before any tokenizer or model is
  loaded: the model's context against --seqlen (`cli.UsageError`) and
  every local task file (readable, UTF-8, enough documents; ValueError
  naming the file). `weights=False` (--plan_only, and the layer walk,
  which draws a random model's layers one at a time) skips the size
  limit of whole random weights."""
  for task in run.tasks:
    if task not in data_lib.SOURCES:
      data_lib.check_task(task)
  check_model_fits(run, weights=weights)


def plan_run(run: RunConfig, solver: SolverConfig, *,
             memory_bytes: int | None = None, for_gpu: bool = False,
             offload_streams: bool = False, log=print) -> plan_lib.Plan:
  """--plan: the run's memory and time plan from the model's config and
  the device's rates measured now (`pipeline.plan`), printed as one
  table; raises `cli.UsageError` (one line naming the flag to change)
  when it does not fit `memory_bytes` (default: detected). `for_gpu`
  (--plan_for_gpu) plans for a GPU from a CPU: no host copies count.
  Streams that do not fit on the device go to host memory when that
  makes the plan fit [ours]: the returned plan's `offload_streams` says
  so (set from the start by `offload_streams`)."""
  config = load.model_config(run.model, trust_pickle=run.trust_pickle)
  shapes = plan_lib.shapes_from_config(config)
  device = plan_lib.measure_device(
      memory_bytes, linear=plan_lib.pass_probe_shape(shapes))
  device = plan_lib.with_forward_rate(device, config,
                                     batch_size=run.batch_size,
                                     seqlen=run.seqlen)
  if for_gpu:
    device = dataclasses.replace(
        device, host_is_device=False,
        name=f"a GPU (seconds at the rates of {device.name})")
  plan = make_run_plan(run, solver, device, shapes,
                       offload_streams=offload_streams)
  if not plan.fits() and not offload_streams:
    offloaded = make_run_plan(run, solver, device, shapes,
                              offload_streams=True)
    if offloaded.total_bytes < plan.total_bytes:  # Not on a CPU.
      log("the streams do not fit on the device: they stay in host memory "
          "(--offload_streams)" + ("" if offloaded.fits() else
                                   ", and still the plan does not fit"))
      plan = offloaded
  log(plan_lib.format_plan(plan))
  if not plan.fits():
    raise cli.UsageError(plan_lib.refusal(plan))
  return plan


def make_run_plan(run: RunConfig, solver: SolverConfig,
                  device: plan_lib.Device, shapes: plan_lib.ModelShapes, *,
                  offload_streams: bool,
                  stage1_iters: int | None = None) -> plan_lib.Plan:
  """`plan.make_plan` of `run` on a measured `device` for the model's
  `shapes` (`plan.shapes_from_config`), weights and activations of
  `run.dtype`."""
  return plan_lib.make_plan(
      shapes, run, solver, device, act_bytes=jnp.dtype(run.dtype).itemsize,
      stage1_iters=stage1_iters, offload_streams=offload_streams)


def report_markdown(run: RunConfig, results: run_record.Results) -> str:
  """report.md: the PPL table of every model and the phase timings."""
  tasks = list(run.tasks)
  assert results.test is not None  # Every run records its test set.
  lines = [f"# MOSP run: {run.model}, {run.pattern}", "",
           f"Tasks: {', '.join(tasks)}. Calibration {run.nsamples} x "
           f"{run.seqlen} tokens per task; test {results.test.segments} "
           f"segments of {run.seqlen} tokens per task.", "",
           "Perplexity (lower is better); bold = best preference model on "
           "that task. The global model W (stage 1: ALPS on the "
           "concatenated calibration data) is part of the Pareto set.", "",
           "| preference | " + " | ".join(tasks) + " | sparsity |",
           "|---" * (len(tasks) + 2) + "|",
           "| dense | " + " | ".join(f"{results.dense_ppl[t]:.2f}"
                                     for t in tasks) + " | 0 |"]
  ppl = np.asarray([[m.ppl[t] for t in tasks] for m in results.models])
  best = ppl.argmin(axis=0)
  for p, model in enumerate(results.models):
    cells = [f"**{x:.2f}**" if best[t] == p else f"{x:.2f}"
             for t, x in enumerate(ppl[p])]
    lines.append("| " + preferences.format_pref(model.preference) + " | "
                 + " | ".join(cells) + f" | {model.sparsity:.3f} |")
  lines.append("| global model W | " + " | ".join(
      f"{results.global_ppl[t]:.2f}" for t in tasks)
               + f" | {run.pattern.sparsity:.3f} |")
  lines += ["", "Wall time (s): " + ", ".join(
      f"{k} {v:.1f}" for k, v in results.timings.items()), "",
            f"![fronts]({run_record.PLOT_FILE})", ""]
  return "\n".join(lines)


def summary_lines(results: run_record.Results) -> list[str]:
  """The console summary of a run's results: PPL per model and timings."""
  tasks = list(results.tasks)
  rows = [("dense", [results.dense_ppl[t] for t in tasks])]
  rows += [(preferences.format_pref(m.preference),
            [m.ppl[t] for t in tasks]) for m in results.models]
  rows.append(("global model W", [results.global_ppl[t] for t in tasks]))
  w = max(len("preference"), *(len(r[0]) for r in rows))
  cols = [max(10, len(t)) for t in tasks]
  lines = ["perplexity (lower is better):",
           "  " + "preference".ljust(w) + "".join(
               f"  {t:>{c}}" for t, c in zip(tasks, cols, strict=True))]
  lines += ["  " + label.ljust(w) + "".join(
      f"  {x:>{c}.2f}" for x, c in zip(vals, cols, strict=True))
            for label, vals in rows]
  lines.append("seconds: " + ", ".join(
      f"{k} {v:.1f}" for k, v in results.timings.items()))
  return lines


def _load_model_claiming(run: RunConfig, tokenizer, out: pathlib.Path, *,
                         existed: bool, resuming: bool):
  """`load.load_layers`; a model that cannot be loaded takes back the
  config.json just written (and the folder it created), so that the
  corrected command does not meet a run that never started."""
  try:
    return load.load_layers(run.model, tokenizer,
                            dtype=jnp.dtype(run.dtype),
                            trust_pickle=run.trust_pickle)
  except BaseException:
    if not resuming:
      (out / run_record.CONFIG_FILE).unlink(missing_ok=True)
      if not existed and not any(out.iterdir()):
        out.rmdir()
    raise


def _results(run: RunConfig, solver: SolverConfig, res: walk.Front,
             test: list[np.ndarray], seconds: dict[str, float]
             ) -> run_record.Results:
  """The `Results` record of MOSP's finished walk `res`."""
  tasks = list(run.tasks)
  assert res.global_ppl is not None  # MOSP's walk evaluates W.

  def per_task(values) -> dict[str, float]:
    return dict(zip(tasks, np.asarray(values).tolist(), strict=True))

  return run_record.Results(
      model=run.model, sparsity=run.pattern.sparsity,
      pattern=str(run.pattern), tasks=tuple(tasks),
      dense_ppl=per_task(res.walk.dense_ppl),
      models=tuple(run_record.ModelResult(
          preference=tuple(pref.tolist()), ppl=per_task(row),
          sparsity=float(s))
                   for pref, row, s in zip(res.prefs, res.ppl,
                                           res.sparsity.tolist(),
                                           strict=True)),
      global_ppl=per_task(res.global_ppl), timings=seconds,
      layers=tuple(res.walk.layers), solver=solver,
      test=run_record.TestSet(
          segments=test[0].shape[0], seqlen=run.seqlen,
          sha256={task: run_record.segments_sha256(t)
                  for task, t in zip(tasks, test, strict=True)}))


def _write_outputs(out: pathlib.Path, run: RunConfig,
                   meta: run_record.ArtifactMeta,
                   results: run_record.Results, res: walk.Front) -> None:
  """meta.json, results.json, report.md and pareto.png of MOSP's finished
  walk `res`."""
  assert res.global_ppl is not None  # MOSP's walk evaluates W.
  run_record.write_meta(out, meta)
  run_record.write_results(out, results)
  artifact.write_text(out / run_record.REPORT_FILE,
                      report_markdown(run, results))
  front_plot.plot_fronts(out / run_record.PLOT_FILE, list(run.tasks),
                         res.prefs, res.ppl, res.walk.dense_ppl,
                         title=f"{run.model}, {run.pattern}",
                         extra={"global model W": res.global_ppl[None]})


def run_experiment(run: RunConfig, solver: SolverConfig, *,
                   overwrite: bool = False, log=print,
                   on_layer_done=None,
                   mesh: jax.sharding.Mesh | None = None,
                   plan: bool = False,
                   device_memory_bytes: int | None = None,
                   offload_streams: bool = False
                   ) -> run_record.Results:
  """Runs the whole job, resuming a killed run of the same configuration;
  returns the results also written to disk.

  Everything that can be checked (flags, --out_dir, task files, the
  tokenised data) is checked before --out_dir is touched or the model is
  loaded, and a model that fails to load takes its config.json back, so
  a refused run leaves nothing that blocks the corrected one. With
  `plan`, the plan (`plan_run`, on `device_memory_bytes` or the detected
  memory) is printed after those checks, and a plan that does not fit
  refuses the run before --out_dir is touched. The streams stay in host
  memory with `offload_streams`, or when the plan fits only so.

  Raises:
    cli.UsageError: --out_dir holds another run, --seqlen is too long,
      the plan does not fit.
    ValueError, OSError, ...: a task file or the model cannot be used.
  """
  record = run_record.ConfigRecord(run=run, solver=solver)
  out, resuming, finished = run_record.check_run_dir(record,
                                                     overwrite=overwrite)
  if finished:
    log(NOTHING_REDONE.format(out=out))
    return run_record.read_results(out)
  # The walk reads a random model's layers when it reaches them, so the
  # size limit of whole random weights does not apply.
  check_inputs(run, weights=False)
  if plan:
    offload_streams = plan_run(
        run, solver, memory_bytes=device_memory_bytes,
        offload_streams=offload_streams, log=log).offload_streams
  t0 = time.perf_counter()
  log(f"loading the tokenizer and {len(run.tasks)} tasks ...")
  tokenizer = load.spec_tokenizer(run.model, trust_pickle=run.trust_pickle)
  calib, test = run_record.run_segments(run, tokenizer)
  t_data = time.perf_counter() - t0
  existed = out.exists()
  run_record.start_run_dir(record, overwrite=overwrite, resuming=resuming)
  log(f"loading the model {run.model} ...")
  adapter, model, tokenizer = _load_model_claiming(
      run, tokenizer, out, existed=existed, resuming=resuming)
  dense_sha256 = model.sha256()
  t_model = time.perf_counter() - t0 - t_data
  n_layers = model.num_layers
  log(f"model {run.model}: {n_layers} layers; data: "
      f"{len(run.tasks)} tasks x ({run.nsamples} calibration, "
      f"{test[0].shape[0]} test) x {run.seqlen} tokens; "
      f"{len(run.prefs)} models")
  log(f"pruning {n_layers} layers (layer 1 also compiles; the ETA counts "
      "from layer 2 on) ...")
  prefs = np.asarray(run.prefs, np.float32)
  checkpoint = LayerCheckpoint(out / run_record.CHECKPOINT_DIR)
  with jax.transfer_guard("disallow"):
    res = prune_and_evaluate(
        adapter, model, calib, test, prefs, pattern=run.pattern, cfg=solver,
        batch_size=run.batch_size, streams=run.streams,
        artifact_dir=str(out / run_record.ARTIFACT_DIR),
        checkpoint=checkpoint, log=log, on_layer_done=on_layer_done,
        mesh=mesh, offload_streams=offload_streams)
  seconds = {"load_model": t_model, "load_data": t_data,
             **res.walk.seconds,
             "wall": time.perf_counter() - t0}
  meta = run_record.ArtifactMeta(
      model=run.model, tasks=tuple(run.tasks), pattern=run.pattern,
      solver=solver, prefs=prefs, num_layers=len(res.walk.layers),
      groups=tuple(tuple(g) for g in adapter.linear_groups()),
      dense_sha256=dense_sha256)
  results = _results(run, solver, res, test, seconds)
  _write_outputs(out, run, meta, results, res)
  checkpoint.remove()  # results are complete; the artifact stays
  return results


def export_and_record(out: pathlib.Path, pref: str) -> None:
  """--export_pref: exports preference `pref` of the run in `out`, checks
  its parity (`bridge.export_check.export_and_check`) and records the
  report in results.json; exits 1 on failure. Skipped when results.json
  already records a passing export of `pref`."""
  from bridge import export_check, pruned
  results = run_record.read_results(out)
  folder = out / f"{run_record.EXPORT_PREFIX}{pruned.preference_tag(pref)}"
  done = results.export
  if (done is not None and done.ok
      and pathlib.Path(done.checkpoint).name == folder.name
      and folder.is_dir()):
    print(f"{folder} already passed its parity check; nothing was redone",
          flush=True)
    return
  print(f"exporting preference {pref} and checking its parity ...",
        flush=True)
  report = export_check.export_and_check(
      out, pref, log=functools.partial(print, flush=True))
  run_record.write_results(out, dataclasses.replace(results, export=report))
  if not report.ok:
    sys.exit(cli.EXIT_FAILURE)
