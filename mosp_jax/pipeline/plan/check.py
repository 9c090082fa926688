"""A measured run beside its plan, phase by phase (`experiments.check_plan`).

The run's per-layer records are `run_record.LayerRecord`s
(`walk.Walk.layers`; `results.json` 'layers').
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from mosp_jax.pipeline.plan.make import Plan
from mosp_jax.pipeline.run_record import LayerRecord


@dataclasses.dataclass(frozen=True)
class PhaseCheck:
  """One phase of a measured run beside its prediction.

  name: the walk's phase.
  predicted_s, measured_s: seconds per decoder layer (measured: the
    median over the run's layers after the first, which also compiles;
    the first alone when the run has one layer).
  measured_total_s: the phase's seconds over every layer of the run.
  """
  name: str
  predicted_s: float
  measured_s: float
  measured_total_s: float

  @property
  def ratio(self) -> float:
    """measured / predicted (inf when nothing was predicted)."""
    return (self.measured_s / self.predicted_s if self.predicted_s > 0
            else math.inf)


def measured_stage1_iters(layers: Sequence[LayerRecord]) -> int:
  """The mean stage-1 ADMM iteration count of a run's linears, rounded
  (MOSP's `LinearStats` per layer); 0 when none is recorded (a
  baseline's walk)."""
  iters = [lin.stage1_iters for rec in layers
           for lin in rec.linears.values()]
  return round(sum(iters) / len(iters)) if iters else 0


def _phase_seconds(rec: LayerRecord, phase: str) -> float:
  """A layer's wall seconds in `phase` (capture, solve, propagate,
  evaluate); nan where an older run did not measure it."""
  seconds = {"capture": rec.capture_s, "solve": rec.solve_s,
             "propagate": rec.propagate_s, "evaluate": rec.evaluate_s}[phase]
  return math.nan if seconds is None else float(seconds)


def check_phases(plan: Plan, layers: Sequence[LayerRecord]
                 ) -> tuple[PhaseCheck, ...]:
  """Each of the plan's phases beside a run's measured seconds per
  layer."""
  steady = list(layers[1:]) or list(layers[:1])
  out = []
  for phase in plan.phases:
    values = [_phase_seconds(rec, phase.name) for rec in steady]
    out.append(PhaseCheck(
        phase.name, phase.layer_seconds,
        float(np.median(values)) if values else math.nan,
        float(sum(_phase_seconds(rec, phase.name) for rec in layers))))
  return tuple(out)


def format_checks(checks: Sequence[PhaseCheck], *, tolerance: float,
                  min_seconds: float) -> str:
  """The checks as a table: per phase predicted and measured seconds per
  layer, their ratio, and 'ok' / 'OFF' against `tolerance` (relative)
  for phases whose measured total is over `min_seconds` ('-' below)."""
  def num(x: float) -> str:
    return f"{x:.2f}" if abs(x) >= 0.01 or x == 0 else f"{x:.1e}"

  lines = [f"  {'phase':<12}{'predicted s/layer':>18}{'measured s/layer':>18}"
           f"{'ratio':>10}  within {tolerance:.0%}"]
  for c in checks:
    if c.measured_total_s < min_seconds:
      verdict = f"- (under {min_seconds:g}s)"
    else:
      verdict = "ok" if abs(c.ratio - 1.0) <= tolerance else "OFF"
    lines.append(f"  {c.name:<12}{num(c.predicted_s):>18}"
                 f"{num(c.measured_s):>18}{num(c.ratio):>10}  {verdict}")
  return "\n".join(lines)
