"""MOSP against the single-objective baselines: the comparison itself.

`compare_model` runs every entry (MOSP and the baselines under their
protocols, `entries.Entry`) through the same layer walk of the whole
model and scores log perplexities; `compare_layer` does the same on one
captured layer with relative reconstruction errors. Both write
compare.json, compare.md and compare.png. The command and its flags are
`experiments.compare`.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time

import jax
import numpy as np

from bridge import load
from experiments.lib import layer_compare
from experiments.lib.entries import Entry
from mosp_jax import cli
from mosp_jax.config import RunConfig
from mosp_jax.pipeline import (
  artifact,
  front_plot,
  hypervolume,
  preferences,
  streams,
  walk,
)
from mosp_jax.pipeline.grams import layer_grams
from mosp_jax.pipeline.layer_source import DenseLayers
from mosp_jax.pipeline.prune import prune_and_evaluate
from mosp_jax.pipeline.single_objective import baseline_walk

PROTOCOLS = ("concat", "mixed")
PAPER_REFERENCE = "sparsegpt-concat"
MARGIN = float(np.log(1.1))



# What a comparison writes into --out_dir; --overwrite deletes these.
COMPARE_OUTPUTS = ("compare.json", "compare.md", "compare.png", "flags.txt")


def check_out_dir(run: RunConfig, overwrite: bool) -> pathlib.Path:
  """Checks --out_dir without writing: a folder (or creatable), empty
  unless `overwrite`; raises `cli.UsageError`."""
  out = cli.check_out_dir(run.out_dir, flag="--out_dir")
  if out.is_dir() and any(out.iterdir()) and not overwrite:
    raise cli.UsageError(f"--out_dir {out} exists and is not empty; pass "
                         "--overwrite or choose a new directory")
  return out


def prepare_out_dir(run: RunConfig, overwrite: bool) -> pathlib.Path:
  """`check_out_dir`, then deletes a previous comparison's outputs (when
  `overwrite`) and creates --out_dir."""
  out = check_out_dir(run, overwrite)
  if overwrite:
    for name in COMPARE_OUTPUTS:
      (out / name).unlink(missing_ok=True)
  out.mkdir(parents=True, exist_ok=True)
  return out


def with_global(points: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Adds 'mosp+W' (MOSP's preference models and its global model)."""
  if "mosp" in points and "mosp:W" in points:
    return {**points, "mosp+W": np.concatenate([points["mosp"],
                                                points["mosp:W"]])}
  return points


def summarize(points: dict[str, np.ndarray]) -> dict:
  """Front metrics of each entry's `(points, m)` values (minimisation,
  values > 0) in log space, under the shared reference and, when
  SparseGPT-concat is among them, the paper's."""
  logs = {k: np.log(np.asarray(v, np.float64)) for k, v in points.items()}
  shared = hypervolume.reference_point(list(logs.values()), margin=MARGIN)
  mosp = logs["mosp"]
  others = [k for k in logs if not k.startswith("mosp")]
  out = {
      "space": "log",
      "reference": shared.tolist(),
      "hypervolume": {k: hypervolume.hypervolume(v, shared)
                      for k, v in logs.items()},
      "mosp_dominates": {k: hypervolume.dominated_count(mosp, logs[k])
                         for k in others},
      "dominates_mosp": {k: hypervolume.dominated_count(logs[k], mosp)
                         for k in others},
      "points": {k: int(v.shape[0]) for k, v in logs.items()},
  }
  if PAPER_REFERENCE in logs:
    ref = logs[PAPER_REFERENCE][0] + MARGIN
    out["paper_reference"] = ref.tolist()
    out["paper_hypervolume"] = {k: hypervolume.hypervolume(v, ref)
                                for k, v in logs.items()}
  return out


def _pref(p: np.ndarray) -> str:
  return preferences.format_pref(p)  # 0.333, 0.5, 0


def _value_table(tasks: list[str], prefs: np.ndarray,
                 values: dict[str, np.ndarray], fmt: str,
                 dense: np.ndarray | None = None) -> list[str]:
  """Rows entry x model, columns tasks; bold = best per task over every
  point of every entry."""
  lines = ["| entry | preference | " + " | ".join(tasks) + " |",
           "|---|---|" + "---|" * len(tasks)]
  if dense is not None:
    lines.append("| dense | | " + " | ".join(format(x, fmt) for x in dense)
                 + " |")
  # 'mosp+W' only regroups rows listed under 'mosp' and 'mosp:W'.
  values = {k: v for k, v in values.items() if not k.endswith("+W")}
  best = np.concatenate(list(values.values())).min(axis=0)
  for name, v in values.items():
    labels = ([_pref(p) for p in prefs] if v.shape[0] == prefs.shape[0]
              else ["(one model)"] * v.shape[0])
    for label, row in zip(labels, v, strict=True):
      cells = [f"**{x:{fmt}}**" if x == best[t] else format(x, fmt)
               for t, x in enumerate(row)]
      lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
  return lines


def _summary_table(summary: dict, time_s: dict[str, float],
                   cpu_s: dict[str, float]) -> list[str]:
  hv = summary["hypervolume"]
  paper = summary.get("paper_hypervolume")
  head = "| entry | points | hypervolume (shared ref) |"
  if paper is not None:
    head += " hypervolume (paper ref) |"
  head += (" points MOSP dominates | MOSP points it dominates | wall (s) |"
           " CPU (s) |")
  lines = [head, "|---" * (head.count("|") - 1) + "|"]
  n_mosp = summary["points"]["mosp"]
  for k in hv:
    cells = [k, str(summary["points"][k]), f"{hv[k]:.4g}"]
    if paper is not None:
      cells.append(f"{paper[k]:.4g}")
    if k in summary["mosp_dominates"]:
      cells += [f"{summary['mosp_dominates'][k]} / {summary['points'][k]}",
                f"{summary['dominates_mosp'][k]} / {n_mosp}"]
    else:
      cells += ["", ""]
    cells += ([f"{time_s[k]:.1f}", f"{cpu_s[k]:.1f}"] if k in time_s
              else ["", ""])
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def _reference_note(summary: dict) -> str:
  note = (f"Hypervolume in log space; higher is better. Shared reference "
          f"{_pref(np.asarray(summary['reference']))} (the worst value "
          "per task over every point, 10% worse).")
  if "paper_reference" in summary:
    note += (f" Paper reference {_pref(np.asarray(summary['paper_reference']))}"
             " (SparseGPT-concat's model, 10% worse per task).")
  return note


def _warm_shared(adapter, model: DenseLayers, segments: list[np.ndarray],
                 batch_size: int) -> None:
  """Compiles the walk's shared model functions (embed, one layer, Gram
  capture, head) for every batch shape, so that the first method timed
  does not pay for the others."""
  params, lp = model.outer, model.layer(0)
  shapes = {b.shape for ids in segments
            for b in streams.device_batches(ids, batch_size)}
  for shape in sorted(shapes):
    ids = jax.device_put(np.zeros(shape, np.int32))
    h = streams.embed(adapter, params, ids)
    layer_grams(adapter, lp, [h])
    h = streams.advance(adapter, lp, h)
    jax.block_until_ready(streams.nll(adapter, params, h, ids))


def _write_comparison(run: RunConfig, entries: tuple[Entry, ...], *,
                      mode: str, where: dict, values: dict[str, np.ndarray],
                      fields: dict, title: str, intro: str,
                      sections: list[str], dense: np.ndarray | None,
                      plot_title: str, metric: str) -> dict:
  """The skeleton both comparisons share: compare.json (`mode`, the
  model, `where` it was compared, the pattern, tasks, preferences and
  entries, then the comparison's own `fields` and the MOSP entries'
  solver settings), compare.md (`title`, `intro` with the protocols, the
  solver settings, then `sections`, then the figure) and compare.png (the
  fronts of `values`, `(points, m)` per entry, beside `dense`). Returns
  compare.json's content."""
  prefs = np.asarray(run.prefs, np.float32)
  results = {
      "mode": mode, "model": run.model, **where,
      "pattern": str(run.pattern), "sparsity": run.pattern.sparsity,
      "tasks": list(run.tasks), "prefs": prefs.tolist(),
      **({} if dense is None else {"dense_ppl": dict(zip(
          run.tasks, dense.tolist(), strict=True))}),
      "entries": [{"name": e.name, "method": e.method,
                   "protocol": e.protocol} for e in entries],
      **fields,
      "solver": {e.name: dataclasses.asdict(e.cfg) for e in entries
                 if e.method == "mosp"}}
  out = prepare_out_dir(run, overwrite=True)
  artifact.write_json(out / "compare.json", results)
  lines = [f"# {title}", "", intro + " " + _protocol_note(entries), "",
           _solver_note(entries), "", *sections, "![fronts](compare.png)",
           ""]
  artifact.write_text(out / "compare.md", "\n".join(lines))
  front_plot.plot_fronts(
      out / "compare.png", list(run.tasks), prefs, values["mosp"], dense,
      title=plot_title, metric=metric,
      extra={k: v for k, v in values.items() if k not in ("mosp",
                                                           "mosp+W")})
  return results


def _walk_entries(run: RunConfig, entries: tuple[Entry, ...], adapter,
                  model: DenseLayers, calib: list[np.ndarray],
                  test: list[np.ndarray], *, offload_streams: bool, log
                  ) -> tuple[dict[str, walk.Front], dict[str, float]]:
  """Every entry's front through the whole-model walk, and the process
  CPU seconds of each."""
  prefs = np.asarray(run.prefs, np.float32)
  fronts, cpu_s = {}, {}
  with jax.transfer_guard("disallow"):
    _warm_shared(adapter, model, calib + test, run.batch_size)
    for entry in entries:
      c0 = time.process_time()
      if entry.method == "mosp":
        fronts[entry.name] = prune_and_evaluate(
            adapter, model, calib, test, prefs, pattern=run.pattern,
            cfg=entry.cfg, batch_size=run.batch_size, artifact_dir=None,
            log=log, offload_streams=offload_streams)
      else:
        fronts[entry.name] = baseline_walk(
            adapter, model, calib, test, prefs, method=entry.method,
            protocol=entry.protocol, pattern=run.pattern, cfg=entry.cfg,
            batch_size=run.batch_size, log=log,
            offload_streams=offload_streams)
      cpu_s[entry.name] = time.process_time() - c0
  return fronts, cpu_s


def compare_model(run: RunConfig, entries: tuple[Entry, ...], *,
                  offload_streams: bool = False, log=print) -> dict:
  """Runs every entry through the whole-model walk (streams in host
  memory with `offload_streams`); returns the results written to
  compare.json (and writes compare.md, compare.png)."""
  adapter, params, calib, test, (t_model, t_data) = \
      layer_compare.load_inputs(run, log=log)
  adapter, model = load.layered(adapter, params, what=run.model,
                                dtype=run.dtype)
  prefs = np.asarray(run.prefs, np.float32)
  tasks = list(run.tasks)
  log(f"compare {run.model}, {run.pattern}: {len(tasks)} tasks, "
      f"{prefs.shape[0]} preferences, entries "
      f"{', '.join(e.name for e in entries)}")
  fronts, cpu_s = _walk_entries(run, entries, adapter, model, calib, test,
                                offload_streams=offload_streams, log=log)
  dense = fronts["mosp"].walk.dense_ppl
  for name, f in fronts.items():  # identical inputs -> identical dense
    if not np.allclose(f.walk.dense_ppl, dense, rtol=1e-4):
      raise RuntimeError(f"{name}: dense PPL {f.walk.dense_ppl} differs "
                         f"from MOSP's {dense}; inputs are not identical")
  ppl = {k: f.ppl for k, f in fronts.items()}
  for e in entries:
    global_ppl = fronts[e.name].global_ppl
    if global_ppl is not None:  # MOSP walks evaluate W.
      ppl[f"{e.name}:W"] = global_ppl[None]
  ppl = with_global(ppl)
  summary = summarize(ppl)
  time_s = {k: f.walk.seconds["total"] for k, f in fronts.items()}
  set_s = {k: f.walk.seconds["set"] for k, f in fronts.items()}
  fields = {
      "ppl": {k: v.tolist() for k, v in ppl.items()},
      "model_sparsity": {k: f.sparsity.tolist() for k, f in fronts.items()},
      **summary, "time_s": time_s,
      "walk_s": {k: f.walk.seconds["walk"] for k, f in fronts.items()},
      "set_s": set_s,
      "cpu_s": cpu_s,
      "seconds": {k: f.walk.seconds for k, f in fronts.items()},
      "load_s": {"model": t_model, "data": t_data},
      "calibration": {"nsamples": run.nsamples, "seqlen": run.seqlen,
                      "test_segments": int(test[0].shape[0]),
                      "seed": run.seed}}
  return _write_comparison(
      run, entries, mode="model", where={}, values=ppl, fields=fields,
      title=f"MOSP vs baselines: {run.model}, {run.pattern}",
      intro=f"Tasks {', '.join(tasks)}; calibration {run.nsamples} x "
      f"{run.seqlen} tokens per task, test {test[0].shape[0]} x "
      f"{run.seqlen} per task, seed {run.seed}.",
      sections=["## Summary", "", _reference_note(summary) + " Time: wall "
                "and process CPU seconds of the whole walk (capture, "
                "solve, propagate, evaluate), including the compilation of "
                "the entry's own solver; the walk alone (capture, solve, "
                "calibration propagation) in compare.json `walk_s`.", "",
                *_summary_table(summary, time_s, cpu_s), "",
                _set_note(set_s), "",
                "## Perplexity (lower is better; bold = best per task)", "",
                *_value_table(tasks, prefs, ppl, ".2f", dense), ""],
      dense=dense, plot_title=f"{run.model}, {run.pattern}", metric="PPL")


def _set_note(set_s: dict[str, float]) -> str:
  """One line: the seconds each entry takes to produce its models (the
  walk and building the models, not evaluating them), and MOSP's against
  ALPS-concat's where both ran."""
  line = ("Producing the models (walk + building them, wall s): "
          + ", ".join(f"{k} {v:.0f}" for k, v in set_s.items()))
  if "mosp" in set_s and set_s.get("alps-concat"):
    line += (f"; mosp / alps-concat = "
             f"{set_s['mosp'] / set_s['alps-concat']:.2f}x")
  return line + "."


def _protocol_note(entries: tuple[Entry, ...]) -> str:
  protocols = {e.protocol for e in entries}
  parts = []
  if "concat" in protocols:
    parts.append("'-concat' baselines: one model each, calibrated on the "
                 "concatenated data of all tasks (the paper's protocol)")
  if "mixed" in protocols:
    parts.append("'-mixed' baselines: one model per preference, pruned on "
                 "the mixed Gram H_lam (the vertices are single-task runs)")
  if "data-free" in protocols:
    parts.append("magnitude uses no data (one model)")
  parts.append("'mosp:W' is MOSP's global model (stage 1), 'mosp+W' its "
               "preference models together with it")
  return "; ".join(parts) + "."


def _solver_note(entries: tuple[Entry, ...]) -> str:
  """One line naming the solver settings that differ from the defaults."""
  parts = []
  for e in entries:
    changed = [f"{f.name}={getattr(e.cfg, f.name)}"
               for f in dataclasses.fields(e.cfg)
               if getattr(e.cfg, f.name) != f.default]
    if changed and e.method == "mosp":  # Baselines share mosp's.
      parts.append(f"{e.name}: " + ", ".join(changed))
  if not parts:
    return "Solver settings: the defaults (SolverConfig)."
  return ("Solver settings that differ from the defaults (SolverConfig): "
          + "; ".join(parts) + ".")


def compare_layer(run: RunConfig, entries: tuple[Entry, ...], *,
                  layer: int = -1, linears: list[str] | tuple[str, ...] = (),
                  use_cache: bool = True, log=print) -> dict:
  """Every entry on one real layer; returns the results written to
  compare.json (and writes compare.md, compare.png). A point is an
  entry's model's relative error per task averaged over the layer's
  linears."""
  prob = layer_compare.capture_layer(run, layer, linears=linears,
                                     use_cache=use_cache, log=log)
  prefs = np.asarray(run.prefs, np.float32)
  tasks = list(run.tasks)
  res = layer_compare.solve_layer(prob, prefs, entries, pattern=run.pattern,
                                  linears=linears, log=log)
  names = list(res.errors["mosp"])
  mean = with_global({k: np.mean(np.stack(list(v.values())), axis=0)
                      for k, v in res.errors.items()})
  mean_ho = with_global({k: np.mean(np.stack(list(v.values())), axis=0)
                         for k, v in res.heldout.items()})
  summary = summarize(mean)
  summary_ho = summarize(mean_ho)
  fields = {
      "rel_error": {k: v.tolist() for k, v in mean.items()},
      "rel_error_heldout": {k: v.tolist() for k, v in mean_ho.items()},
      "rel_error_per_linear": {k: {n: e.tolist() for n, e in v.items()}
                               for k, v in res.errors.items()},
      **summary, "time_s": res.seconds, "cpu_s": res.cpu_seconds,
      "heldout": {k: summary_ho[k] for k in summary_ho
                  if k not in ("space", "points")},
      "calibration": {"nsamples": run.nsamples, "seqlen": run.seqlen,
                      "test_tokens": run.test_tokens, "seed": run.seed}}
  shapes = ", ".join(f"{n} {prob.kernels[n].shape[0]}x"
                     f"{prob.kernels[n].shape[1]}" for n in names)
  return _write_comparison(
      run, entries, mode="layer",
      where={"layer": prob.layer, "num_layers": prob.num_layers,
             "linears": names},
      values=mean, fields=fields,
      title=f"MOSP vs baselines on one layer: {run.model} layer "
      f"{prob.layer}/{prob.num_layers}, {run.pattern}",
      intro=f"Linears: {shapes}. Grams of {run.nsamples} x {run.seqlen} "
      f"calibration tokens per task ({', '.join(tasks)}), seed "
      f"{run.seed}; held-out Grams from up to {run.test_tokens} test "
      "tokens per task. A point is the relative reconstruction error "
      "per task, averaged over the linears.",
      sections=["## Summary (calibration Grams, the objective)", "",
                _reference_note(summary) + " Time: wall and process CPU "
                "seconds of the solves over the linears, compilation "
                "excluded (a MOSP entry's time includes materialising its "
                f"{prefs.shape[0]} preference models). On a shared machine "
                "both vary with the load: compare entries within one run.",
                "", *_summary_table(summary, res.seconds, res.cpu_seconds),
                "", "## Summary (held-out Grams)", "",
                _reference_note(summary_ho), "",
                *_summary_table(summary_ho, res.seconds, res.cpu_seconds),
                "", "## Relative error on the calibration Grams "
                "(bold = best per task)", "",
                *_value_table(tasks, prefs, mean, ".4f"), "",
                "## Relative error on the held-out Grams", "",
                *_value_table(tasks, prefs, mean_ho, ".4f"), ""],
      dense=None, plot_title=f"{run.model} layer {prob.layer}, "
      f"{run.pattern}", metric="rel. error")
