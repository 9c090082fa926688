r"""Export one preference of a MOSP run as a Hugging Face PyTorch checkpoint.

  python -m bridge.export --run_dir=runs/quick --preference=0.5,0.25,0.25 \
      --out=exports/quick-0.5 [--dtype=float32|float16|bfloat16]

--preference is 'centroid' or one weight per task. Writes a new folder
(safetensors weights, config.json, tokenizer files, mosp_export.json) that
stock `transformers.AutoModelForCausalLM.from_pretrained` loads; see
`bridge.torch_export`. Check it with `python -m bridge.parity --checkpoint=DIR`.
"""

from __future__ import annotations

from absl import flags

from bridge.torch_export import DTYPES, export_preference
from mosp_jax import cli

flags.DEFINE_string("run_dir", None, "A finished experiments.run directory.")
flags.DEFINE_string("preference", None, "'centroid' or comma-separated "
                    "weights, one per task (e.g. 0.5,0.25,0.25).")
flags.DEFINE_string("out", None, "Checkpoint folder to create.")
flags.DEFINE_enum("dtype", "float32", list(DTYPES), "Stored dtype.")
flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  del argv  # cli.run refuses positional arguments.
  for name in ("run_dir", "preference", "out"):
    if not getattr(FLAGS, name):
      raise cli.UsageError(f"--{name} is required")
  cli.check_in_dir(FLAGS.run_dir, flag="--run_dir")
  info = export_preference(FLAGS.run_dir, FLAGS.preference, FLAGS.out,
                           dtype=FLAGS.dtype, overwrite=FLAGS.overwrite,
                           log=lambda s: print(s, flush=True))
  print(f"exported {info.out}; check it with: python -m bridge.parity "
        f"--checkpoint={info.out}")


if __name__ == "__main__":
  cli.run(main)
