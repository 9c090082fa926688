"""A run's plan: device memory and seconds per phase, before any heavy work.

`make_plan(shapes, run, solver, device)` counts, from the model's config
alone (`shapes_from_config`, `jax.eval_shape`: no weight is allocated),
what the current walk (`walk.walk_layers` with MOSP's unit,
`prune.py`) holds on the device at once and how much work each of its
timed phases does. Every term is a closed formula, written in the
docstring of the function that computes it, so that a measured run can
be compared term by term ('capture', 'solve', 'propagate', 'evaluate'
seconds per layer, `walk.Walk.layers`).

Modules, one job each:

  shapes   the model's shapes from its config (`ModelShapes`)
  memory   the memory terms (`memory_rows`, `Row`)
  cost     the work per phase and its seconds (`phase_work`, `Work`,
           `Device`)
  make     the plan of a run (`make_plan`, `Plan`, `Phase`)
  report   the plan as text, the refusal when it does not fit
  check    a measured run beside its plan (`check_phases`)
  probes   the device's memory and rates, measured on the spot

Notation: `m` tasks, `N` calibration segments per task, `T` tokens per
segment, `S = test_tokens // T` test segments per task, `P` evaluated
preference models (vertices included), `B` the batch size, `d` the hidden
size, `L` decoder layers; per decoder layer the linears `(n, o)` (inputs,
outputs) and the groups sharing an input (`n_g`, one Gram each); `b` bytes
per activation or weight element (4 for float32; `act_bytes`), `g = 4`
bytes of a Gram or solver element (the capture and the solvers compute in
float32 whatever the model's dtype, `grams.py`).

`experiments.check_plan` sets a measured run beside its plan
(`check_phases`).
"""

from mosp_jax.pipeline.plan.check import (
  PhaseCheck,
  check_phases,
  format_checks,
  measured_stage1_iters,
)
from mosp_jax.pipeline.plan.cost import Device
from mosp_jax.pipeline.plan.make import Phase, Plan, make_plan
from mosp_jax.pipeline.plan.memory import Row
from mosp_jax.pipeline.plan.probes import (
  available_memory_bytes,
  measure_device,
  pass_probe_shape,
  peak_memory,
  with_forward_rate,
)
from mosp_jax.pipeline.plan.report import GIB, format_plan, refusal
from mosp_jax.pipeline.plan.shapes import (
  Linear,
  ModelShapes,
  shapes_from_config,
)

__all__ = [
  "GIB", "Device", "Linear", "ModelShapes", "Phase", "PhaseCheck", "Plan",
  "Row", "available_memory_bytes", "check_phases", "format_checks",
  "format_plan", "make_plan", "measure_device", "measured_stage1_iters",
  "pass_probe_shape", "peak_memory", "refusal", "shapes_from_config",
  "with_forward_rate",
]
