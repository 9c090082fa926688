r"""MOSP against the single-objective baselines on identical inputs.

Two protocols for the baselines (`--baselines`, either or both):

- `concat` [paper-summary, the paper's protocol]: ONE model per baseline,
  calibrated on the concatenated data of all tasks (Gram `mean_i G_i`);
- `mixed` [ours, stricter]: one model per preference, each pruned on the
  preference-mixed Gram `H_lam` (a whole front per baseline, K times the
  cost).

Whole model (every method through the same layer walk, same model, data,
seed and sparsity):

  python -m experiments.compare --flagfile=experiments/configs/quick.flags \
      --out_dir=runs/compare [--baselines=concat,mixed]

One real layer, in about a minute (relative reconstruction error per task
instead of perplexity; the captured Grams are cached, so a second run only
solves), with MOSP ablations beside the default:

  python -m experiments.compare --layer_level \
      --flagfile=experiments/configs/quick.flags --out_dir=runs/layer \
      --mosp_variants='alpha=0;alpha=1;p=1'

Writes compare.json, compare.md and compare.png into --out_dir. Fronts are
compared in log space (log PPL, or log relative error per task) by their
hypervolume against two reference points:

- `paper`: SparseGPT-concat's model, 10% worse on every task (log value
  + log 1.1) [ours: the summary ties the paper's reference to SparseGPT's
  performance without giving the offset]; needs `--baselines=concat`;
- `shared`: the worst value of each task over every point of every
  entry, 10% worse, so every point contributes.

`mosp:W` is MOSP's stage-1 global model (ALPS on the concatenated Gram,
part of the Pareto set on disk); `mosp+W` is the preference models with
it. Every run flag of `experiments.run` applies; its own flags
(--export_pref, set by quick.flags) are accepted and ignored.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from typing import Any

from absl import flags

from bridge import load
from experiments.lib import comparison, runner, shared_flags
from experiments.lib.entries import Entry
from mosp_jax import cli
from mosp_jax.baselines import DATA_FREE, METHODS
from mosp_jax.config import SolverConfig
from mosp_jax.pipeline import artifact

flags.DEFINE_list("methods", list(METHODS), "Baselines to compare with "
                  f"MOSP (of {', '.join(METHODS)}), each under every "
                  "protocol of --baselines, or as method-protocol (e.g. "
                  "alps-mixed) under that protocol only; sparsegpt-concat "
                  "is added under --baselines=concat (the paper's "
                  "reference).")
flags.DEFINE_list("baselines", ["concat"], "Baseline protocols: concat "
                  "(one model on the concatenated data, the paper's "
                  "[paper-summary]) and/or mixed (one model per preference "
                  "on H_lam [ours]).")
flags.DEFINE_string("mosp_variants", "", "Extra MOSP entries, ';'-"
                    "separated, each ','-separated SolverConfig overrides, "
                    "e.g. 'alpha=0;p=1,pref_map=normalized'.")
flags.DEFINE_bool("layer_level", False, "Compare on one real layer "
                  "(relative errors) instead of the whole model (PPL).")
flags.DEFINE_integer("layer", -1, "Layer of --layer_level; -1: the middle "
                     "layer.")
flags.DEFINE_list("linears", [], "Linears of --layer_level (default all).")
flags.DEFINE_bool("gram_cache", True, "Cache the Grams --layer_level "
                  "captures (under $MOSP_JAX_CACHE/grams).")

FLAGS = flags.FLAGS
def _variant(text: str, solver: SolverConfig) -> tuple[str, SolverConfig]:
  """'alpha=0,p=1' -> ('mosp[alpha=0,p=1]', the overridden config)."""
  fields = {f.name: f.type for f in dataclasses.fields(SolverConfig)}
  changes: dict[str, Any] = {}
  for item in text.split(","):
    name, _, value = item.strip().partition("=")
    if name not in fields or not value:
      raise ValueError(f"--mosp_variants: expected field=value with a "
                       f"SolverConfig field ({', '.join(fields)}), got "
                       f"{item.strip()!r}")
    default = getattr(solver, name)
    try:
      changes[name] = (value if isinstance(default, str)
                       else type(default)(float(value)))
    except ValueError as e:
      raise ValueError(f"--mosp_variants: {name}={value!r} is not a "
                       "number") from e
  try:
    cfg = dataclasses.replace(solver, **changes)
  except ValueError as e:
    raise ValueError(f"--mosp_variants: {e}") from e
  return f"mosp[{text.strip()}]", cfg


def entries_from_flags(solver: SolverConfig, f=FLAGS) -> tuple[Entry, ...]:
  """MOSP (and its variants) first, then each baseline under each chosen
  protocol; raises ValueError naming the flag."""
  protocols = [p.strip() for p in f.baselines if p.strip()]
  bad = [p for p in protocols if p not in comparison.PROTOCOLS]
  if bad or not protocols:
    raise ValueError(f"--baselines: expected one or both of "
                     f"{list(comparison.PROTOCOLS)}, got {list(f.baselines)}")
  chosen = set()  # (method, protocol); data-free methods under either
  for item in filter(None, (m.strip() for m in f.methods)):
    method, _, protocol = item.partition("-")
    if method not in METHODS or (protocol
                                 and protocol not in comparison.PROTOCOLS):
      raise ValueError(f"--methods: unknown {item!r}; choose from "
                       f"{list(METHODS)}, each optionally as "
                       f"method-protocol ({', '.join(comparison.PROTOCOLS)})")
    chosen |= {(method, p) for p in ([protocol] if protocol else protocols)}
  if "concat" in protocols:
    chosen.add(("sparsegpt", "concat"))
  out = [Entry("mosp", "mosp", "pareto", solver)]
  for text in filter(str.strip, f.mosp_variants.split(";")):
    name, cfg = _variant(text, solver)
    out.append(Entry(name, "mosp", "pareto", cfg))
  for method in METHODS:
    mine = [p for p in comparison.PROTOCOLS if (method, p) in chosen]
    if method in DATA_FREE and mine:
      out.append(Entry(method, method, "data-free", solver))
    elif method not in DATA_FREE:
      out += [Entry(f"{method}-{p}", method, p, solver) for p in mine]
  return tuple(out)


def main(argv):
  del argv  # cli.run refuses positional arguments.
  run, solver = shared_flags.configs_from_flags()
  with cli.usage_errors():
    entries = entries_from_flags(solver)
  log = functools.partial(print, flush=True)
  memory = shared_flags.device_memory_bytes()
  # The plan is MOSP's walk, the entries' largest [ours: a baseline's
  # walk holds one model's test streams per task (P with 'mixed'), MOSP's
  # P + 2 and the Pareto sets]; entries run one after another.
  if shared_flags.print_plan_if_asked(run, solver, memory_bytes=memory,
                                      log=log):
    return
  if FLAGS.layer_level and (run.dtype != "float32" or FLAGS.offload_streams):
    raise cli.UsageError(
        f"--{'dtype' if run.dtype != 'float32' else 'offload_streams'}: the "
        "layer-level comparison captures and solves one layer in float32 "
        "on the device; these flags apply to the whole-model walk")
  out = comparison.check_out_dir(run, FLAGS.overwrite)
  runner.check_inputs(run)
  if FLAGS.layer_level:
    _, n_layers = load.model_shape(run.model, trust_pickle=run.trust_pickle)
    if n_layers is not None and not -1 <= FLAGS.layer < n_layers:
      raise cli.UsageError(f"--layer {FLAGS.layer}: {run.model} has "
                           f"{n_layers} layers (0..{n_layers - 1}; -1: the "
                           "middle one)")
  offload_streams = FLAGS.offload_streams
  if FLAGS.plan and not FLAGS.layer_level:
    offload_streams = runner.plan_run(
        run, solver, memory_bytes=memory, offload_streams=offload_streams,
        log=log).offload_streams
  t0 = time.perf_counter()
  if FLAGS.layer_level:
    res = comparison.compare_layer(run, entries, layer=FLAGS.layer,
                                   linears=FLAGS.linears,
                                   use_cache=FLAGS.gram_cache, log=log)
  else:
    res = comparison.compare_model(run, entries,
                                   offload_streams=offload_streams, log=log)
  artifact.write_text(out / "flags.txt", FLAGS.flags_into_string())
  keys = ["hypervolume", "paper_hypervolume", "mosp_dominates", "time_s"]
  print(json.dumps({k: res[k] for k in keys if k in res}, indent=1))
  print(f"wrote {out}/compare.json, compare.md, compare.png "
        f"({time.perf_counter() - t0:.0f}s)")


# One flagfile serves experiments.run and this command: the command line
# as `cli.run` gets it (tests/cli_worker.py uses it too).
cli_argv = shared_flags.accepting_run_only_flags

if __name__ == "__main__":
  cli.run(main, cli_argv(sys.argv))
