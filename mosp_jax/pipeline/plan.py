"""A run's plan: device memory and seconds per phase, before any heavy work.

`make_plan(shapes, run, solver, device)` counts, from the model's config
alone (`shapes_from_config`, `jax.eval_shape`: no weight is allocated),
what the current walk (`walk.walk_layers` with MOSP's unit,
`prune.py`) holds on the device at once and how much work each of its
timed phases does. Every term is a closed formula, written in the
docstring of the function that computes it, so that a measured run can
be compared term by term ('capture', 'solve', 'propagate', 'evaluate'
seconds per layer, `walk.Walk.layers`).

Notation: `m` tasks, `N` calibration segments per task, `T` tokens per
segment, `S = test_tokens // T` test segments per task, `P` evaluated
preference models (vertices included), `B` the batch size, `d` the hidden
size, `L` decoder layers; per decoder layer the linears `(n, o)` (inputs,
outputs) and the groups sharing an input (`n_g`, one Gram each); `b` bytes
per activation or weight element (4 for float32; `act_bytes`), `g = 4`
bytes of a Gram or solver element (the capture and the solvers compute in
float32 whatever the model's dtype, `grams.py`).

Memory [ours] counts every term at its own peak at the same time: the
arrays the walk holds, not what XLA, Python and the libraries add (the
quick run's plan says 1.50 GiB where `/usr/bin/time -v` measured 5.13 GB
peak resident memory on the CPU, where host and device share the RAM),
so it is neither a floor nor a bound on the process: on small models
the runtime's overhead dominates and the process uses more; on the
1-layer Llama-2-7B simulation the plan said 22.24 GiB and the process
peaked at 16.00 GiB, because the solver's terms and the evaluation's
are never alive together, though the sum counts both. The walk
reads the dense model one layer at a time (`layer_source`), so the
weights term is one layer and the outside parameters; `--dtype=bfloat16`
halves `b`; `--offload_streams` moves the streams to host memory (chosen
by the runner when the plan does not fit otherwise). The Gram, solver
and Pareto-set terms are per layer and stay.

Seconds [ours]: the decoder-layer forwards (capture, propagation,
evaluation) at the rate of one forward of the run's own layer measured
on the spot (`with_forward_rate`: the norms, RoPE, softmax and
activations that FLOP counts leave out halved SmolLM2's rate against a
bare matmul), other matmul FLOPs at the device's measured matmul rate,
the eigendecompositions at a measured `eigh` rate, the solvers' exact
top-k and elementwise updates as passes over the weights at a pass rate
measured on the run's largest linear (at least 2048^2), the host-side
float64 Gram accumulation at a measured host rate. The ADMM iteration
count of stage 1 is the expected one (`EXPECTED_STAGE1_ITERS`, capped by
`max_iter`); `max_iter` is the upper bound and the table shows the solve
time at it too.
`experiments.check_plan` sets a measured run beside its plan
(`check_phases`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mosp_jax.config import RunConfig, SolverConfig
from mosp_jax.pipeline import grams
from mosp_jax.solvers import projection

GRAM_BYTES = 4  # float32 Grams and solver iterates (grams.py casts).
# Symmetric eigendecomposition with eigenvectors, ~9 n^3 flops [ours:
# Golub & Van Loan's count for tridiagonalisation + implicit QR with
# accumulated vectors]; its time uses the measured `eigh` rate in the
# same convention, so the constant cancels at the measured size.
EIGH_FLOPS_PER_N3 = 9.0
# `(G + rho I)^-1` through Cholesky (`admm.cholesky_inverse`): n^3 / 3
# for the factor, 2 n^3 for the two triangular solves on `I`.
CHOLESKY_INVERSE_FLOPS_PER_N3 = 7.0 / 3.0
# Exact top-k (`projection.topk_mask`): 32 bisection passes over the
# scores, then the comparison and the tie pass.
TOPK_PASSES = 34
# Elementwise passes of one ADMM iteration per channel (Z, D, V, the
# support change) [ours: a count of `admm.run_admm`'s body].
ADMM_UPDATE_PASSES = 8
# Elementwise passes of one PCG iteration (`pcg.masked_pcg`'s body).
PCG_PASSES = 10
# Stage-1 ADMM iterations expected [ours, measured]: the rule stops at
# the first check after 30 iterations once the support is nearly
# stable, 33 with checks every 3 (README, "Benchmark"; 31-36 on real
# SmolLM2 layers). `max_iter` is the upper bound.
EXPECTED_STAGE1_ITERS = 33
# Host passes over a Gram after its last batch (`grams.finish`: the
# division, the float32 cast, the finite check) [ours: a count].
GRAM_FINISH_PASSES = 3
GIB = 2**30
# The smallest scores the pass rate is measured on (`pass_probe_shape`).
PASS_PROBE_MIN = (2048, 2048)


@dataclasses.dataclass(frozen=True)
class Linear:
  """One linear of a decoder layer: `n` inputs, `o` outputs."""
  name: str
  n: int
  o: int


@dataclasses.dataclass(frozen=True)
class ModelShapes:
  """What the plan needs of a model, from its config.

  Attributes:
    layers: decoder layers `L`.
    hidden: hidden size `d`.
    heads, head_dim: attention heads and their width (the score
      matrices are `(B, heads, T, T)`).
    params_outside: parameters outside the decoder layers (embeddings,
      final norm, head).
    params_per_layer: parameters of one decoder layer.
    linears: the prunable linears of one decoder layer.
    groups: per group of linears sharing an input, its input width `n_g`.
  """
  layers: int
  hidden: int
  heads: int
  head_dim: int
  params_outside: int
  params_per_layer: int
  linears: tuple[Linear, ...]
  groups: tuple[int, ...]
  vocab: int


@dataclasses.dataclass(frozen=True)
class Device:
  """The device a run is planned for (rates measured by
  `measure_device`).

  Attributes:
    name: e.g. 'cpu' or 'NVIDIA H200'.
    memory_bytes: memory the run may use.
    matmul_flops: float32 matmul rate, FLOP/s.
    eigh_flops: eigendecomposition rate, `EIGH_FLOPS_PER_N3 n^3` per
      second.
    pass_rate: elements per second of one elementwise pass (a compare and
      a sum over float32, as the top-k's bisection does).
      Measured on the run's largest linear, or 2048^2 scores if that
      is smaller (`pass_probe_shape`).
    host_rate: element passes per second of the capture's host-side Gram
      sums (`grams.accumulate`: float32 into float64, in place).
    host_is_device: the CPU backend, where host copies use the same
      memory.
    forward_flops: the effective rate of the run's model's decoder-layer
      forward, `layer_forward_flops` per token over the measured seconds
      of one `(B, T, d)` batch (`with_forward_rate`); None: forwards are
      counted at `matmul_flops`. The forward also runs norms, RoPE, the
      softmax and the activations, which FLOPs do not count [ours: on
      SmolLM2-135M it ran at half the bare matmul rate].
  """
  name: str
  memory_bytes: int
  matmul_flops: float
  eigh_flops: float
  pass_rate: float
  host_rate: float
  host_is_device: bool
  forward_flops: float | None = None


@dataclasses.dataclass(frozen=True)
class Row:
  """One memory term: `bytes` by `formula`; `flags` shrink it;
  `on_device` False for a term held in host memory only (offloaded
  streams on a GPU), which the device total leaves out."""
  name: str
  bytes: int
  formula: str
  flags: tuple[str, ...] = ()
  on_device: bool = True


@dataclasses.dataclass(frozen=True)
class Work:
  """Work of one phase: matmul FLOPs, eigh FLOPs, elementwise element
  passes on the device, element accumulations on the host, and the
  FLOPs of decoder-layer forwards (`layer_forward_flops` per token)."""
  matmul: float = 0.0
  eigh: float = 0.0
  passes: float = 0.0
  host: float = 0.0
  forward: float = 0.0

  def __add__(self, other: Work) -> Work:
    return Work(*(a + b for a, b in zip(dataclasses.astuple(self),
                                        dataclasses.astuple(other),
                                        strict=True)))

  def scaled(self, factor: float) -> Work:
    return Work(*(a * factor for a in dataclasses.astuple(self)))

  def seconds(self, device: Device) -> float:
    return (self.matmul / device.matmul_flops
            + self.eigh / device.eigh_flops
            + self.passes / device.pass_rate + self.host / device.host_rate
            + self.forward / (device.forward_flops or device.matmul_flops))


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

  rows: the memory terms (`memory_rows`).
  phases: the walk's phases (`phase_work`).
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


# The model's shapes.


def _one_layer_model(config: Any) -> tuple[Any, Any]:
  """`(uninitialised Flax model, adapter)` of a one-layer copy of a HF
  config."""
  from mosp_jax import models
  fields = config.to_dict() | {"num_hidden_layers": 1}
  if fields.get("layer_types"):  # Per-layer kinds (Gemma 3): the first.
    fields["layer_types"] = fields["layer_types"][:1]
  one = config.__class__(**fields)
  model = models.model_class(one)(one, _do_init=False)
  return model, models.adapter_for(model)


def shapes_from_config(config: Any) -> ModelShapes:
  """`ModelShapes` of a HF config, from `jax.eval_shape` of a one-layer
  copy (no weight is allocated) and the family adapter (its linears and
  groups), so the plan counts exactly what the walk prunes."""
  model, adapter = _one_layer_model(config)
  tree = model.params_shape_tree

  def count(t: Any) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(t))

  per_layer = count(adapter.layer_params(tree, 0))
  linears = tuple(
      Linear(name, *jax.eval_shape(functools.partial(
          adapter.get_kernel, i=0, name=name), tree).shape)
      for name in adapter.linear_names())
  width = {lin.name: lin.n for lin in linears}
  heads = int(config.num_attention_heads)
  hidden = int(config.hidden_size)
  return ModelShapes(
      layers=int(config.num_hidden_layers), hidden=hidden, heads=heads,
      head_dim=int(getattr(config, "head_dim", None) or hidden // heads),
      params_outside=count(tree) - per_layer, params_per_layer=per_layer,
      linears=linears,
      groups=tuple(width[g[0]] for g in adapter.linear_groups()),
      vocab=int(config.vocab_size))


def _channels(run: RunConfig, solver: SolverConfig, lin: Linear) -> int:
  """Stage 1's channels `c`: 2 when it carries a core strictly inside the
  budget (`alps.admm_support`; `core_rule='dual'`), else 1."""
  core = projection.core_count(run.pattern, lin.n, lin.o, solver.alpha)
  inside = 0 < core < run.pattern.unit_keep(lin.n, lin.o)
  return 2 if inside and solver.core_rule == "dual" else 1


# Memory.


def memory_rows(shapes: ModelShapes, run: RunConfig, solver: SolverConfig,
                *, act_bytes: int, host_is_device: bool,
                offload_streams: bool = False) -> tuple[Row, ...]:
  """The device memory of the layer walk, term by term (bytes).

  - dense weights, one layer: `(params_outside + params_per_layer) b`;
    the walk keeps the embeddings, final norm and head on the device and
    reads one decoder layer at a time (`layer_source.DenseLayers`).
  - dense weights, host read (CPU backend only): `params_per_layer 4`,
    the float32 layer as read before its cast (a model loaded whole,
    'tiny-llama' or a Flax folder, holds all its layers on the host).
  - calibration streams: `2 m N T d b`; every task's hidden states, and
    a layer's inputs stay alive until all streams are advanced
    (`walk._walk_layer` replaces its state at the end), hence 2. With
    `offload_streams` they live in host memory (`on_device` False
    unless the host is the device) and two batches per stream visit the
    device, counted in the forward workspace.
  - test streams: `2 (P + 2) m S T d b`; per task one stream per
    preference model, the global model `W` and the dense model, 2 as
    above; offloaded likewise.
  - forward workspace: `B T (2 heads T + sum o + sum_g n_g) b`; one
    batch's two attention score tensors `(B, heads, T, T)`, every
    linear's output and the captured group inputs [ours: XLA may free or
    fuse some].
  - task Grams of a layer: `m sum_g n_g^2 g` (`prune._solve_layer` keeps
    every group's `(m, n_g, n_g)` on the device until evaluation).
  - Grams on the host (CPU backend only): `m sum_g n_g^2 g + sum_g n_g^2
    8` (the captured Grams and one task's float64 accumulators).
  - solver Grams and eigenvectors, largest linear: `(4 + 2 m) n^2 g`:
    `H`, its scaled copy, `Q`, the explicit inverse, the scaled task
    Grams and stage 2's inverses.
  - solver iterates, largest linear: `n o (max(4 c + 2, 6 m + 2) g +
    c)`: stage 1's `B, D, V, Z` per channel with `B0, G B0`; stages 2-3
    vmapped over tasks (`X, R, P, Z, AP, b` per task); the masks.
  - Pareto sets and model layers: `sum n o ((m + 1) g + 1 + (2 +
    m_task) b)`: per linear `W`, the `W_i`, the core bits, and the layer
    copies alive at once: `W`'s and one preference's (the evaluation
    builds and advances one preference at a time, `prune._evaluate_layer`
    [ours]), or the task models' during the solve (`m_task = m` with
    `--streams=task`).
  """
  m, N, T, d = len(run.tasks), run.nsamples, run.seqlen, shapes.hidden
  S, P, B, b, g = (run.test_tokens // T, len(run.prefs), run.batch_size,
                   act_bytes, GRAM_BYTES)
  weights = (shapes.params_outside + shapes.params_per_layer) * b
  sum_n2 = sum(n * n for n in shapes.groups)
  largest_n = max(lin.n for lin in shapes.linears)
  m_task = m if run.streams == "task" else 0
  rows = [Row("dense weights, one layer", weights,
              "(outside + per_layer) params x b", ("--dtype",))]
  if host_is_device:
    rows.append(Row("dense weights, host read", shapes.params_per_layer * 4,
                    "per_layer params x 4 (CPU: the host is the device)"))
  on_device = host_is_device or not offload_streams
  where = "" if on_device else " (host)"
  # Offloaded: two batches per stream on the device, in and out.
  visiting = 2 * B * T * d * b if offload_streams else 0
  rows += [
      Row(f"calibration streams{where}", 2 * m * N * T * d * b,
          "2 m N T d b", ("--nsamples", "--seqlen"),
          on_device=on_device),
      Row(f"test streams{where}", 2 * (P + 2) * m * S * T * d * b,
          "2 (P + 2) m S T d b", ("--test_tokens", "--prefs"),
          on_device=on_device),
      Row("forward workspace (1 batch)",
          B * T * (2 * shapes.heads * T
                   + sum(lin.o for lin in shapes.linears)
                   + sum(shapes.groups)) * b + visiting,
          "B T (2 heads T + sum o + sum n_g) b"
          + (" + 2 B T d b (offloaded)" if offload_streams else ""),
          ("--batch_size", "--seqlen")),
      Row("task Grams (1 layer)", m * sum_n2 * g, "m sum n_g^2 g"),
  ]
  if host_is_device:
    rows.append(Row("Grams on the host", m * sum_n2 * g + sum_n2 * 8,
                    "m sum n_g^2 g + sum n_g^2 8"))
  rows += [
      Row("solver Grams + eigenvectors", (4 + 2 * m) * largest_n ** 2 * g,
          "(4 + 2 m) n^2 g, largest n"),
      Row("solver iterates", max(
          lin.n * lin.o * (max(4 * _channels(run, solver, lin) + 2,
                               6 * m + 2) * g
                           + _channels(run, solver, lin))
          for lin in shapes.linears),
          "n o (max(4 c + 2, 6 m + 2) g + c), largest linear"),
      Row("Pareto sets + model layers", sum(
          lin.n * lin.o for lin in shapes.linears)
          * ((m + 1) * g + 1 + (2 + m_task) * b),
          "sum n o ((m + 1) g + 1 + (2 + m_task) b)", ("--tasks",)),
  ]
  return tuple(rows)


# Work per phase.


def layer_forward_flops(shapes: ModelShapes, seqlen: int) -> float:
  """Matmul FLOPs of one decoder layer per token: `2 sum n o` for the
  linears and `4 T heads head_dim` for the scores and their product with
  the values (the Flax attention computes the full `T x T` scores, the
  causal mask applied after)."""
  return (2.0 * sum(lin.n * lin.o for lin in shapes.linears)
          + 4.0 * seqlen * shapes.heads * shapes.head_dim)


def _pcg_work(n: int, o: int, iters: int) -> Work:
  """`pcg.masked_pcg`: `H W0`, `H X` and one `H P` per iteration."""
  return Work(matmul=2.0 * n * n * o * (iters + 2),
              passes=float(iters * PCG_PASSES * n * o))


def solve_work(lin: Linear, c: int, m: int, solver: SolverConfig,
               iters: int) -> Work:
  """`mosp.mosp_pareto` on one linear `(n, o)` with `c` stage-1 channels.

  - eigh of `H`: `EIGH_FLOPS_PER_N3 n^3` (one per linear: q, k and v
    each decompose their shared Gram).
  - stage 1, `iters` iterations: `G B0` (`2 n^2 o`), per iteration
    `2 n^2 c o` with the explicit inverse (when `n < update_every c o`,
    `admm.eig_solve`; then `2 n^3` per inverse, at most one per check
    plus the first) else `4 n^2 c o`; `c n o (TOPK_PASSES +
    ADMM_UPDATE_PASSES)` element passes per iteration.
  - PCG of `W`: `2 n^2 o (pcg_iters + 2)`, `PCG_PASSES n o` per step.
  - stage 2, per task: a Cholesky inverse (`7/3 n^3`), `G_i B0`, and
    `stage2_max_iter` iterations of `2 n^2 o` and top-k passes.
  - stage 3: the PCG above per task.
  """
  n, o = lin.n, lin.o
  if n < solver.update_every * c * o:
    per_iter = 2.0 * n * n * c * o
    factor = 2.0 * n ** 3 * (1 + iters // solver.update_every)
  else:
    per_iter, factor = 4.0 * n * n * c * o, 0.0
  elem = TOPK_PASSES + ADMM_UPDATE_PASSES
  stage1 = Work(matmul=2.0 * n * n * o + factor + iters * per_iter,
                passes=float(iters * c * n * o * elem))
  s2 = solver.stage2_max_iter
  stage2 = Work(matmul=CHOLESKY_INVERSE_FLOPS_PER_N3 * n ** 3
                + 2.0 * n * n * o * (1 + s2),
                passes=float(s2 * n * o * elem))
  pcg = _pcg_work(n, o, solver.pcg_iters)
  return (Work(eigh=EIGH_FLOPS_PER_N3 * n ** 3) + stage1 + pcg
          + (stage2 + pcg).scaled(m))


def evaluate_work(lin: Linear, m: int, P: int,
                  solver: SolverConfig) -> Work:
  """`prune._evaluate_layer` on one linear: materialising `P` models
  (`(m + 2 + TOPK_PASSES) n o` element passes each), the relative errors
  of `P + 1` models and the dense denominator on `m` Grams
  (`walk.model_stats`: `2 (P + 2) m n^2 o`), and with `pref_refit_iters
  = R > 0` a PCG of `R` steps per model."""
  n, o = lin.n, lin.o
  work = Work(matmul=2.0 * (P + 2) * m * n * n * o,
              passes=float(P * n * o * (m + 2 + TOPK_PASSES)))
  if solver.pref_refit_iters > 0:
    work = work + _pcg_work(n, o, solver.pref_refit_iters).scaled(P)
  return work


def phase_work(shapes: ModelShapes, run: RunConfig, solver: SolverConfig,
               *, stage1_iters: int) -> dict[str, tuple[Work, Work, str]]:
  """Per phase `(work per layer, work once, formula)`.

  - capture: `m N T (f + 2 sum_g n_g^2)` FLOPs (the dense layer's
    forward `f = layer_forward_flops` and every group's `X^T X`), plus
    `m (ceil(N / B) + GRAM_FINISH_PASSES) sum_g n_g^2` host passes (the
    float64 sums, `grams.accumulate`, and the mean, `grams.finish`).
  - solve: `solve_work` summed over the layer's linears.
  - propagate: `m N T f` (every calibration stream through the pruned
    layer).
  - evaluate: `(P + 2) m S T f` (the test streams of the `P` models, `W`
    and the dense model) and `evaluate_work` per linear; once per run
    the head, `(P + 2) m S T 2 d V` FLOPs and 4 passes over the logits.
  """
  m, N, T = len(run.tasks), run.nsamples, run.seqlen
  S, P = run.test_tokens // T, len(run.prefs)
  f = layer_forward_flops(shapes, T)
  sum_n2 = sum(n * n for n in shapes.groups)
  batches = -(-N // run.batch_size)
  capture = Work(matmul=m * N * T * 2.0 * sum_n2, forward=m * N * T * f,
                 host=float(m * (batches + GRAM_FINISH_PASSES) * sum_n2))
  solve = Work()
  evaluate = Work(forward=(P + 2) * m * S * T * f)
  for lin in shapes.linears:
    solve = solve + solve_work(lin, _channels(run, solver, lin), m, solver,
                               stage1_iters)
    evaluate = evaluate + evaluate_work(lin, m, P, solver)
  tokens = (P + 2) * m * S * T
  head = Work(matmul=2.0 * tokens * shapes.hidden * shapes.vocab,
              passes=4.0 * tokens * shapes.vocab)
  return {
      "capture": (capture, Work(), "m N T (f + 2 sum n_g^2); host sums"),
      "solve": (solve, Work(), "eigh + ADMM + PCG per linear"),
      "propagate": (Work(forward=m * N * T * f), Work(), "m N T f"),
      "evaluate": (evaluate, head, "(P + 2) m S T f; head once"),
  }


def make_plan(shapes: ModelShapes, run: RunConfig, solver: SolverConfig,
              device: Device, *, act_bytes: int = 4,
              stage1_iters: int | None = None,
              offload_streams: bool = False) -> Plan:
  """The plan of `run` on `device`: memory rows and phases.

  Args:
    shapes: the model's shapes (`shapes_from_config`).
    run, solver: the run's configuration.
    device: memory and measured rates (`measure_device`).
    act_bytes: bytes per weight and activation element (4: float32, 2:
      bfloat16).
    stage1_iters: stage-1 ADMM iterations to predict with (default
      `min(EXPECTED_STAGE1_ITERS, max_iter)`).
    offload_streams: the streams live in host memory (`memory_rows`).
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


# Output.


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


# A measured run against its plan.


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


def measured_stage1_iters(layers: Sequence[Mapping[str, Any]]) -> int:
  """The mean stage-1 ADMM iteration count of a run's linears, rounded
  (`results.json` 'layers', each with 'linears': {name: {'stage1_iters'}}
  as `prune.py` records them); 0 when none is recorded."""
  iters = [lin["stage1_iters"] for rec in layers
           for lin in rec.get("linears", {}).values()
           if "stage1_iters" in lin]
  return round(sum(iters) / len(iters)) if iters else 0


def check_phases(plan: Plan, layers: Sequence[Mapping[str, Any]]
                 ) -> tuple[PhaseCheck, ...]:
  """Each of the plan's phases beside a run's measured seconds
  (`results.json` 'layers': per layer '<phase>_s')."""
  steady = list(layers[1:]) or list(layers[:1])
  out = []
  for phase in plan.phases:
    key = f"{phase.name}_s"
    values = [float(rec[key]) for rec in steady]
    out.append(PhaseCheck(
        phase.name, phase.layer_seconds,
        float(np.median(values)) if values else math.nan,
        float(sum(float(rec[key]) for rec in layers))))
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


# The device.


def _best_seconds(fn: Any, *args: Any, repeats: int = 3,
                  budget: float = 1.0, enough: float = 2.0) -> float:
  """Best wall time of `fn(*args)` after one call that compiles: at least
  `repeats` timed calls, more while they total under `budget` seconds
  (at most 100), and none after a call over `enough` seconds (a
  paper-scale layer forward on a CPU takes tens of seconds).

  The budget [ours]: three calls of a 2048^2 matmul take half a second,
  and one such start-up measurement on the 2-core CPU gave 101 GFLOP/s
  where the runs before it gave 184; the best of a second's calls is
  less at the mercy of one slow moment."""
  jax.block_until_ready(fn(*args))
  best, spent, calls = math.inf, 0.0, 0
  while calls < 100 and (calls < repeats or spent < budget):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    dt = time.perf_counter() - t0
    best, spent, calls = min(best, dt), spent + dt, calls + 1
    if best > enough:
      break
  return best


def _random(n: int, dtype: Any, seed: int = 0, o: int | None = None
            ) -> jax.Array:
  """Standard normal `(n, o)` (`o = n` by default)."""
  return jax.random.normal(jax.random.key(seed), (n, n if o is None else o),
                           dtype)


def measure_matmul_flops(n: int = 2048, dtype: Any = jnp.float32) -> float:
  """FLOP/s of a jitted `(n, n) @ (n, n)` on the default device: `2 n^3`
  over the best of 3 timed calls after compiling."""
  a, b = _random(n, dtype, 0), _random(n, dtype, 1)
  return 2.0 * n ** 3 / _best_seconds(jax.jit(jnp.matmul), a, b)


def measure_eigh_flops(n: int = 1024, dtype: Any = jnp.float32) -> float:
  """`EIGH_FLOPS_PER_N3 n^3` per second of a jitted symmetric `eigh`."""
  a = _random(n, dtype)
  sym = (a @ a.T) / n + jnp.eye(n, dtype=dtype)
  return EIGH_FLOPS_PER_N3 * n ** 3 / _best_seconds(
      jax.jit(jnp.linalg.eigh), sym)


def measure_pass_rate(n: int = 2048, o: int | None = None) -> float:
  """Elements per second of one top-k pass: `projection.topk_mask` of
  half of `(n, o)` scores (`o = n` by default), `TOPK_PASSES n o`
  elements per call."""
  scores = jnp.abs(_random(n, jnp.float32, o=o))
  o = scores.shape[1]
  fn = jax.jit(functools.partial(projection.topk_mask, k=n * o // 2))
  return TOPK_PASSES * n * o / _best_seconds(fn, scores)


def measure_host_rate(n: int = 4096) -> float:
  """Elements per second of the capture's host-side Gram sum
  (`grams.accumulate` of an `(n, n)` float32 batch into float64): at
  n = 4096 its arrays (192 MiB) are far outside the caches, as a real
  Gram's are."""
  g = np.ones((n, n), np.float32)
  acc = grams.accumulate(None, g)
  return n * n / _best_seconds(grams.accumulate, acc, g)


def measure_forward_flops(config: Any, *, batch_size: int,
                          seqlen: int) -> float:
  """FLOP/s of one decoder layer of `config`'s model on one `(batch_size,
  seqlen, d)` float32 batch: `batch_size seqlen layer_forward_flops` over
  the best of 3 timed calls of the adapter's jitted `apply_block` (as the
  walk's `advance`), after one that compiles; random layer weights of the
  config's shapes (std 0.02; no embedding or head is built)."""
  model, adapter = _one_layer_model(config)
  shapes = shapes_from_config(config)
  tree = adapter.layer_params(model.params_shape_tree, 0)
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  params = jax.tree.unflatten(treedef, [
      0.02 * jax.random.normal(k, leaf.shape, jnp.float32)
      for k, leaf in zip(keys, leaves, strict=True)])
  hidden = jax.random.normal(jax.random.key(1),
                             (batch_size, seqlen, shapes.hidden), jnp.float32)
  fn = jax.jit(lambda p, h: adapter.apply_block(p, h)[0])
  return (batch_size * seqlen * layer_forward_flops(shapes, seqlen)
          / _best_seconds(fn, params, hidden))


def with_forward_rate(device: Device, config: Any, *, batch_size: int,
                      seqlen: int) -> Device:
  """`device` with `forward_flops` measured on `config`'s decoder layer
  (`measure_forward_flops`)."""
  return dataclasses.replace(device, forward_flops=measure_forward_flops(
      config, batch_size=batch_size, seqlen=seqlen))


def available_memory_bytes() -> tuple[int, bool]:
  """`(bytes, host_is_device)`: the allocator's limit of the default
  device where it reports one (`memory_stats()['bytes_limit']`, GPUs),
  else the host's MemAvailable (/proc/meminfo)."""
  dev = jax.devices()[0]
  stats = None
  try:
    stats = dev.memory_stats()
  except Exception:  # noqa: BLE001  (backends without the call)
    stats = None
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"]), dev.platform == "cpu"
  with open("/proc/meminfo") as f:
    for line in f:
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024, dev.platform == "cpu"
  raise OSError("/proc/meminfo has no MemAvailable line")


def peak_memory() -> tuple[int, str]:
  """`(bytes, what)`: the peak memory of this process so far: the default
  device allocator's 'peak_bytes_in_use' where it reports one (GPUs),
  else the process's peak resident set (`getrusage`, Linux KiB; on the
  CPU backend host and device share it, and it includes Python, XLA and
  the libraries)."""
  import resource
  dev = jax.devices()[0]
  try:
    stats = dev.memory_stats()
  except Exception:  # noqa: BLE001  (backends without the call)
    stats = None
  if stats and "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device allocator peak"
  return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
          "process peak resident set")


@functools.lru_cache(maxsize=4)
def _rates(linear: tuple[int, int]) -> tuple[float, float, float, float]:
  """The measured rates, once per process and shape (a few seconds on a
  CPU)."""
  return (measure_matmul_flops(), measure_eigh_flops(),
          measure_pass_rate(*linear), measure_host_rate())


def measure_device(memory_bytes: int | None = None, *,
                   linear: tuple[int, int] = PASS_PROBE_MIN) -> Device:
  """The default device with its rates measured on the spot and its
  memory (`memory_bytes`, or `available_memory_bytes()`); the pass rate
  on scores of the `linear` shape `(n, o)` (a run's:
  `pass_probe_shape`)."""
  detected, host_is_device = available_memory_bytes()
  dev = jax.devices()[0]
  return Device(getattr(dev, "device_kind", dev.platform),
                detected if memory_bytes is None else memory_bytes,
                *_rates(tuple(linear)), host_is_device=host_is_device)


def pass_probe_shape(shapes: ModelShapes) -> tuple[int, int]:
  """The scores' shape `(n, o)` the pass rate is measured on: the
  model's largest linear, or `PASS_PROBE_MIN` when that has fewer
  elements [ours, measured]. A loop step of the solvers passes over
  several arrays of a linear's size per channel, out of the caches: on
  SmolLM2-135M (largest linear 576 x 1536) a probe of that size ran at
  3.6-4.3 G/s, in cache, where its solves ran as if at about 2.4, and
  the 2048^2 probe at 1.5-2.2 predicted a layer's solve at 0.95 of the
  measured; at Llama-2-7B's 4096 x 11008 the probe ran at 1.1-1.5 G/s
  and predicted the 2-layer simulation's solve at 1.07-1.22 of the
  measured, where the 2048^2 probe (1.56) said 1.30."""
  lin = max(shapes.linears, key=lambda lin: lin.n * lin.o)
  if lin.n * lin.o < PASS_PROBE_MIN[0] * PASS_PROBE_MIN[1]:
    return PASS_PROBE_MIN
  return lin.n, lin.o
