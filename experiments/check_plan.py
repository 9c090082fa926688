r"""A run measured against its plan: seconds per phase and peak memory.

  python -m experiments.check_plan --flagfile=experiments/configs/sim7b.flags \
      --out_dir=runs/sim7b

Measures the device's rates, runs experiments.run's job on the same flags
(`runner.run_experiment`; a finished --out_dir is read back, not rerun)
and prints, per phase of the layer walk, the plan's predicted seconds per
decoder layer beside the measured ones (`pipeline.plan.check_phases`),
with the plan taken at the stage-1 ADMM iteration count the run measured
(random weights and short calibration converge differently from a real
model), and the plan's memory floor beside the measured peak
(`pipeline.plan.peak_memory`). Writes <out_dir>/plan_check.json. A plan
is trusted when every phase over --min_seconds is within --tolerance.
With --plan_only it prints the plan and exits, as experiments.run does
(nothing is run or written).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys

from absl import flags

from bridge import load
from experiments.lib import runner, shared_flags
from mosp_jax import cli
from mosp_jax.pipeline import artifact, run_record
from mosp_jax.pipeline import plan as plan_lib

flags.DEFINE_float("tolerance", 0.3, "Relative difference of measured and "
                   "predicted seconds a phase may have.")
flags.DEFINE_float("min_seconds", 5.0, "Phases whose measured total is "
                   "under this many seconds are shown but not judged.")

FLAGS = flags.FLAGS
OUTPUT = "plan_check.json"


def main(argv):
  del argv  # cli.run refuses positional arguments.
  log = functools.partial(print, flush=True)
  mesh = shared_flags.mesh_from_flags()
  run, solver = shared_flags.configs_from_flags()
  if FLAGS.tolerance <= 0 or FLAGS.min_seconds < 0:
    raise cli.UsageError("--tolerance must be > 0 and --min_seconds >= 0, "
                         f"got {FLAGS.tolerance}, {FLAGS.min_seconds}")
  memory = shared_flags.device_memory_bytes()
  if shared_flags.print_plan_if_asked(run, solver, memory_bytes=memory,
                                      log=log):
    return
  runner.check_inputs(run, weights=False)  # as run_experiment
  # Before the run, on a quiet device: the rates of the plan.
  planned = runner.plan_run(run, solver, memory_bytes=memory,
                            offload_streams=FLAGS.offload_streams, log=log)
  measured = not run_record.check_run_dir(
      run_record.ConfigRecord(run=run, solver=solver),
      overwrite=FLAGS.overwrite).finished
  res = runner.run_experiment(run, solver, overwrite=FLAGS.overwrite,
                              log=log, mesh=mesh,
                              offload_streams=planned.offload_streams)
  peak, peak_kind = plan_lib.peak_memory()
  # The plan reads results.json's layout of the layer records.
  layers = res.layers
  iters = plan_lib.measured_stage1_iters(layers) or planned.stage1_iters
  at_iters = runner.make_run_plan(
      run, solver, planned.device,
      plan_lib.shapes_from_config(load.model_config(
          run.model, trust_pickle=run.trust_pickle)),
      stage1_iters=iters,
      offload_streams=planned.offload_streams)
  checks = plan_lib.check_phases(at_iters, layers)
  log(f"measured against the plan at {iters} stage-1 iterations (the "
      f"run's mean; the plan above assumed {planned.stage1_iters}):")
  log(plan_lib.format_checks(checks, tolerance=FLAGS.tolerance,
                             min_seconds=FLAGS.min_seconds))
  log(f"  memory: plan {at_iters.total_bytes / plan_lib.GIB:.2f} GiB "
      f"(arrays, every term at its peak); measured "
      f"{peak / plan_lib.GIB:.2f} GiB "
      f"({peak_kind}{'' if measured else ', of reading a finished run'})")
  report = {
      "model": run.model, "layers": len(res.layers),
      "device": dataclasses.asdict(planned.device),
      "stage1_iters": {"assumed": planned.stage1_iters, "measured": iters},
      "plan": dataclasses.asdict(at_iters),
      "plan_total_bytes": at_iters.total_bytes,
      "phases": [dataclasses.asdict(c) | {
          "ratio": c.ratio if math.isfinite(c.ratio) else None}
                 for c in checks],
      "tolerance": FLAGS.tolerance, "min_seconds": FLAGS.min_seconds,
      "peak_memory_bytes": peak if measured else None,
      "peak_memory_kind": peak_kind, "timings": res.timings}
  path = f"{run.out_dir}/{OUTPUT}"
  artifact.write_text(path, json.dumps(report, indent=1) + "\n")
  log(f"wrote {path}")


# It reads experiments.run's flagfiles (quick.flags sets --export_pref):
# the command line as `cli.run` gets it (tests/cli_worker.py uses it too).
cli_argv = shared_flags.accepting_run_only_flags

if __name__ == "__main__":
  cli.run(main, cli_argv(sys.argv))
