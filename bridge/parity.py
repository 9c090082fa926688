r"""Check that an exported PyTorch checkpoint is the model the run pruned.

  python -m bridge.parity --checkpoint=exports/quick-0.5 \
      [--run_dir=runs/quick --preference=0.5,0.25,0.25] [--rtol=1e-3]

--run_dir and --preference default to those in the checkpoint's
mosp_export.json. Prints the perplexity of every task with PyTorch (stock
transformers on the checkpoint) and with JAX (the run's layer walk) on the
run's test segments, the per-linear sparsity against the masks, and every
problem; exits 1 when any check fails (a relative perplexity difference
above --rtol, a mask or a weight that differs, ...; see `bridge.parity_check`).
"""

from __future__ import annotations

import sys

from absl import flags

from bridge.parity_check import DEFAULT_RTOL, check_parity, format_report
from mosp_jax import cli
from mosp_jax.pipeline import artifact

flags.DEFINE_string("checkpoint", None, "Exported checkpoint folder.")
flags.DEFINE_string("run_dir", None, "The run it was exported from "
                    "(default: from mosp_export.json).")
flags.DEFINE_string("preference", None, "'centroid' or comma-separated "
                    "weights (default: from mosp_export.json).")
flags.DEFINE_float("rtol", DEFAULT_RTOL, "Largest relative perplexity "
                   "difference allowed.")
flags.DEFINE_float("weight_atol", 0.0, "Largest absolute weight "
                   "difference allowed (0: bitwise equal).")
flags.DEFINE_integer("batch_size", 0, "Segments per forward pass (0: the "
                     "run's batch size).")
flags.DEFINE_bool("verbose", False, "Print every linear.")
flags.DEFINE_string("report", "", "Also write the report as JSON here.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  del argv  # cli.run refuses positional arguments.
  if not FLAGS.checkpoint:
    raise cli.UsageError("--checkpoint is required")
  cli.check_in_dir(FLAGS.checkpoint, flag="--checkpoint")
  if FLAGS.run_dir:
    cli.check_in_dir(FLAGS.run_dir, flag="--run_dir")
  if FLAGS.report:
    cli.check_out_file(FLAGS.report, flag="--report")
  for name in ("rtol", "weight_atol", "batch_size"):
    if getattr(FLAGS, name) < 0:
      raise cli.UsageError(f"--{name} must be >= 0, got "
                           f"{getattr(FLAGS, name)}")
  report = check_parity(
      FLAGS.checkpoint, FLAGS.run_dir, FLAGS.preference, rtol=FLAGS.rtol,
      weight_atol=FLAGS.weight_atol, batch_size=FLAGS.batch_size or None,
      log=lambda s: print(s, flush=True))
  print(format_report(report, verbose=FLAGS.verbose))
  if FLAGS.report:
    artifact.write_json(FLAGS.report, report.to_json())
  sys.exit(0 if report.ok else cli.EXIT_FAILURE)


if __name__ == "__main__":
  cli.run(main)
