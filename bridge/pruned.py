"""The pruned model of one preference, rebuilt from a run directory.

A run (`experiments.run`) leaves `<run_dir>/config.json` (what was run),
`results.json` (what was measured) and the compact Pareto set
`<run_dir>/pareto/` (`mosp_jax.pipeline.artifact`). From these this module
rebuilds, for any preference, exactly the model the run evaluated:

  run = read_run(run_dir)
  pruned = preference_model(run, parse_preference('0.5,0.25,0.25',
                                                  run.tasks))
  segments = run_test_segments(run, pruned.tokenizer)  # the test set

`preference_model` loads the dense model the run loaded (checked against
the run's fingerprint when it recorded one), and materialises every
linear's preference model from the stored Pareto set `(S_c, W, W_i, d)`
(`linear_problem.LinearProblem.preference_models`): a weighted sum and a
projection, refitted on the stored Grams under the preference refit [ours,
the default]; a set written with the paper's construction
(`pref_refit_iters=0`) holds no Grams and exports that construction.
The preference is materialised alone, as the run evaluates each of its
preferences, so a run preference's weights are bitwise those the run
evaluated (XLA may round a batch of another size differently in the
last bit).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from bridge import load
from mosp_jax.config import SolverConfig
from mosp_jax.models.base import Adapter
from mosp_jax.pipeline import (
  artifact,
  gram_store,
  linear_problem,
  preferences,
  run_record,
)
from mosp_jax.solvers import Pattern

CENTROID = "centroid"


class RunDirError(ValueError):
  """A run directory is incomplete or inconsistent; names the file."""


@dataclasses.dataclass(frozen=True)
class RunInfo:
  """What a run directory says about the run.

  Attributes:
    run_dir: the run directory.
    config: `config.json` (the run and solver configs).
    meta: `pareto/meta.json` (model, tasks, pattern, solver, preferences,
      layers, linears, dense fingerprint).
    results: `results.json`, or None when the run has not finished.
  """

  run_dir: pathlib.Path
  config: run_record.ConfigRecord
  meta: run_record.ArtifactMeta
  results: run_record.Results | None

  @property
  def model(self) -> str:
    return self.meta.model

  @property
  def tasks(self) -> tuple[str, ...]:
    return self.meta.tasks

  @property
  def pattern(self) -> Pattern:
    return self.meta.pattern

  @property
  def solver(self) -> SolverConfig:
    return self.meta.solver

  @property
  def prefs(self) -> np.ndarray:
    """`(P, m)` float32, the preferences the run evaluated."""
    return self.meta.prefs

  @property
  def num_layers(self) -> int:
    return self.meta.num_layers

  @property
  def groups(self) -> tuple[tuple[str, ...], ...]:
    return self.meta.groups


@dataclasses.dataclass(frozen=True)
class PrunedModel:
  """One preference's model, as the JAX side computes it.

  Attributes:
    preference: `(m,)` float32.
    run_index: row of `preference` in the run's preferences, or None.
    adapter: the family adapter (its `config` is the HF model config).
    params: nested dict of float32 numpy arrays, the pruned weights.
    masks: `{(layer, linear name): (n_in, n_out) bool}`, the supports.
    budgets: `{(layer, linear name): kept weights the pattern allows}`.
    tokenizer: the run's tokenizer.
    dense_sha256: fingerprint of the dense parameters loaded.
  """

  preference: np.ndarray
  run_index: int | None
  adapter: Adapter
  params: dict
  masks: dict[tuple[int, str], np.ndarray]
  budgets: dict[tuple[int, str], int]
  tokenizer: Any
  dense_sha256: str


def read_run(run_dir: str | pathlib.Path) -> RunInfo:
  """Reads a run directory and checks that its Pareto-set files are
  complete; raises RunDirError naming a missing or unreadable file
  (`artifact.ArtifactError` for a damaged layer file)."""
  root = pathlib.Path(run_dir)
  if not root.is_dir():
    raise RunDirError(f"{root}: no such run directory")
  try:
    meta = run_record.read_meta(root)
    config = run_record.read_config(root)
    results = (run_record.read_results(root)
               if (root / run_record.RESULTS_FILE).exists() else None)
  except run_record.RunRecordError as e:
    raise RunDirError(str(e)) from e
  run = RunInfo(run_dir=root, config=config, meta=meta, results=results)
  artifact.check_layers(root / run_record.ARTIFACT_DIR, run.num_layers)
  return run


def parse_preference(text: str, tasks: Sequence[str], *,
                     flag: str = "--preference") -> np.ndarray:
  """'centroid' or comma-separated weights (one per task, summing to 1)
  -> `(m,)` float32; a ValueError names `flag`."""
  m = len(tasks)
  if text.strip() == CENTROID:
    return np.full(m, 1.0 / m, np.float32)
  try:
    pref = np.asarray([[float(x) for x in text.split(",")]], np.float32)
  except ValueError as e:
    raise ValueError(f"{flag}: expected '{CENTROID}' or {m} comma-"
                     f"separated weights (tasks {', '.join(tasks)}), got "
                     f"{text!r}") from e
  preferences.check_prefs(pref, m, flag=flag)
  return pref[0]


def preference_tag(text: str) -> str:
  """A folder-name tag of a preference flag ('centroid', '0.5-0.25-0.25')."""
  if text.strip() == CENTROID:
    return CENTROID
  return "-".join(f"{float(x):g}" for x in text.split(","))


def run_index(run: RunInfo, pref: np.ndarray) -> int | None:
  """Row of `pref` among the run's preferences (atol 1e-6), or None."""
  hits = np.flatnonzero(np.all(np.abs(run.prefs - pref[None]) <= 1e-6,
                               axis=1))
  return int(hits[0]) if hits.size else None


def load_run_dense(run: RunInfo, *,
                   log: Callable[[str], None] = lambda s: None
                   ) -> tuple[Adapter, dict, Any, str]:
  """`(adapter, params, tokenizer, sha256)` of the dense model the run
  pruned; RunDirError when the model loaded now is not that one (its
  fingerprint or layer count differs)."""
  adapter, params, tokenizer = load.load_dense(
      run.model, trust_pickle=run.config.run.trust_pickle)
  dense_sha = run_record.params_sha256(params)
  want = run.meta.dense_sha256
  if want is not None and want != dense_sha:
    raise RunDirError(
        f"{run.run_dir}: the dense model {run.model!r} loaded now "
        f"(sha256 {dense_sha[:12]}) is not the one the run pruned "
        f"({want[:12]}); the model cache or the source changed")
  if want is None:
    log(f"{run.run_dir}: the run recorded no dense fingerprint; cannot "
        "prove the dense model is the one it pruned")
  if adapter.num_layers(params) != run.num_layers:
    raise RunDirError(f"{run.run_dir}: the artifact has {run.num_layers} "
                      f"layers, the model {adapter.num_layers(params)}")
  return adapter, params, tokenizer, dense_sha


def _layer_kernels(run: RunInfo, layer: int, pref_dev: jax.Array,
                   adapter: Adapter, params: dict
                   ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """`{linear: (kernel, mask)}` of one layer for the preference
  `pref_dev (1, m)`; RunDirError for a missing linear or Gram."""
  root = run.run_dir / run_record.ARTIFACT_DIR
  refit = linear_problem.needs_grams(run.solver)
  linears = artifact.load_layer(root, layer)
  grams = artifact.load_grams(root, layer) if refit else {}
  for group in run.groups:
    if refit and group[0] not in grams:
      raise RunDirError(f"{root}: layer {layer} has no Gram for "
                        f"{group[0]!r}")
    for name in group:
      if name not in linears:
        raise RunDirError(f"{root}: layer {layer} has no {name!r}")

  def stored_gram(key: str) -> jax.Array | None:
    return gram_store.to_device(grams[key]) if refit else None

  out = {}
  for prob in linear_problem.layer_problems(
      adapter, adapter.layer_params(params, layer), stored_gram,
      pattern=run.pattern):
    W, M = jax.device_get(prob.preference_models(
        jax.device_put(linears[prob.name]), pref_dev, run.solver))
    w, mask = np.array(W[0]), np.array(M[0])  # Own arrays, not views.
    if np.any(w[~mask] != 0):
      raise AssertionError(f"layer {layer} {prob.name}: weights off the "
                           "mask are not zero")
    out[prob.name] = (w, mask)
  return out


def preference_model(run: RunInfo, pref: np.ndarray, *,
                     log: Callable[[str], None] = lambda s: None
                     ) -> PrunedModel:
  """The model of preference `pref (m,)` from the run's Pareto set.

  Raises:
    RunDirError: the dense model differs from the one the run pruned
      (fingerprints), or the artifact misses a layer or linear.
  """
  pref = np.asarray(pref, np.float32)
  if pref.shape != (len(run.tasks),):
    raise ValueError(f"preference must have {len(run.tasks)} weights "
                     f"(tasks {', '.join(run.tasks)}), got {pref.shape}")
  if not linear_problem.needs_grams(run.solver):
    log(f"{run.run_dir}: written with the paper's construction "
        "(pref_refit_iters=0): no task Grams stored, so the preference is "
        "the projected mix, not refitted")
  adapter, params, tokenizer, dense_sha = load_run_dense(run, log=log)
  masks, budgets, kernels = {}, {}, {}
  with jax.transfer_guard("disallow"):
    pref_dev = jax.device_put(pref[None])
    for layer in range(run.num_layers):
      for name, (w, mask) in _layer_kernels(run, layer, pref_dev, adapter,
                                            params).items():
        masks[(layer, name)] = mask
        budgets[(layer, name)] = run.pattern.keep(*w.shape)
        kernels[(layer, name)] = w
      log(f"materialised layer {layer + 1}/{run.num_layers}")
  tree: Any = params
  for (layer, name), w in kernels.items():  # Not under the guard: set_kernel
    tree = adapter.set_kernel(tree, layer, name, w)  # makes jax arrays.
  params = jax.tree.map(np.asarray, jax.device_get(tree))
  return PrunedModel(preference=pref, run_index=run_index(run, pref),
                     adapter=adapter, params=params, masks=masks,
                     budgets=budgets, tokenizer=tokenizer,
                     dense_sha256=dense_sha)


def run_test_segments(run: RunInfo, tokenizer: Any
                      ) -> dict[str, np.ndarray]:
  """The run's test segments per task, `(n_test, seqlen)` int32 each,
  rebuilt from `config.json` as the runner builds them
  (`run_record.run_segments`)."""
  _, test = run_record.run_segments(run.config.run, tokenizer)
  return dict(zip(run.tasks, test, strict=True))
