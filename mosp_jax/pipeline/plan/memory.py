"""The device memory of the layer walk, term by term (bytes).

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
and Pareto-set terms are per layer and stay. Notation: the package
docstring (`pipeline.plan`).
"""

from __future__ import annotations

import dataclasses

from mosp_jax.config import RunConfig, SolverConfig
from mosp_jax.pipeline import gram_store, linear_problem
from mosp_jax.pipeline.plan.shapes import ModelShapes, stage1_channels

GRAM_BYTES = 4  # float32 Grams and solver iterates (grams.py casts).


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


def memory_rows(shapes: ModelShapes, run: RunConfig, solver: SolverConfig,
                *, act_bytes: int, host_is_device: bool,
                offload_streams: bool = False) -> tuple[Row, ...]:
  """The device memory of the layer walk, term by term (bytes), in this
  order: the weights (`weight_rows`), the streams and the forward
  workspace (`stream_rows`), the Grams (`gram_rows`), the solver
  (`solver_rows`), the Pareto sets (`pareto_row`); each function's
  docstring gives its formulas.

  Args:
    shapes: the model's shapes.
    run, solver: the run's configuration.
    act_bytes: `b`, bytes per weight and activation element.
    host_is_device: the CPU backend (host copies use the device memory).
    offload_streams: the streams live in host memory.
  """
  return (weight_rows(shapes, act_bytes=act_bytes,
                      host_is_device=host_is_device)
          + stream_rows(shapes, run, act_bytes=act_bytes,
                        host_is_device=host_is_device,
                        offload_streams=offload_streams)
          + gram_rows(shapes, len(run.tasks), host_is_device=host_is_device,
                      refit=linear_problem.needs_grams(solver))
          + solver_rows(shapes, run, solver)
          + (pareto_row(shapes, run, act_bytes=act_bytes),))


def weight_rows(shapes: ModelShapes, *, act_bytes: int,
                host_is_device: bool) -> tuple[Row, ...]:
  """The dense weights.

  - dense weights, one layer: `(params_outside + params_per_layer) b`;
    the walk keeps the embeddings, final norm and head on the device and
    reads one decoder layer at a time (`layer_source.DenseLayers`).
  - dense weights, host read (CPU backend only): `params_per_layer 4`,
    the float32 layer as read before its cast (a model loaded whole,
    'tiny-llama' or a Flax folder, holds all its layers on the host).
  """
  weights = (shapes.params_outside + shapes.params_per_layer) * act_bytes
  rows = [Row("dense weights, one layer", weights,
              "(outside + per_layer) params x b", ("--dtype",))]
  if host_is_device:
    rows.append(Row("dense weights, host read", shapes.params_per_layer * 4,
                    "per_layer params x 4 (CPU: the host is the device)"))
  return tuple(rows)


def stream_rows(shapes: ModelShapes, run: RunConfig, *, act_bytes: int,
                host_is_device: bool, offload_streams: bool
                ) -> tuple[Row, ...]:
  """The hidden-state streams and one batch's workspace.

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
  """
  m, N, T, d = len(run.tasks), run.nsamples, run.seqlen, shapes.hidden
  S, P, B, b = (run.test_tokens // T, len(run.prefs), run.batch_size,
                act_bytes)
  on_device = host_is_device or not offload_streams
  where = "" if on_device else " (host)"
  # Offloaded: two batches per stream on the device, in and out.
  visiting = 2 * B * T * d * b if offload_streams else 0
  return (
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
  )


def gram_rows(shapes: ModelShapes, m: int, *, host_is_device: bool,
              refit: bool = False) -> tuple[Row, ...]:
  """The `m` tasks' Grams of one layer.

  - task Grams of a layer: `m sum_g n_g^2 g` (`prune._solve_layer` keeps
    every group's `(m, n_g, n_g)` on the device until evaluation).
  - stored Grams (under the preference refit): `m sum_g (n_g^2 + 3 n_g)`
    bytes, their compact form (`gram_store`), kept until the layer is
    saved.
  - Grams on the host (CPU backend only): `m sum_g n_g^2 g + sum_g n_g^2
    8` (the captured Grams and one task's float64 accumulators).
  """
  g = GRAM_BYTES
  sum_n2 = sum(n * n for n in shapes.groups)
  rows = [Row("task Grams (1 layer)", m * sum_n2 * g, "m sum n_g^2 g")]
  if refit:
    rows.append(Row("stored Grams (1 layer, refit)",
                    sum(gram_store.nbytes(n, m) for n in shapes.groups),
                    "m sum (n_g^2 + 3 n_g)"))
  if host_is_device:
    rows.append(Row("Grams on the host", m * sum_n2 * g + sum_n2 * 8,
                    "m sum n_g^2 g + sum n_g^2 8"))
  return tuple(rows)


def solver_rows(shapes: ModelShapes, run: RunConfig, solver: SolverConfig
                ) -> tuple[Row, ...]:
  """The solver's arrays on the largest linear.

  - solver Grams and eigenvectors, largest linear: `(4 + 2 m) n^2 g`:
    `H`, its scaled copy, `Q`, the explicit inverse, the scaled task
    Grams and stage 2's inverses.
  - solver iterates, largest linear: `n o (max(4 c + 2, 6 m + 2) g +
    c)`: stage 1's `B, D, V, Z` per channel with `B0, G B0`; stages 2-3
    vmapped over tasks (`X, R, P, Z, AP, b` per task); the masks.
  """
  m, g = len(run.tasks), GRAM_BYTES
  largest_n = max(lin.n for lin in shapes.linears)
  return (
      Row("solver Grams + eigenvectors", (4 + 2 * m) * largest_n ** 2 * g,
          "(4 + 2 m) n^2 g, largest n"),
      Row("solver iterates", max(
          lin.n * lin.o * (max(4 * stage1_channels(run, solver, lin) + 2,
                               6 * m + 2) * g
                           + stage1_channels(run, solver, lin))
          for lin in shapes.linears),
          "n o (max(4 c + 2, 6 m + 2) g + c), largest linear"),
  )


def pareto_row(shapes: ModelShapes, run: RunConfig, *, act_bytes: int
               ) -> Row:
  """Pareto sets and model layers: `sum n o ((m + 1) g + 1 + (2 +
  m_task) b)`: per linear `W`, the `W_i`, the core bits, and the layer
  copies alive at once: `W`'s and one preference's (the evaluation
  builds and advances one preference at a time, `prune._evaluate_layer`
  [ours]), or the task models' during the solve (`m_task = m` with
  `--streams=task`)."""
  m, g, b = len(run.tasks), GRAM_BYTES, act_bytes
  m_task = m if run.streams == "task" else 0
  return Row("Pareto sets + model layers", sum(
      lin.n * lin.o for lin in shapes.linears)
      * ((m + 1) * g + 1 + (2 + m_task) * b),
      "sum n o ((m + 1) g + 1 + (2 + m_task) b)", ("--tasks",))
