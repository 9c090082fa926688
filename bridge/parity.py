r"""Check that an exported PyTorch checkpoint is the model the run pruned.

  python -m bridge.parity --checkpoint=exports/quick-0.5 \
      [--run_dir=runs/quick --preference=0.5,0.25,0.25] [--rtol=1e-3]

--run_dir and --preference default to those in the checkpoint's
mosp_export.json. Prints the perplexity of every task with PyTorch (stock
transformers on the checkpoint) and with JAX (the run's layer walk) on the
run's test segments, the per-linear sparsity against the masks, and every
problem; exits 1 when any check fails (a relative perplexity difference
above --rtol, a mask or a weight that differs, ...; see `bridge.verify`).
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from bridge.verify import DEFAULT_RTOL, check_parity, format_report

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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not FLAGS.checkpoint:
    print("error: --checkpoint is required", file=sys.stderr)
    sys.exit(2)
  try:
    report = check_parity(
        FLAGS.checkpoint, FLAGS.run_dir, FLAGS.preference, rtol=FLAGS.rtol,
        weight_atol=FLAGS.weight_atol, batch_size=FLAGS.batch_size or None,
        log=print)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(format_report(report, verbose=FLAGS.verbose))
  if FLAGS.report:
    with open(FLAGS.report, "w") as f:
      json.dump(report.to_json(), f, indent=1)
  sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
  app.run(main)
