"""The device a run is planned for: its memory and rates, measured on
the spot (a few seconds on a CPU, once per process and shape), and the
process's peak memory afterwards."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mosp_jax import timing
from mosp_jax.pipeline import grams
from mosp_jax.pipeline.plan.cost import (
  EIGH_FLOPS_PER_N3,
  TOPK_PASSES,
  Device,
  layer_forward_flops,
)
from mosp_jax.pipeline.plan.shapes import (
  ModelShapes,
  one_layer_model,
  shapes_from_config,
)
from mosp_jax.solvers import projection

# The smallest scores the pass rate is measured on (`pass_probe_shape`).
PASS_PROBE_MIN = (2048, 2048)


def _best_seconds(fn: Any, *args: Any) -> float:
  """Best wall time of `fn(*args)` after one call that compiles
  (`timing.best_times`): at least 3 timed calls, more while they total
  under a second (at most 100), and none after a call over 2 seconds (a
  paper-scale layer forward on a CPU takes tens of seconds).

  The budget [ours]: three calls of a 2048^2 matmul take half a second,
  and one such start-up measurement on the 2-core CPU gave 101 GFLOP/s
  where the runs before it gave 184; the best of a second's calls is
  less at the mercy of one slow moment."""
  jax.block_until_ready(fn(*args))
  (best,), _ = timing.best_times([lambda: fn(*args)], repeats=3,
                                 budget=1.0, enough=2.0)
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
  model, adapter = one_layer_model(config)
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
