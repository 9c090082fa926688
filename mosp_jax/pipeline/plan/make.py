"""The plan of a run: its memory rows and timed phases on one device.

`make_plan(shapes, run, solver, device)` puts together the memory terms
(`memory.memory_rows`) and the work of each of the walk's phases
(`cost.phase_work`) at the device's measured rates, so that a measured
run can be compared phase by phase (`check.check_phases`).
"""

from __future__ import annotations

import dataclasses

from mosp_jax.config import RunConfig, SolverConfig
from mosp_jax.pipeline.plan.cost import (
  EXPECTED_STAGE1_ITERS,
  Device,
  Work,
  phase_work,
)
from mosp_jax.pipeline.plan.memory import Row, memory_rows
from mosp_jax.pipeline.plan.shapes import ModelShapes


@dataclasses.dataclass(frozen=True)
class Phase:
  """One timed phase of the walk.

  name: the walk's phase ('capture', 'solve', 'propagate', 'evaluate').
  per_layer: its work on one decoder layer.
  once: its work done once per run (the evaluation's perplexity head).
  layers: decoder layers `L`.
  layer_seconds: predicted seconds of one layer (`walk.Walk.layers`'
    '<name>_s').
  seconds: predicted seconds over the run, `L` layers and `once`
    (`walk.Walk.seconds[name]`).
  formula: what the work counts.
  """
  name: str
  per_layer: Work
  once: Work
  layers: int
  layer_seconds: float
  seconds: float
  formula: str

  @property
  def flops(self) -> float:
    """Matmul, eigh and forward FLOPs over the run (elementwise passes
    and host accumulations are counted apart, `Work`)."""
    total = self.per_layer.scaled(self.layers) + self.once
    return total.matmul + total.eigh + total.forward


@dataclasses.dataclass(frozen=True)
class Plan:
  """Memory rows and phases of one run on one device.

  rows: the memory terms (`memory.memory_rows`).
  phases: the walk's phases (`cost.phase_work`).
  layers: decoder layers.
  device: the device and its measured rates.
  solve_seconds_at_max_iter: the solve phase over the run with every
    stage-1 ADMM at `max_iter` iterations (the upper bound).
  model: the run's model spec.
  stage1_iters: the stage-1 iterations the phases assume.
  offload_streams: the streams are planned in host memory.
  """
  rows: tuple[Row, ...]
  phases: tuple[Phase, ...]
  layers: int
  device: Device
  solve_seconds_at_max_iter: float
  model: str
  stage1_iters: int
  offload_streams: bool = False

  @property
  def total_bytes(self) -> int:
    """Device bytes: every row held on the device."""
    return sum(r.bytes for r in self.rows if r.on_device)

  @property
  def host_bytes(self) -> int:
    """Bytes of the rows held in host memory only."""
    return sum(r.bytes for r in self.rows if not r.on_device)

  @property
  def total_seconds(self) -> float:
    return sum(p.seconds for p in self.phases)

  def fits(self, memory_bytes: int | None = None) -> bool:
    """Whether the total fits `memory_bytes` (default: the device's)."""
    limit = self.device.memory_bytes if memory_bytes is None else \
        memory_bytes
    return self.total_bytes <= limit

  def largest(self) -> Row:
    return max((r for r in self.rows if r.on_device), key=lambda r: r.bytes)


def make_plan(shapes: ModelShapes, run: RunConfig, solver: SolverConfig,
              device: Device, *, act_bytes: int = 4,
              stage1_iters: int | None = None,
              offload_streams: bool = False) -> Plan:
  """The plan of `run` on `device`: memory rows and phases.

  Args:
    shapes: the model's shapes (`shapes.shapes_from_config`).
    run, solver: the run's configuration.
    device: memory and measured rates (`probes.measure_device`).
    act_bytes: bytes per weight and activation element (4: float32, 2:
      bfloat16).
    stage1_iters: stage-1 ADMM iterations to predict with (default
      `min(EXPECTED_STAGE1_ITERS, max_iter)`).
    offload_streams: the streams live in host memory
      (`memory.memory_rows`).
  """
  iters = (min(EXPECTED_STAGE1_ITERS, solver.max_iter)
           if stage1_iters is None else stage1_iters)
  phases = tuple(
      Phase(name, per, once, shapes.layers, per.seconds(device),
            shapes.layers * per.seconds(device) + once.seconds(device),
            formula)
      for name, (per, once, formula) in phase_work(
          shapes, run, solver, stage1_iters=iters).items())
  worst, _, _ = phase_work(shapes, run, solver,
                           stage1_iters=solver.max_iter)["solve"]
  return Plan(rows=memory_rows(shapes, run, solver, act_bytes=act_bytes,
                               host_is_device=device.host_is_device,
                               offload_streams=offload_streams),
              phases=phases, layers=shapes.layers, device=device,
              solve_seconds_at_max_iter=shapes.layers * worst.seconds(
                  device), model=run.model, stage1_iters=iters,
              offload_streams=offload_streams)

