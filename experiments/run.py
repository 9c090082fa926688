r"""Prune a model for several tasks with MOSP and evaluate its Pareto set.

  python -m experiments.run --flagfile=experiments/configs/quick.flags
  python -m experiments.run --flagfile=experiments/configs/smoke.flags \
      --out_dir=/tmp/smoke

Writes into --out_dir: flags.txt (the resolved flags), results.json,
report.md, pareto.png and pareto/ (the compact Pareto set: per linear the
core support, the global and the task models and the column scale, from
which any preference is materialised later with no Gram and no solve, e.g.
by `python -m bridge.export`). Before the model is loaded it prints the
run's memory and time plan and refuses a run that does not fit
(--plan, --plan_only, --device_memory_gb; mosp_jax/pipeline/plan/).
"""

from __future__ import annotations

import functools
import time

from absl import flags, logging

from bridge import pruned
from experiments.lib import runner, shared_flags
from mosp_jax import cli
from mosp_jax.pipeline import artifact, run_record

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

FLAGS = flags.FLAGS


def main(argv):
  del argv  # cli.run refuses positional arguments.
  log = functools.partial(print, flush=True)
  mesh = shared_flags.mesh_from_flags()
  run, solver = shared_flags.configs_from_flags()
  if FLAGS.export_pref != "none":  # Fail before the run, not after.
    with cli.usage_errors("--export_pref"):
      pruned.parse_preference(FLAGS.export_pref, run.tasks,
                              flag="--export_pref")
  memory = shared_flags.device_memory_bytes()
  if shared_flags.print_plan_if_asked(run, solver, memory_bytes=memory,
                                      log=log):
    return
  logging.info("run config: %s", run)
  logging.info("solver config: %s", solver)
  logging.info("solver mesh: %s", mesh and dict(mesh.shape))

  def pause(layer: int) -> None:
    if layer == FLAGS.pause_after_layer:
      time.sleep(FLAGS.pause_seconds)

  out, _, finished = run_record.check_run_dir(
      run_record.ConfigRecord(run=run, solver=solver),
      overwrite=FLAGS.overwrite)
  # A finished run is read back (runner.NOTHING_REDONE). Bad input and
  # non-finite numbers end the run with one `error:` line (cli.run); what
  # was already written (artifact layers, checkpoint) stays valid, and the
  # same command resumes.
  res = runner.run_experiment(run, solver, overwrite=FLAGS.overwrite,
                              log=log, on_layer_done=pause, mesh=mesh,
                              plan=FLAGS.plan, device_memory_bytes=memory,
                              offload_streams=FLAGS.offload_streams)
  if not finished:
    artifact.write_text(out / run_record.FLAGS_FILE,
                        FLAGS.flags_into_string())
    log("\n".join(runner.summary_lines(res)))
    log(f"wrote {out}/results.json, report.md, pareto.png, pareto/")
  if FLAGS.export_pref != "none":
    runner.export_and_record(out, FLAGS.export_pref)


if __name__ == "__main__":
  cli.run(main)
