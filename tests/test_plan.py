"""mosp_jax.pipeline.plan and --plan / --plan_only: byte counts and work
against references recomputed here from the configs, and the command."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from mosp_jax.config import DEFAULT, PAPER, RunConfig
from mosp_jax.models import paper_configs as pc
from mosp_jax.pipeline import plan as plan_lib
from mosp_jax.pipeline import preferences, run_record
from mosp_jax.pipeline.plan import cost, probes
from mosp_jax.solvers import Unstructured
from tests import cli_worker
from tests.tiny_models import tiny_config

SMOKE = "--flagfile=experiments/configs/smoke.flags"
# Rates of a made-up device (no measurement: fast, exact seconds).
DEVICE = plan_lib.Device("test", memory_bytes=2**40, matmul_flops=1e11,
                         eigh_flops=1e10, pass_rate=1e9, host_rate=5e8,
                         host_is_device=False)


def _run(m: int = 3, nsamples: int = 128, seqlen: int = 2048,
         test_tokens: int = 262144, batch_size: int = 4,
         streams: str = "global") -> RunConfig:
  prefs = preferences.ensure_vertices(preferences.with_centroid(
      preferences.simplex_grid(m, 2)))
  return RunConfig(
      model="x", tasks=tuple(f"t{i}" for i in range(m)),
      pattern=Unstructured(0.5), nsamples=nsamples, seqlen=seqlen,
      test_tokens=test_tokens, prefs=tuple(map(tuple, prefs.tolist())),
      batch_size=batch_size, seed=0, out_dir="unused", streams=streams)


def _rows(plan: plan_lib.Plan) -> dict[str, int]:
  return {r.name: r.bytes for r in plan.rows}


def test_tiny_llama_bytes_and_flops_by_hand():
  config = tiny_config("llama")  # d 32, ffn 48, 4 heads, 2 kv heads, tied
  d, f, V = config.hidden_size, config.intermediate_size, config.vocab_size
  hd = d // config.num_attention_heads
  kv = config.num_key_value_heads * hd
  run = _run(m=2, nsamples=3, seqlen=16, test_tokens=64, batch_size=2,
             streams="task")
  m, N, T, S, P, B, b = 2, 3, 16, 4, len(run.prefs), 2, 4
  assert P == 3  # two vertices and the midpoint (the centroid of 2 tasks)
  # (n_in, n_out) of q, k, v, o, gate, up, down; groups qkv, o, gate/up,
  # down.
  lin = np.array([(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)],
                 np.int64)
  groups = np.array([d, d, d, f], np.int64)
  per_layer = int((lin[:, 0] * lin[:, 1]).sum()) + 2 * d  # two RMSNorms
  outside = V * d + d  # tied embedding and head, final norm
  shapes = plan_lib.shapes_from_config(config)
  assert (shapes.params_per_layer, shapes.params_outside) == (per_layer,
                                                              outside)
  sum_no, sum_n2 = int((lin[:, 0] * lin[:, 1]).sum()), int((groups ** 2)
                                                           .sum())
  # Stage 1 carries the core (alpha 0.5 of the budget): 2 channels.
  iterates = max(int(n * o) * (max(4 * 2 + 2, 6 * m + 2) * 4 + 2)
                 for n, o in lin)
  want = {
      "dense weights, one layer": (outside + per_layer) * b,
      "calibration streams": 2 * m * N * T * d * b,
      "test streams": 2 * (P + 2) * m * S * T * d * b,
      "forward workspace (1 batch)":
          B * T * (2 * 4 * T + int(lin[:, 1].sum()) + int(groups.sum())) * b,
      "task Grams (1 layer)": m * sum_n2 * 4,
      "solver Grams + eigenvectors": (4 + 2 * m) * f * f * 4,
      "solver iterates": iterates,
      "Pareto sets + model layers":
          sum_no * ((m + 1) * 4 + 1 + (2 + m) * b),
  }
  plan = plan_lib.make_plan(shapes, run, PAPER, DEVICE)
  assert _rows(plan) == want
  assert plan.total_bytes == sum(want.values())
  # Phase work: one layer's forward per token, by hand.
  fwd = 2 * sum_no + 4 * T * d
  phases = {p.name: p for p in plan.phases}
  assert phases["propagate"].per_layer == cost.Work(
      forward=m * N * T * fwd)
  assert phases["capture"].per_layer.forward == m * N * T * fwd
  assert phases["capture"].per_layer.matmul == m * N * T * 2 * sum_n2
  assert phases["evaluate"].per_layer.forward == (P + 2) * m * S * T * fwd
  # The host's float64 sums per batch, then the mean's 3 passes.
  assert phases["capture"].per_layer.host == m * (math.ceil(N / B) + 3
                                                  ) * sum_n2
  assert phases["evaluate"].once.matmul == 2 * (P + 2) * m * S * T * d * V
  for p in plan.phases:  # seconds = layers x per layer + once
    assert p.seconds == pytest.approx(
        2 * p.per_layer.seconds(DEVICE) + p.once.seconds(DEVICE))


def test_default_plans_the_stored_grams_of_the_refit():
  """The default (refit on) keeps each group's Grams in their stored form
  until the layer is saved: `m (n^2 + 3 n)` bytes per group, the
  `gram_store` arrays; the paper's construction stores none."""
  config = tiny_config("llama")
  shapes = plan_lib.shapes_from_config(config)
  run = _run()
  m = len(run.tasks)
  rows = _rows(plan_lib.make_plan(shapes, run, DEFAULT, DEVICE))
  assert rows["stored Grams (1 layer, refit)"] == sum(
      m * (n * n + 3 * n) for n in shapes.groups)
  assert "stored Grams (1 layer, refit)" not in _rows(
      plan_lib.make_plan(shapes, run, PAPER, DEVICE))


def test_solve_work_of_one_linear_by_hand():
  solver = PAPER
  n, o, m, it = 64, 32, 3, 33
  work = cost.solve_work(plan_lib.Linear("x", n, o), 2, m, solver, it)
  # 64 < 3 * 2 * 32: the explicit inverse, one matmul per iteration.
  stage1 = 2 * n * n * o + 2 * n ** 3 * (1 + it // 3) + it * 2 * n * n * 2 * o
  pcg = 2 * n * n * o * (solver.pcg_iters + 2)
  stage2 = 7 / 3 * n ** 3 + 2 * n * n * o * (1 + solver.stage2_max_iter)
  assert work.matmul == pytest.approx(stage1 + pcg + m * (stage2 + pcg))
  assert work.eigh == 9 * n ** 3
  assert work.passes == (it * 2 * n * o * 42 + solver.pcg_iters * 10 * n * o
                         + m * (solver.stage2_max_iter * n * o * 42
                                + solver.pcg_iters * 10 * n * o))


def test_global_core_rule_plans_one_stage1_channel():
  """`core_rule='global'` runs stage 1 as ALPS alone: its solve is
  planned as the paper rule's without a core (alpha 0), and smaller than
  the paper rule's with one; the iterates row shrinks with it."""
  config = pc.parse_random_spec("random:llama-2-7b").config()
  shapes = plan_lib.shapes_from_config(config)

  def plan(**kw):
    return plan_lib.make_plan(shapes, _run(),
                              dataclasses.replace(PAPER, **kw),
                              DEVICE)

  def solve(p):
    return next(ph for ph in p.phases if ph.name == "solve").per_layer

  glob, dual, none = (plan(core_rule="global"), plan(),
                      plan(alpha=0.0))
  assert solve(glob) == solve(none)
  assert solve(glob).matmul < solve(dual).matmul
  assert _rows(glob)["solver iterates"] < _rows(dual)["solver iterates"]


def test_llama_2_7b_paper_plan_weights():
  config = pc.parse_random_spec("random:llama-2-7b").config()
  shapes = plan_lib.shapes_from_config(config)
  outside, per_layer = pc.layer_param_counts("llama-2-7b")  # eval_shape
  d, f = 4096, 11008
  assert per_layer == 4 * d * d + 3 * d * f + 2 * d
  assert (shapes.params_outside, shapes.params_per_layer) == (outside,
                                                              per_layer)
  plan = plan_lib.make_plan(shapes, _run(), PAPER, DEVICE)
  rows = _rows(plan)
  # One layer on the device: 6.74e9 parameters in all (published size).
  assert outside + 32 * per_layer == 6_738_415_616
  assert rows["dense weights, one layer"] == 4 * (outside + per_layer)
  assert rows["calibration streams"] == 2 * 3 * 128 * 2048 * d * 4
  assert rows["test streams"] == 2 * 9 * 3 * 128 * 2048 * d * 4
  assert [(lin.n, lin.o) for lin in shapes.linears] == [
      (d, d)] * 4 + [(d, f), (d, f), (f, d)]


def test_offloaded_streams_leave_the_device_total():
  shapes = plan_lib.shapes_from_config(tiny_config("llama"))
  run = _run(nsamples=8, seqlen=16, test_tokens=64, batch_size=2)
  d, b = shapes.hidden, 4
  kept = plan_lib.make_plan(shapes, run, PAPER, DEVICE)
  off = plan_lib.make_plan(shapes, run, PAPER, DEVICE,
                           offload_streams=True)
  streams = 2 * 3 * 8 * 16 * d * b + 2 * 9 * 3 * 4 * 16 * d * b
  assert off.host_bytes == streams and kept.host_bytes == 0
  # Two batches per stream visit the device instead.
  assert off.total_bytes == kept.total_bytes - streams + 2 * 2 * 16 * d * b
  cpu = dataclasses.replace(DEVICE, host_is_device=True)
  on_cpu = plan_lib.make_plan(shapes, run, PAPER, cpu,
                              offload_streams=True)
  assert on_cpu.host_bytes == 0  # the host is the device: nothing leaves
  bf16 = plan_lib.make_plan(shapes, run, PAPER, DEVICE,
                            act_bytes=2)
  assert _rows(bf16)["calibration streams"] * 2 == _rows(kept)[
      "calibration streams"]


def test_plan_grows_with_nsamples():
  shapes = plan_lib.shapes_from_config(tiny_config("llama"))
  plans = [plan_lib.make_plan(shapes, _run(nsamples=n, seqlen=16,
                                           test_tokens=64),
                              PAPER, DEVICE) for n in (2, 4, 8)]
  totals = [p.total_bytes for p in plans]
  assert totals[0] < totals[1] < totals[2]
  for name in ("capture", "propagate"):
    secs = [next(x.seconds for x in p.phases if x.name == name)
            for p in plans]
    assert secs[0] < secs[1] < secs[2]


def test_refusal_names_the_largest_tunable_term():
  shapes = plan_lib.shapes_from_config(tiny_config("llama"))
  small = plan_lib.Device("test", 1000, 1e11, 1e10, 1e9, 5e8, False)
  plan = plan_lib.make_plan(shapes, _run(nsamples=64, seqlen=16,
                                         test_tokens=16), PAPER,
                            small)
  assert not plan.fits() and plan.fits(plan.total_bytes)
  msg = plan_lib.refusal(plan)
  assert "\n" not in msg
  assert msg.startswith("--nsamples: the plan needs")  # streams dominate
  assert "--device_memory_gb" in msg
  text = plan_lib.format_plan(plan)
  assert "does NOT fit" in text and "largest: calibration streams" in text


def test_forward_rate_times_the_forwards():
  """Forwards go at the measured layer-forward rate, everything else at
  the device's other rates; without one, at the matmul rate."""
  config = tiny_config("llama")
  shapes = plan_lib.shapes_from_config(config)
  run = _run(m=2, nsamples=3, seqlen=16, test_tokens=64, batch_size=2)
  slow = dataclasses.replace(DEVICE, forward_flops=DEVICE.matmul_flops / 4)
  base = {p.name: p for p in plan_lib.make_plan(shapes, run, PAPER,
                                                DEVICE).phases}
  for p in plan_lib.make_plan(shapes, run, PAPER, slow).phases:
    extra = 3 * p.per_layer.forward / DEVICE.matmul_flops
    assert p.layer_seconds == pytest.approx(base[p.name].layer_seconds
                                            + extra)
  assert probes.measure_forward_flops(config, batch_size=2,
                                        seqlen=16) > 0
  text = plan_lib.format_plan(plan_lib.make_plan(shapes, run,
                                                 PAPER, slow))
  assert "layer forward 25.0 GFLOP/s" in text


def test_measured_rates_are_positive():
  assert probes.measure_matmul_flops(64) > 0
  assert probes.measure_eigh_flops(32) > 0
  assert probes.measure_pass_rate(64) > 0
  assert probes.measure_pass_rate(64, 16) > 0
  assert probes.measure_host_rate(64) > 0
  memory, _ = plan_lib.available_memory_bytes()
  assert memory > 0


def test_plan_only_and_refusal_on_the_command(tmp_path):
  fresh = tmp_path / "fresh"
  # The smoke run's plan on a GPU between its offloaded and full totals.
  from bridge import load
  shapes = plan_lib.shapes_from_config(load.model_config("tiny-llama"))
  smoke = _run(nsamples=4, seqlen=64, test_tokens=256, batch_size=4)
  kept, off = (plan_lib.make_plan(shapes, smoke, PAPER, DEVICE,
                                  offload_streams=o) for o in (False, True))
  assert off.total_bytes < kept.total_bytes
  between = (off.total_bytes + kept.total_bytes) / 2 / plan_lib.GIB
  cases = [[SMOKE, f"--out_dir={fresh}", "--plan_only"],
           [SMOKE, f"--out_dir={fresh}", "--device_memory_gb=1e-6"],
           [SMOKE, f"--out_dir={fresh}", "--plan_only", "--plan_for_gpu",
            "--device_memory_gb=48"],
           [SMOKE, f"--out_dir={fresh}", "--plan_only", "--plan_for_gpu",
            f"--device_memory_gb={between}"]]
  only, refused, gpu, offloaded = cli_worker.run_cases(
      "experiments.run", cases, tmp_path, timeout=300)
  assert offloaded["status"] == 0, offloaded["stderr"]
  assert offloaded["stdout"].startswith(
      "the streams do not fit on the device: they stay in host memory "
      "(--offload_streams)")
  assert "calibration streams (host)" in offloaded["stdout"]
  assert "in host memory (offloaded)" in offloaded["stdout"]
  assert "(host)" not in gpu["stdout"]
  assert gpu["status"] == 0, gpu["stderr"]
  assert gpu["stdout"].startswith("plan: tiny-llama on a GPU (seconds at ")
  assert "host" not in gpu["stdout"].split("phase")[0].split("\n", 1)[1]
  assert "host read" in only["stdout"]  # this CPU: the host is the device
  assert "fits in 48.00 GiB" in gpu["stdout"]
  assert only["status"] == 0 and only["stderr"] == "", only["stderr"]
  assert only["stdout"].startswith("plan: tiny-llama")
  assert "fits in" in only["stdout"]
  assert refused["status"] == 2, refused["stderr"]
  assert refused["stdout"].startswith("plan: tiny-llama")
  assert refused["stderr"].splitlines() == [refused["stderr"].strip()]
  assert refused["stderr"].startswith("error: --")
  assert "the plan needs" in refused["stderr"]
  assert "0.00 GiB available" in refused["stderr"]
  assert not fresh.exists()  # neither wrote anything


def test_check_phases_by_hand():
  shapes = plan_lib.shapes_from_config(tiny_config("llama"))
  plan = plan_lib.make_plan(shapes, _run(m=2, nsamples=3, seqlen=16,
                                         test_tokens=64, batch_size=2),
                            PAPER, DEVICE)
  phases = [p.name for p in plan.phases]
  assert phases == ["capture", "solve", "propagate", "evaluate"]

  def record(i: int, seconds: list[float], iters: dict[str, int]
             ) -> run_record.LayerRecord:
    return run_record.LayerRecord(
        i, *seconds, linears={n: run_record.LinearStats(it, (), ())
                              for n, it in iters.items()})

  layers = [record(0, [100.0] * 4, {"q": 30}),
            record(1, [2.0, 4.0, 6.0, 8.0], {"q": 33, "o": 36}),
            record(2, [4.0, 8.0, 12.0, 16.0], {"q": 33})]
  # (30 + 33 + 36 + 33) / 4 = 33.
  assert plan_lib.measured_stage1_iters(layers) == 33
  assert plan_lib.measured_stage1_iters([record(0, [1.0] * 4, {})]) == 0
  checks = plan_lib.check_phases(plan, layers)
  for i, (c, p) in enumerate(zip(checks, plan.phases, strict=True)):
    assert c.name == p.name and c.predicted_s == p.layer_seconds
    # The first layer compiles: the median of layers 2 and 3.
    assert c.measured_s == 3.0 * (i + 1)
    assert c.measured_total_s == 100.0 + 6.0 * (i + 1)
    assert c.ratio == pytest.approx(3.0 * (i + 1) / p.layer_seconds)
  one = plan_lib.check_phases(plan, layers[:1])
  assert [c.measured_s for c in one] == [100.0] * len(phases)
  text = plan_lib.format_checks(checks, tolerance=0.3, min_seconds=113)
  assert text.count("- (under 113s)") == 2  # capture 106, solve 112


def test_check_plan_command(tmp_path):
  """experiments.check_plan on the tiny run: a fresh run (its peak
  memory measured, at least the plan's floor of arrays), then the same
  command again, which reads the finished run back. It takes
  experiments.run's own flags (a flagfile of the run sets them) and
  ignores them; --plan_only prints the plan and stops."""
  from tests.conftest import TINY_RUN_FLAGS
  out = tmp_path / "run"
  argv = [*TINY_RUN_FLAGS, f"--out_dir={out}", "--export_pref=centroid"]
  planned = tmp_path / "plan_only"
  fresh, again, only = cli_worker.run_cases(
      "experiments.check_plan",
      [argv, argv, [*TINY_RUN_FLAGS, f"--out_dir={planned}", "--plan_only"]],
      tmp_path, timeout=600)
  # --plan_only: the plan, then nothing run or written (it once ran the
  # whole job, ignoring the flag).
  assert only["status"] == 0, only["stderr"][-3000:]
  assert only["stdout"].startswith("plan: tiny-llama")
  assert "measured against the plan" not in only["stdout"]
  assert not planned.exists()
  assert fresh["status"] == 0, fresh["stderr"][-3000:]
  assert again["status"] == 0, again["stderr"][-3000:]
  assert "nothing was redone" in again["stdout"]
  report = json.loads((out / "plan_check.json").read_text())
  results = json.loads((out / "results.json").read_text())
  assert report["layers"] == len(results["layers"]) == 2
  assert report["peak_memory_bytes"] is None  # the second, read-back call
  for c in report["phases"]:
    assert c["measured_s"] == results["layers"][1][f"{c['name']}_s"]
    assert c["predicted_s"] > 0
  assert report["stage1_iters"]["measured"] == plan_lib.measured_stage1_iters(
      [run_record.LayerRecord.from_dict(r) for r in results["layers"]])
  assert "process peak resident set" in fresh["stdout"]
  peak = fresh["stdout"].split("measured ")[-1].split(" GiB")[0]
  assert float(peak) * plan_lib.GIB >= report["plan_total_bytes"]


def test_pass_rate_is_probed_on_the_largest_linear():
  """Llama-2-7B's largest linear is 4096 x 11008 (gate/up); a small
  model's probe is 2048^2, never smaller."""
  big = plan_lib.shapes_from_config(
      pc.parse_random_spec("random:llama-2-7b").config())
  assert plan_lib.pass_probe_shape(big) == (4096, 11008)
  small = plan_lib.shapes_from_config(tiny_config("llama"))
  assert plan_lib.pass_probe_shape(small) == (2048, 2048)
