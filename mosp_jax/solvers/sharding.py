"""The per-layer solvers on a device mesh (JAX SPMD, `NamedSharding`).

A mesh has two named axes, `('tasks', 'cols')`; the spec `'4'` is a
`1 x 4` mesh and `'2x2'` a `2 x 2` one. A `Layout` says where one layer's
arrays live on it:

  W0, B0, W, W_i, core         (.., n_in, n_out)  columns (cols, tasks)
  ADMM iterates B, D, V, M     (c, n_in, n_out)   P(None, None, (cols, tasks))
  Grams, eigenvectors, inverses (.., n_in, n_in)  replicated
  preference models (P % T == 0)                  P(tasks, None, cols)
  preference models (else)     (P, n_in, n_out)   P(None, None, (cols, tasks))

ADMM's linear step `(G + rho I)^-1 R` acts on each output column alone,
so splitting columns needs no communication there, and every per-weight
score is computed on one device as on a single device. The projections'
global counts become all-reduces of integers; divisions by broadcasts are
written as products with reciprocals, which XLA otherwise rewrites in
some programs only. Results then equal one device's bit for bit on the
tests' layers (tests/test_mesh.py), given shards of at least 64 columns
(narrower ones take another XLA:CPU matmul kernel and agree to rounding).
The PCG's per-column sums go through `pcg.column_sums` (a product with a
vector of ones): `jnp.sum(axis=0)` summed in an order that depends on the
shard's width and flipped stage-2 masks at 1536 x 2048.
So the output columns are split over every device: each holds
`1 / devices` of the iterates. The task axis splits only what is
independent across its index: the eigendecompositions (one Gram per
device) and, in `mosp_materialize`, the preference models when T divides
their number. (MOSP's earlier consensus reading summed a score over tasks
inside its projection; splitting iterates by task then flipped masks at
near-ties, so iterates are never split by task.)

The solvers take `mesh=` and place their inputs with `place`; the jitted
solvers take a static `Layout` and pin the scaled problem, the
eigendecomposition and their outputs with `with_sharding_constraint`.
XLA's sharding propagation carries the split through the ADMM and PCG
loops (measured with the compiled memory analysis: constraints inside the
loops only added temporary buffers), so the solver math is unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

T = TypeVar("T")

TASKS, COLS = "tasks", "cols"
COLUMNS = (COLS, TASKS)  # all devices, cols-major: refines P(None, cols)


def parse_mesh_spec(spec: str) -> tuple[int, int] | None:
  """`''` -> None (one device), `'4'` -> (1, 4), `'2x2'` -> (2, 2).

  The shape is `(tasks, cols)`. Raises ValueError on anything else.
  """
  spec = spec.strip().lower()
  if not spec:
    return None
  parts = spec.split("x")
  try:
    sizes = [int(p) for p in parts]
  except ValueError:
    sizes = []
  if len(sizes) not in (1, 2) or min(sizes) < 1:
    raise ValueError(f"mesh spec must be 'C' or 'TxC' with positive "
                     f"integers (e.g. '4', '2x2'), got {spec!r}")
  return (1, sizes[0]) if len(sizes) == 1 else (sizes[0], sizes[1])


def make_mesh(spec: str, devices: Sequence[jax.Device] | None = None
              ) -> Mesh | None:
  """A `('tasks', 'cols')` mesh from a spec (None for `''`).

  Args:
    spec: `'C'` or `'TxC'` (see `parse_mesh_spec`).
    devices: the devices to use, default `jax.devices()` (all processes');
      the first `T * C` of them form the mesh.
  """
  shape = parse_mesh_spec(spec)
  if shape is None:
    return None
  devices = list(jax.devices() if devices is None else devices)
  need = math.prod(shape)
  if need > len(devices):
    raise ValueError(f"mesh {spec!r} needs {need} devices, only "
                     f"{len(devices)} available")
  return Mesh(np.asarray(devices[:need]).reshape(shape), (TASKS, COLS))


@dataclasses.dataclass(frozen=True)
class Layout:
  """Placement of one layer's arrays on `mesh` (hashable: a static arg).

  model_axis: mesh axis splitting the preference models of
    `mosp_materialize`, or None (their columns go over every device).
  """
  mesh: Mesh
  model_axis: str | None = None

  def _named(self, *spec: str | tuple[str, ...] | None) -> NamedSharding:
    return NamedSharding(self.mesh, P(*spec))

  @property
  def weights(self) -> NamedSharding:
    """`(n_in, n_out)`: columns over every device."""
    return self._named(None, COLUMNS)

  @property
  def per_task(self) -> NamedSharding:
    """`(m, n_in, n_out)` ADMM iterates: columns over every device."""
    return self._named(None, None, COLUMNS)

  @property
  def per_model(self) -> NamedSharding:
    """`(P, n_in, n_out)` preference models."""
    if self.model_axis is None:
      return self._named(None, None, COLUMNS)
    return self._named(self.model_axis, None, COLS)

  @property
  def replicated(self) -> NamedSharding:
    return self._named()

  def constrain(self, x: jax.Array | np.ndarray, sharding: NamedSharding
                ) -> jax.Array:
    """`with_sharding_constraint`, for use inside the jitted solvers."""
    return jax.lax.with_sharding_constraint(x, sharding)

  def eig(self, G: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`admm.eig` spread over the devices: `(Q (m, n, n), L (m, n))`.

    Each device decomposes `ceil(m / devices)` Grams (the task dimension is
    padded with identities), one at a time, and the factors are gathered
    (replicated). Results equal the one-device batched `eigh` bit for bit
    (same LAPACK call per matrix). One matrix per call also avoids a
    deadlock of jaxlib 0.10's CPU LAPACK kernels, whose batched form waits
    on the thread pool that all forced host devices share.
    """
    m, n, _ = G.shape
    axes = tuple(self.mesh.axis_names)
    pad = -m % self.mesh.size
    Gp = jnp.concatenate(
        [G, jnp.broadcast_to(jnp.eye(n, dtype=G.dtype), (pad, n, n))])
    Gp = self.constrain(Gp, self._named(axes, None, None))

    def local(g: jax.Array) -> tuple[jax.Array, jax.Array]:
      L, Q = jax.lax.map(jnp.linalg.eigh, g)
      return Q, L

    Q, L = jax.shard_map(local, mesh=self.mesh, in_specs=P(axes),
                         out_specs=(P(axes), P(axes)))(Gp)
    return (self.constrain(Q[:m], self.replicated),
            self.constrain(L[:m], self.replicated))


def layout_for(mesh: Mesh, n_models: int | None = None) -> Layout:
  """The layout of one layer's solve on `mesh`.

  Args:
    mesh: a `('tasks', 'cols')` mesh (`make_mesh`).
    n_models: number of preference models to materialise, if any; they
      are split over the `tasks` axis when its size divides it.
  """
  t = mesh.shape[TASKS]
  if n_models is not None and t > 1 and n_models % t == 0:
    return Layout(mesh, TASKS)
  return Layout(mesh)


def place(x: ArrayLike, sharding: NamedSharding) -> jax.Array:
  """Puts `x` (numpy or a jax.Array) on `sharding`, explicitly.

  Within one process this is `jax.device_put`. Across processes (after
  `jax.distributed.initialize`) every process must pass the same full
  value; each keeps only its own shards.
  """
  if sharding.is_fully_addressable:
    return jax.device_put(x, sharding)
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    # Already spread over the processes: reshard if needed.
    return x if x.sharding == sharding else jax.device_put(x, sharding)
  host = np.asarray(jax.device_get(x))
  return jax.make_array_from_callback(host.shape, sharding,
                                      lambda idx: host[idx])


def check_layer(mesh: Mesh, n_out: int) -> None:
  """Raises ValueError unless `n_out` columns split over every device."""
  if n_out % mesh.size:
    raise ValueError(f"n_out={n_out} is not divisible by the {mesh.size} "
                     f"devices of the mesh {dict(mesh.shape)}")


def place_layer(mesh: Mesh | None, grams: jax.Array, W0: jax.Array
                ) -> tuple[Layout | None, jax.Array, jax.Array]:
  """`(layout, grams, W0)`: a layer's Gram(s) replicated and its weights
  split along columns on `mesh` (unchanged, layout None, without one)."""
  if mesh is None:
    return None, grams, W0
  layout = layout_for(mesh)
  check_layer(mesh, W0.shape[1])
  return (layout, place(grams, layout.replicated),
          place(W0, layout.weights))


def scalars(values: Sequence[float], layout: Layout | None
            ) -> tuple[jax.Array, ...]:
  """Hyperparameters as float32 device scalars, replicated on the mesh
  (explicit transfers: the solvers run under a disallowing transfer
  guard)."""
  if layout is None:
    return jax.device_put(tuple(values))
  return tuple(place(np.float32(v), layout.replicated) for v in values)


def gather(x: jax.Array) -> np.ndarray:
  """A (possibly multi-process) sharded array as one host numpy array."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(jax.device_get(x))
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def to_local(tree: T, like: jax.Array) -> T:
  """Every array of `tree` moved (explicitly) onto `like`'s placement,
  e.g. a solver's mesh-split results back to the model's device. Arrays
  spread over other processes are gathered first."""
  def move(x: Any) -> jax.Array:  # an Array, or gathered to numpy
    if not getattr(x, "is_fully_addressable", True):
      x = gather(x)
    return jax.device_put(x, like.sharding)
  return jax.tree.map(move, tree)


def initialize_distributed(coordinator_address: str, num_processes: int,
                           process_id: int) -> bool:
  """`jax.distributed.initialize` when `num_processes > 1`.

  Must run before any other JAX call. Returns whether it initialised.
  """
  if num_processes <= 1:
    return False
  if not coordinator_address:
    raise ValueError("--coordinator_address is required when "
                     "--num_processes > 1 (host:port of process 0)")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id must be in [0, {num_processes}), got "
                     f"{process_id}")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes,
                             process_id=process_id)
  return True
