r"""MOSP against the single-objective baselines on identical inputs.

Whole model (every method through the same layer walk, same model, data,
seed and sparsity; each baseline once per preference with the mixed Gram):

  python -m experiments.compare --flagfile=experiments/configs/quick.flags \
      --out_dir=runs/compare

One real layer, in about a minute (relative reconstruction error per task
instead of perplexity; the captured Grams are cached, so a second run only
solves):

  python -m experiments.compare --layer_level \
      --flagfile=experiments/configs/quick.flags --out_dir=runs/layer

Writes compare.json, compare.md and compare.png into --out_dir. Fronts are
compared in log space (log PPL, or log relative error per task): the
hypervolume of each method's points against one reference point shared by
all methods (the worst value of each task over every point, 10% worse),
and how many of each baseline's points some MOSP point dominates. Every
run flag of `experiments.run` applies.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time

import jax
import numpy as np
from absl import app, flags

from experiments import layer_compare
from experiments import run as run_lib
from mosp_jax.baselines import METHODS
from mosp_jax.config import RunConfig, SolverConfig
from mosp_jax.pipeline import artifact, pareto
from mosp_jax.pipeline import prune as prune_lib
from mosp_jax.pipeline.grams import layer_grams
from mosp_jax.pipeline.prune import prune_and_evaluate
from mosp_jax.pipeline.single import baseline_walk

ALL_METHODS = ("mosp", *METHODS)

flags.DEFINE_list("methods", list(ALL_METHODS), "Methods to compare; "
                  "mosp is always run (it is the reference of the "
                  "dominance counts).")
flags.DEFINE_bool("layer_level", False, "Compare on one real layer "
                  "(relative errors) instead of the whole model (PPL).")
flags.DEFINE_integer("layer", -1, "Layer of --layer_level; -1: the middle "
                     "layer.")
flags.DEFINE_list("linears", [], "Linears of --layer_level (default all).")
flags.DEFINE_bool("gram_cache", True, "Cache the Grams --layer_level "
                  "captures (under $MOSP_JAX_CACHE/grams).")

FLAGS = flags.FLAGS


def prepare_out_dir(run: RunConfig, overwrite: bool) -> pathlib.Path:
  """Creates --out_dir; refuses a non-empty one unless `overwrite`."""
  out = pathlib.Path(run.out_dir)
  if out.exists() and any(out.iterdir()) and not overwrite:
    raise ValueError(f"--out_dir {out} exists and is not empty; pass "
                     "--overwrite or choose a new directory")
  out.mkdir(parents=True, exist_ok=True)
  return out


def methods_from_flags(f=FLAGS) -> tuple[str, ...]:
  """The methods to run, mosp first; raises naming --methods."""
  names = [m.strip() for m in f.methods if m.strip()]
  bad = [m for m in names if m not in ALL_METHODS]
  if bad:
    raise ValueError(f"--methods: unknown {bad}; choose from "
                     f"{list(ALL_METHODS)}")
  return ("mosp", *[m for m in ALL_METHODS[1:] if m in names])


def summarize(points: dict[str, np.ndarray]) -> dict:
  """Front metrics of each method's `(P, m)` points (minimisation, values
  > 0), compared in log space against one shared reference point."""
  logs = {k: np.log(np.asarray(v, np.float64)) for k, v in points.items()}
  ref = pareto.reference_point(list(logs.values()))
  mosp = logs["mosp"]
  others = [k for k in logs if k != "mosp"]
  return {
      "space": "log",
      "reference": ref.tolist(),
      "hypervolume": {k: pareto.hypervolume(v, ref)
                      for k, v in logs.items()},
      "mosp_dominates": {k: pareto.dominated_count(mosp, logs[k])
                         for k in others},
      "dominates_mosp": {k: pareto.dominated_count(logs[k], mosp)
                         for k in others},
      "points": {k: int(v.shape[0]) for k, v in logs.items()},
  }


def _pref(p: np.ndarray) -> str:
  return ", ".join(f"{x:.2f}" for x in p)


def _value_table(tasks: list[str], prefs: np.ndarray,
                 values: dict[str, np.ndarray], fmt: str,
                 dense: np.ndarray | None = None) -> list[str]:
  """Rows method x preference, columns tasks; bold = best per preference
  and task."""
  lines = ["| method | preference | " + " | ".join(tasks) + " |",
           "|---|---|" + "---|" * len(tasks)]
  if dense is not None:
    lines.append("| dense | | " + " | ".join(format(x, fmt) for x in dense)
                 + " |")
  stack = np.stack(list(values.values()))            # (methods, P, m)
  best = stack.min(axis=0)
  for name, v in values.items():
    for p, pref in enumerate(prefs):
      cells = [f"**{x:{fmt}}**" if x == best[p, t] else format(x, fmt)
               for t, x in enumerate(v[p])]
      lines.append(f"| {name} | {_pref(pref)} | " + " | ".join(cells) + " |")
  return lines


def _summary_table(summary: dict, time_s: dict[str, float],
                   cpu_s: dict[str, float]) -> list[str]:
  hv = summary["hypervolume"]
  lines = ["| method | hypervolume | points MOSP dominates | MOSP points "
           "it dominates | wall (s) | CPU (s) |", "|---|---|---|---|---|---|"]
  for k in hv:
    n = summary["points"][k]
    dom = ("" if k == "mosp" else
           f"{summary['mosp_dominates'][k]} / {n}")
    rev = ("" if k == "mosp" else
           f"{summary['dominates_mosp'][k]} / {summary['points']['mosp']}")
    lines.append(f"| {k} | {hv[k]:.4g} | {dom} | {rev} | "
                 f"{time_s[k]:.1f} | {cpu_s[k]:.1f} |")
  return lines


def _warm_shared(adapter, params, segments: list[np.ndarray],
                 batch_size: int) -> None:
  """Compiles the walk's shared model functions (embed, one layer, Gram
  capture, head) for every batch shape, so that the first method timed
  does not pay for the others."""
  lp = adapter.layer_params(params, 0)
  shapes = {b.shape for ids in segments
            for b in prune_lib._device_batches(ids, batch_size)}
  for shape in sorted(shapes):
    ids = jax.device_put(np.zeros(shape, np.int32))
    h = prune_lib._embed(adapter, params, ids)
    layer_grams(adapter, lp, [h])
    h = prune_lib._propagate(adapter, lp, h)
    jax.block_until_ready(prune_lib._nll(adapter, params, h, ids))


def compare_model(run: RunConfig, solver: SolverConfig,
                  methods: tuple[str, ...], *, log=print) -> dict:
  """Runs every method through the whole-model walk; returns the results
  written to compare.json (and writes compare.md, compare.png)."""
  out = prepare_out_dir(run, overwrite=True)
  adapter, params, calib, test, (t_model, t_data) = \
      layer_compare.load_inputs(run)
  prefs = np.asarray(run.prefs, np.float32)
  tasks = list(run.tasks)
  log(f"compare {run.model}, {run.pattern}: {len(tasks)} tasks, "
      f"{prefs.shape[0]} preferences, methods {', '.join(methods)}")
  walks, cpu_s = {}, {}
  with jax.transfer_guard("disallow"):
    _warm_shared(adapter, params, calib + test, run.batch_size)
    for name in methods:
      c0 = time.process_time()
      if name == "mosp":
        walks[name] = prune_and_evaluate(
            adapter, params, calib, test, prefs, pattern=run.pattern,
            cfg=solver, batch_size=run.batch_size, artifact_dir=None,
            log=log)
      else:
        walks[name] = baseline_walk(
            adapter, params, calib, test, prefs, method=name,
            pattern=run.pattern, cfg=solver, batch_size=run.batch_size,
            log=log)
      cpu_s[name] = time.process_time() - c0
  dense = walks["mosp"].dense_ppl
  for name, w in walks.items():  # identical inputs -> identical dense
    if not np.allclose(w.dense_ppl, dense, rtol=1e-4):
      raise RuntimeError(f"{name}: dense PPL {w.dense_ppl} differs from "
                         f"MOSP's {dense}; inputs are not identical")
  ppl = {k: w.ppl for k, w in walks.items()}
  summary = summarize(ppl)
  time_s = {k: w.seconds["total"] for k, w in walks.items()}
  results = {
      "mode": "model", "model": run.model, "pattern": str(run.pattern),
      "sparsity": run.pattern.sparsity, "tasks": tasks,
      "prefs": prefs.tolist(), "dense_ppl": dict(zip(tasks, dense.tolist(),
                                                     strict=True)),
      "ppl": {k: v.tolist() for k, v in ppl.items()},
      "model_sparsity": {k: w.sparsity.tolist() for k, w in walks.items()},
      **summary, "time_s": time_s, "cpu_s": cpu_s,
      "seconds": {k: w.seconds for k, w in walks.items()},
      "load_s": {"model": t_model, "data": t_data},
      "calibration": {"nsamples": run.nsamples, "seqlen": run.seqlen,
                      "test_segments": int(test[0].shape[0]),
                      "seed": run.seed},
      "solver": dataclasses.asdict(solver)}
  artifact.write_json(out / "compare.json", results)
  lines = [f"# MOSP vs baselines: {run.model}, {run.pattern}", "",
           f"Tasks {', '.join(tasks)}; calibration {run.nsamples} x "
           f"{run.seqlen} tokens per task, test {test[0].shape[0]} x "
           f"{run.seqlen} per task, seed {run.seed}. Baselines: one model "
           "per preference, pruned on the mixed Gram H_lam (the vertices "
           "are the single-task runs); magnitude uses no data (one model).",
           "", _solver_note(solver), "", "## Summary", "",
           f"Hypervolume of (log PPL per task), reference "
           f"{_pref(np.asarray(summary['reference']))} (shared); higher is "
           "better. Time: wall and process CPU seconds of the whole walk "
           "(capture, solve, propagate, evaluate), including the "
           "compilation of the method's own solver.", "",
           *_summary_table(summary, time_s, cpu_s), "",
           "## Perplexity (lower is better; bold = best per preference)", "",
           *_value_table(tasks, prefs, ppl, ".2f", dense), "",
           "![fronts](compare.png)", ""]
  artifact.write_text(out / "compare.md", "\n".join(lines))
  pareto.plot_fronts(out / "compare.png", tasks, prefs, ppl["mosp"], dense,
                     title=f"{run.model}, {run.pattern}",
                     extra={k: v for k, v in ppl.items() if k != "mosp"})
  return results


def _solver_note(solver: SolverConfig) -> str:
  """One line naming the solver settings that differ from the defaults."""
  changed = [f"{f.name}={getattr(solver, f.name)}"
             for f in dataclasses.fields(solver)
             if getattr(solver, f.name) != f.default]
  if not changed:
    return "Solver settings: the defaults (SolverConfig)."
  return ("Solver settings that differ from the defaults (SolverConfig): "
          + ", ".join(changed) + ".")


def compare_layer(run: RunConfig, solver: SolverConfig,
                  methods: tuple[str, ...], *, layer: int = -1,
                  linears: list[str] | tuple[str, ...] = (),
                  use_cache: bool = True, log=print) -> dict:
  """Every method on one real layer; returns the results written to
  compare.json (and writes compare.md, compare.png). A method's point
  for a preference is its relative error per task averaged over the
  layer's linears."""
  out = prepare_out_dir(run, overwrite=True)
  prob = layer_compare.capture_layer(run, layer, use_cache=use_cache,
                                     log=log)
  prefs = np.asarray(run.prefs, np.float32)
  tasks = list(run.tasks)
  res = layer_compare.solve_layer(prob, prefs, methods,
                                  pattern=run.pattern, cfg=solver,
                                  linears=linears, log=log)
  names = list(res.errors["mosp"])
  mean = {k: np.mean(np.stack(list(v.values())), axis=0)
          for k, v in res.errors.items()}
  mean_ho = {k: np.mean(np.stack(list(v.values())), axis=0)
             for k, v in res.heldout.items()}
  summary = summarize(mean)
  summary_ho = summarize(mean_ho)
  results = {
      "mode": "layer", "model": run.model, "layer": prob.layer,
      "num_layers": prob.num_layers, "linears": names,
      "pattern": str(run.pattern), "sparsity": run.pattern.sparsity,
      "tasks": tasks, "prefs": prefs.tolist(),
      "rel_error": {k: v.tolist() for k, v in mean.items()},
      "rel_error_heldout": {k: v.tolist() for k, v in mean_ho.items()},
      "rel_error_per_linear": {k: {n: e.tolist() for n, e in v.items()}
                               for k, v in res.errors.items()},
      **summary, "time_s": res.seconds, "cpu_s": res.cpu_seconds,
      "heldout": {k: summary_ho[k] for k in ("reference", "hypervolume",
                                             "mosp_dominates",
                                             "dominates_mosp")},
      "calibration": {"nsamples": run.nsamples, "seqlen": run.seqlen,
                      "test_tokens": run.test_tokens, "seed": run.seed},
      "solver": dataclasses.asdict(solver)}
  artifact.write_json(out / "compare.json", results)
  shapes = ", ".join(f"{n} {prob.kernels[n].shape[0]}x"
                     f"{prob.kernels[n].shape[1]}" for n in names)
  lines = [f"# MOSP vs baselines on one layer: {run.model} layer "
           f"{prob.layer}/{prob.num_layers}, {run.pattern}", "",
           f"Linears: {shapes}. Grams of {run.nsamples} x {run.seqlen} "
           f"calibration tokens per task ({', '.join(tasks)}), seed "
           f"{run.seed}; held-out Grams from up to {run.test_tokens} test "
           "tokens per task. A point is the relative reconstruction error "
           "per task, averaged over the linears. Baselines: one solve per "
           "preference on the mixed Gram H_lam (vertices = single task).",
           "", _solver_note(solver), "",
           "## Summary (calibration Grams, the objective)", "",
           f"Hypervolume of (log relative error per task), shared reference "
           f"{_pref(np.asarray(summary['reference']))}; higher is better. "
           "Time: wall and process CPU seconds of the solves over the "
           "linears, compilation excluded. On a shared machine both vary "
           "with the load: compare methods within one run.", "",
           *_summary_table(summary, res.seconds, res.cpu_seconds), "",
           "## Summary (held-out Grams)", "",
           *_summary_table(summary_ho, res.seconds, res.cpu_seconds), "",
           "## Relative error on the calibration Grams "
           "(bold = best per preference)", "",
           *_value_table(tasks, prefs, mean, ".4f"), "",
           "## Relative error on the held-out Grams", "",
           *_value_table(tasks, prefs, mean_ho, ".4f"), "",
           "![fronts](compare.png)", ""]
  artifact.write_text(out / "compare.md", "\n".join(lines))
  pareto.plot_fronts(out / "compare.png", tasks, prefs, mean["mosp"], None,
                     title=f"{run.model} layer {prob.layer}, {run.pattern}",
                     extra={k: v for k, v in mean.items() if k != "mosp"},
                     metric="rel. error")
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  try:
    run, solver = run_lib.configs_from_flags()
    methods = methods_from_flags()
    out = prepare_out_dir(run, FLAGS.overwrite)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  artifact.write_text(out / "flags.txt", FLAGS.flags_into_string())
  t0 = time.perf_counter()
  if FLAGS.layer_level:
    res = compare_layer(
        run, solver, methods, layer=FLAGS.layer, linears=FLAGS.linears,
        use_cache=FLAGS.gram_cache)
  else:
    res = compare_model(run, solver, methods)
  print(json.dumps({k: res[k] for k in ("hypervolume", "mosp_dominates",
                                        "time_s")}, indent=1))
  print(f"wrote {out}/compare.json, compare.md, compare.png "
        f"({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
  app.run(main)
