"""A plan as text: the table printed before a run, and the refusal line
when it does not fit."""

from __future__ import annotations

from mosp_jax.pipeline.plan.make import Plan

GIB = 2**30


def _duration(seconds: float) -> str:
  if seconds < 60:
    return f"{seconds:.1f}s"
  if seconds < 3600:
    return f"{seconds / 60:.1f}min"
  return f"{seconds / 3600:.1f}h"


def format_plan(plan: Plan) -> str:
  """The plan as a table: memory rows in GiB (2 decimals), phases in
  seconds per layer and over the run, and the dominant terms."""
  dev = plan.device
  lines = [
      f"plan: {plan.model} on {dev.name}, {plan.layers} layers; "
      f"measured matmul {dev.matmul_flops / 1e9:.1f} GFLOP/s, eigh "
      f"{dev.eigh_flops / 1e9:.1f} GFLOP/s, passes "
      f"{dev.pass_rate / 1e9:.2f} G/s, host sums {dev.host_rate / 1e9:.2f}"
      " G/s" + ("" if dev.forward_flops is None else
                f", layer forward {dev.forward_flops / 1e9:.1f} GFLOP/s"),
      f"  {'memory (arrays, every term at its peak)':<46}"
      f"{'GiB':>9}  formula"]
  lines += [f"  {r.name:<46}{r.bytes / GIB:>9.2f}  {r.formula}"
            for r in plan.rows]
  verdict = "fits" if plan.fits() else "does NOT fit"
  lines.append(f"  {'total on the device':<46}"
               f"{plan.total_bytes / GIB:>9.2f}  {verdict}"
               f" in {dev.memory_bytes / GIB:.2f} GiB; largest: "
               f"{plan.largest().name}")
  if plan.host_bytes:
    lines.append(f"  {'in host memory (offloaded)':<46}"
                 f"{plan.host_bytes / GIB:>9.2f}")
  head = f"phase (stage-1 ADMM at {plan.stage1_iters} iterations)"
  lines.append(f"  {head:<46}{'s/layer':>9}{'total':>10}{'TFLOP':>9}  work")
  for p in plan.phases:
    lines.append(f"  {p.name:<46}{p.layer_seconds:>9.1f}"
                 f"{_duration(p.seconds):>10}{p.flops / 1e12:>9.1f}  "
                 f"{p.formula}")
  top = max(plan.phases, key=lambda p: p.seconds)
  lines.append(f"  {'total':<46}{'':>9}{_duration(plan.total_seconds):>10}"
               f"{'':>9}  largest: {top.name}; solve at max_iter "
               f"{_duration(plan.solve_seconds_at_max_iter)}")
  return "\n".join(lines)


def refusal(plan: Plan) -> str:
  """One line saying why the plan does not fit and which flag to change
  (the largest term that a flag shrinks)."""
  dev = plan.device
  tunable = [r for r in sorted(plan.rows, key=lambda r: -r.bytes)
             if r.flags]
  flag = tunable[0].flags[0] if tunable else "--model"
  terms = ", ".join(f"{r.name} {r.bytes / GIB:.2f} GiB ({'/'.join(r.flags)})"
                    for r in tunable[:2])
  return (f"{flag}: the plan needs {plan.total_bytes / GIB:.2f} GiB on "
          f"{dev.name}, {dev.memory_bytes / GIB:.2f} GiB available "
          f"(largest: {terms}); lower those flags, or set "
          "--device_memory_gb if the detected memory is wrong")
