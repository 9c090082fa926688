"""Work per phase of the walk, and its seconds on a device.

Seconds [ours]: the decoder-layer forwards (capture, propagation,
evaluation) at the rate of one forward of the run's own layer measured
on the spot (`probes.with_forward_rate`: the norms, RoPE, softmax and
activations that FLOP counts leave out halved SmolLM2's rate against a
bare matmul), other matmul FLOPs at the device's measured matmul rate,
the eigendecompositions at a measured `eigh` rate, the solvers' exact
top-k and elementwise updates as passes over the weights at a pass rate
measured on the run's largest linear (at least 2048^2), the host-side
float64 Gram accumulation at a measured host rate. The ADMM iteration
count of stage 1 is the expected one (`EXPECTED_STAGE1_ITERS`, capped by
`max_iter`); `max_iter` is the upper bound and the table shows the solve
time at it too. Notation: the package docstring (`pipeline.plan`).
"""

from __future__ import annotations

import dataclasses

from mosp_jax.config import RunConfig, SolverConfig
from mosp_jax.pipeline.plan.shapes import (
  Linear,
  ModelShapes,
  stage1_channels,
)

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
# stable, 33 with checks every 3 (docs/benchmarks.md; 31-36 on real
# SmolLM2 layers). `max_iter` is the upper bound.
EXPECTED_STAGE1_ITERS = 33
# Host passes over a Gram after its last batch (`grams.finish`: the
# division, the float32 cast, the finite check) [ours: a count].
GRAM_FINISH_PASSES = 3


@dataclasses.dataclass(frozen=True)
class Device:
  """The device a run is planned for (rates measured by
  `probes.measure_device`).

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
      of one `(B, T, d)` batch (`probes.with_forward_rate`); None: forwards are
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
    solve = solve + solve_work(lin, stage1_channels(run, solver, lin), m,
                               solver, stage1_iters)
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

