#!/usr/bin/env bash
# The GPU check of the paper-scale plan and solvers: one script, one JSON.
#   bash experiments/gpu_prepare.sh          # here, once (PyPI needed)
#   bash experiments/gpu_check.sh [OUT_DIR]  # on the GPU machine
# (with the `device` tool: run(command="bash experiments/gpu_check.sh",
# carry=[".gpu"], timeout_s=540); OUT_DIR defaults to $OUT, else
# runs/gpu_check). Runs, each under its own time limit:
#   1. experiments.bench_solvers --large: ADMM, and MOSP against ALPS, at
#      Llama-2-7B's linears (4096x4096, 4096x11008, 11008x4096) beside
#      SmolLM2's (bench.json is rewritten after each shape, so a run cut
#      by its time limit keeps the shapes it finished);
#   2. experiments.check_plan on sim7b.flags: 2 decoder layers of a random
#      Llama-2-7B, 3 tasks, 7 preferences, measured against its plan;
#   3. the 4096^2 float32 matmul rate in true float32 (what every command
#      computes, mosp_jax/cli.py: float32_matmuls) and in TensorFloat32
#      (JAX's default on the GPU): what the float32 costs there;
# and writes OUT_DIR/gpu_check.json (device, versions, the three results) with
# the two logs. GPU_CHECK_SMOKE=1 runs both on the smoke model instead
# (a minute on a CPU: checks this script, not the GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-runs/gpu_check}}"
mkdir -p "$out"
work="$(mktemp -d)"
if [ -d .gpu/whl ]; then  # transformers < 5 over the machine's own
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target "$work/site" .gpu/whl/*.whl || exit 1
  export PYTHONPATH="$work/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
if [ -d .gpu/cache ]; then  # a copy: the run writes its caches
  cp -r .gpu/cache "$work/cache"
  export MOSP_JAX_CACHE="$work/cache"
fi
export PYTHONUNBUFFERED=1
if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
  bench=(--repeats=1 --iters=2 --prefs=3)
  sim=(--flagfile=experiments/configs/smoke.flags)
else
  bench=(--large --repeats=2)
  sim=(--flagfile=experiments/configs/sim7b.flags)
fi
timeout 270 python3 -m experiments.bench_solvers "${bench[@]}" \
    --out="$work/bench.json" > "$out/bench.log" 2>&1
bench_rc=$?
timeout 270 python3 -m experiments.check_plan "${sim[@]}" \
    --out_dir="$work/sim" > "$out/sim.log" 2>&1
sim_rc=$?
python3 - "$out" "$work" "$bench_rc" "$sim_rc" <<'PY'
import json, pathlib, platform, sys

import jax

out, work = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])


def read(path):
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as e:
    return {"missing": str(e)}


import flax
import transformers

from mosp_jax.pipeline.plan import probes

gflops = {}
for precision in ("float32", "tensorfloat32"):
  with jax.default_matmul_precision(precision):
    gflops[precision] = probes.measure_matmul_flops(4096) / 1e9

dev = jax.devices()[0]
report = {
    "device": getattr(dev, "device_kind", dev.platform),
    "platform": dev.platform, "python": platform.python_version(),
    "versions": {"jax": jax.__version__, "flax": flax.__version__,
                 "transformers": transformers.__version__},
    "exit_status": {"bench_solvers": int(sys.argv[3]),
                    "check_plan": int(sys.argv[4])},
    "bench_solvers": read(work / "bench.json"),
    "check_plan": read(work / "sim" / "plan_check.json"),
    "matmul_gflops_4096": gflops,
}
(out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
print(f"wrote {out}/gpu_check.json: bench_solvers exit "
      f"{sys.argv[3]}, check_plan exit {sys.argv[4]} (124: out of time)")
PY
rm -rf "$work"
[ "$bench_rc" = 0 ] && [ "$sim_rc" = 0 ]
