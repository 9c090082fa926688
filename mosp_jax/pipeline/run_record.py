"""A run directory: its layout and the typed records it holds.

`experiments.run` writes, and the bridge, `experiments.compare` and a
resumed run read, through this module only:

  <out_dir>/config.json       `ConfigRecord`: what was run (the run and
                              solver configs; a resumed run must match it)
  <out_dir>/results.json      `Results`: what was measured (PPL per model,
                              timings, test-set fingerprints, the export)
  <out_dir>/pareto/meta.json  `ArtifactMeta`: what the Pareto set holds
  <out_dir>/pareto/layer_*.npz  the Pareto set (`pipeline.artifact`)
  <out_dir>/checkpoint/       resume state (`pipeline.checkpoint`)

Every record has `to_dict()` (the JSON layout on disk) and `from_dict()`
(raises `RunRecordError` naming what is wrong). Fingerprints
(`params_sha256`, `segments_sha256`) prove that a later reader loaded the
same dense model and rebuilt the same test segments.

Over 400 lines because it is the one schema of a run directory: every
record that results.json and config.json hold, with its JSON reader and
writer, kept together so that a field is changed in one place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import shutil
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from mosp_jax import cli
from mosp_jax import data as data_lib
from mosp_jax.config import PAPER, RunConfig, SolverConfig
from mosp_jax.pipeline import artifact
from mosp_jax.solvers import NM, Pattern, Unstructured

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
PLOT_FILE = "pareto.png"
FLAGS_FILE = "flags.txt"
ARTIFACT_DIR = "pareto"
CHECKPOINT_DIR = "checkpoint"
EXPORT_PREFIX = "export_"
# What a run writes into --out_dir; --overwrite deletes only these (and
# the export_<preference>/ folders).
RUN_OUTPUTS = (CONFIG_FILE, FLAGS_FILE, RESULTS_FILE, REPORT_FILE,
               PLOT_FILE, ARTIFACT_DIR, CHECKPOINT_DIR)

_PATTERNS: dict[str, type] = {"Unstructured": Unstructured, "NM": NM}


class RunRecordError(ValueError):
  """A run directory's record is missing or malformed; names the file."""


def pattern_to_dict(pattern: Pattern) -> dict[str, Any]:
  """`Unstructured(0.5)` -> `{'kind': 'Unstructured', 'sparsity': 0.5}`;
  `NM(2, 4)` -> `{'kind': 'NM', 'n': 2, 'm': 4}`."""
  return {"kind": type(pattern).__name__, **dataclasses.asdict(pattern)}


def pattern_from_dict(d: Mapping[str, Any]) -> Pattern:
  """The inverse of `pattern_to_dict`; RunRecordError for an unknown
  kind."""
  fields = dict(d)
  kind = fields.pop("kind", None)
  if kind not in _PATTERNS:
    raise RunRecordError(f"unknown sparsity pattern {kind!r}; known: "
                         f"{sorted(_PATTERNS)}")
  return _PATTERNS[kind](**fields)


def leaves_sha256(keys: Iterable[str], read: Callable[[str], Any]) -> str:
  """A fingerprint of parameters named by `keys` (`jax.tree_util.keystr`
  paths), hashed in sorted order with their dtypes, shapes and bytes;
  `read(key)` gives one parameter, so a model read layer by layer is
  never whole in memory."""
  h = hashlib.sha256()
  for key in sorted(keys):
    arr = np.ascontiguousarray(jax.device_get(read(key)))
    h.update(f"{key}|{arr.dtype}|{arr.shape}|".encode())
    h.update(arr.tobytes())
  return h.hexdigest()


def params_sha256(params: Any) -> str:
  """A fingerprint of a parameter tree: paths, dtypes, shapes and bytes."""
  leaves = {jax.tree_util.keystr(path): leaf for path, leaf in
            jax.tree_util.tree_flatten_with_path(params)[0]}
  return leaves_sha256(leaves, leaves.__getitem__)


def segments_sha256(segments: np.ndarray) -> str:
  """A fingerprint of `(N, T)` token segments (as int32)."""
  arr = np.ascontiguousarray(segments, np.int32)
  return hashlib.sha256(f"{arr.shape}|".encode() + arr.tobytes()).hexdigest()


def _json_normal(obj: Any) -> Any:
  """What `obj` reads back as from JSON (tuples become lists, ...)."""
  return json.loads(json.dumps(obj))


def solver_from_record(d: Mapping[str, Any]) -> SolverConfig:
  """The solver configuration a record holds. A field the record lacks
  was added after it was written, when the run did what the field's
  paper value means (`config.PAPER`: the dual core, no refit, ...),
  whatever today's default."""
  return SolverConfig(**{**dataclasses.asdict(PAPER), **d})


@dataclasses.dataclass(frozen=True)
class ConfigRecord:
  """`config.json`: the run configuration (all of `RunConfig` but
  `out_dir`, which may move) and the solver configuration."""
  run: RunConfig
  solver: SolverConfig

  def to_dict(self) -> dict[str, Any]:
    rec = dataclasses.asdict(self.run)
    rec.pop("out_dir")
    rec["pattern"] = pattern_to_dict(self.run.pattern)
    rec["solver"] = dataclasses.asdict(self.solver)
    return _json_normal(rec)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], out_dir: str = ""
                ) -> ConfigRecord:
    """The record of a `config.json` dict, with `out_dir` set."""
    try:
      fields = dict(d)
      solver = solver_from_record(fields.pop("solver"))
      fields["pattern"] = pattern_from_dict(fields["pattern"])
      fields["tasks"] = tuple(fields["tasks"])
      fields["prefs"] = tuple(tuple(r) for r in fields["prefs"])
      run = RunConfig(**fields, out_dir=out_dir)
    except (KeyError, TypeError, ValueError) as e:
      raise RunRecordError(f"not a run's {CONFIG_FILE} "
                           f"({type(e).__name__}: {e})") from e
    return cls(run=run, solver=solver)


@dataclasses.dataclass(frozen=True)
class ArtifactMeta:
  """`pareto/meta.json`: what the Pareto set on disk holds.

  Attributes:
    model: the model spec the run loaded.
    tasks: the task names, one per objective.
    pattern: the sparsity pattern of every linear.
    solver: the solver configuration (materialisation reads `p`,
      `pref_map`, `pref_refit_iters`, ...).
    prefs: `(P, m)` float32, the preferences the run evaluated.
    num_layers: decoder layers in the artifact.
    groups: the linears of a layer, grouped by shared Gram.
    dense_sha256: `params_sha256` of the dense model pruned (None in
      runs that did not record it).
  """
  model: str
  tasks: tuple[str, ...]
  pattern: Pattern
  solver: SolverConfig
  prefs: np.ndarray
  num_layers: int
  groups: tuple[tuple[str, ...], ...]
  dense_sha256: str | None = None

  def to_dict(self) -> dict[str, Any]:
    return _json_normal({
        "model": self.model, "tasks": list(self.tasks),
        "pattern": pattern_to_dict(self.pattern),
        "solver": dataclasses.asdict(self.solver),
        "prefs": np.asarray(self.prefs, np.float32).tolist(),
        "num_layers": self.num_layers,
        "groups": [list(g) for g in self.groups],
        "dense_sha256": self.dense_sha256})

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> ArtifactMeta:
    try:
      return cls(model=d["model"], tasks=tuple(d["tasks"]),
                 pattern=pattern_from_dict(d["pattern"]),
                 solver=solver_from_record(d["solver"]),
                 prefs=np.asarray(d["prefs"], np.float32),
                 num_layers=int(d["num_layers"]),
                 groups=tuple(tuple(g) for g in d["groups"]),
                 dense_sha256=d.get("dense_sha256"))
    except (KeyError, TypeError, ValueError) as e:
      raise RunRecordError(f"not the {artifact.META} of a run "
                           f"({type(e).__name__}: {e})") from e


@dataclasses.dataclass(frozen=True)
class ModelResult:
  """One preference model's measurements: `preference (m,)`, PPL per
  task, the achieved sparsity over the pruned linears."""
  preference: tuple[float, ...]
  ppl: dict[str, float]
  sparsity: float


@dataclasses.dataclass(frozen=True)
class TestSet:
  """The test segments' shape and `segments_sha256` per task, so that a
  later check can prove it rebuilt the same ones."""
  segments: int
  seqlen: int
  sha256: dict[str, str]


@dataclasses.dataclass(frozen=True)
class LinearStats:
  """MOSP's diagnostics of one linear in one layer.

  stage1_iters: iterations of the stage-1 dual ADMM.
  stage2_iters: `(m,)` iterations of each task's stage-2 ADMM.
  rel_error: `(P + 1, m)` relative reconstruction error on the
    calibration Grams of each preference model, then of `W`.
  """
  stage1_iters: int
  stage2_iters: tuple[int, ...]
  rel_error: tuple[tuple[float, ...], ...]

  def to_dict(self) -> dict[str, Any]:
    return {"stage1_iters": self.stage1_iters,
            "stage2_iters": list(self.stage2_iters),
            "rel_error": [list(row) for row in self.rel_error]}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> LinearStats:
    return cls(stage1_iters=int(d["stage1_iters"]),
               stage2_iters=tuple(int(i) for i in d["stage2_iters"]),
               rel_error=tuple(tuple(float(e) for e in row)
                               for row in d["rel_error"]))


@dataclasses.dataclass(frozen=True)
class LayerRecord:
  """What the walk measured on one decoder layer (`walk.walk_layers`).

  layer: its index.
  capture_s, solve_s, propagate_s, evaluate_s: wall seconds of each
    phase (`evaluate_s` None in runs written before it was measured).
  linears: per linear, MOSP's diagnostics (empty for a baseline's walk,
    and then left out of the JSON).
  materialise_s: of `evaluate_s`, the seconds building the evaluated
    models (MOSP's preference models, refit included); None in runs
    written before it was measured.
  """
  layer: int
  capture_s: float
  solve_s: float
  propagate_s: float
  evaluate_s: float | None
  linears: Mapping[str, LinearStats] = dataclasses.field(
      default_factory=dict)
  materialise_s: float | None = None

  def to_dict(self) -> dict[str, Any]:
    d: dict[str, Any] = {"layer": self.layer, "capture_s": self.capture_s,
                         "solve_s": self.solve_s,
                         "propagate_s": self.propagate_s}
    if self.evaluate_s is not None:
      d["evaluate_s"] = self.evaluate_s
    if self.materialise_s is not None:
      d["materialise_s"] = self.materialise_s
    if self.linears:
      d["linears"] = {k: v.to_dict() for k, v in self.linears.items()}
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> LayerRecord:
    evaluate_s = d.get("evaluate_s")
    return cls(layer=int(d["layer"]), capture_s=float(d["capture_s"]),
               solve_s=float(d["solve_s"]),
               propagate_s=float(d["propagate_s"]),
               evaluate_s=None if evaluate_s is None else float(evaluate_s),
               linears={k: LinearStats.from_dict(v)
                        for k, v in d.get("linears", {}).items()},
               materialise_s=(None if d.get("materialise_s") is None
                              else float(d["materialise_s"])))


@dataclasses.dataclass(frozen=True)
class ExportRecord:
  """The `--export_pref` parity report recorded in results.json
  (`bridge.export_check.export_and_check`).

  checkpoint: the exported folder; dtype: its weights' dtype.
  preference: `(m,)` the exported preference.
  ok: whether the parity check passed.
  ppl: per task, the check's perplexities (`parity_check.TaskPpl` as a
    dict: task, torch, jax, rel_diff, run, run_rel_diff).
  max_rel_diff: the largest relative torch/JAX perplexity difference.
  sparsity: `(min, max)` sparsity over the pruned linears, or None.
  problems: what failed, one line each.
  """
  checkpoint: str
  dtype: str
  preference: tuple[float, ...]
  ok: bool
  ppl: tuple[Mapping[str, Any], ...]
  max_rel_diff: float
  sparsity: tuple[float, float] | None
  problems: tuple[str, ...]

  def to_dict(self) -> dict[str, Any]:
    return _json_normal(dataclasses.asdict(self))

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> ExportRecord:
    sparsity = d["sparsity"]
    return cls(checkpoint=str(d["checkpoint"]), dtype=str(d["dtype"]),
               preference=tuple(float(x) for x in d["preference"]),
               ok=bool(d["ok"]), ppl=tuple(dict(r) for r in d["ppl"]),
               max_rel_diff=float(d["max_rel_diff"]),
               sparsity=None if sparsity is None else (
                   float(sparsity[0]), float(sparsity[1])),
               problems=tuple(str(p) for p in d["problems"]))


@dataclasses.dataclass(frozen=True)
class Results:
  """`results.json`: what a finished run measured.

  Attributes:
    model, tasks, solver: as run.
    sparsity: the pattern's nominal sparsity; pattern: its description.
    dense_ppl: PPL per task of the dense model.
    models: the preference models, in the run's order.
    global_ppl: PPL per task of the global model `W`.
    timings: wall seconds per phase.
    layers: per decoder layer, its phase seconds and MOSP's diagnostics.
    test: the test set's fingerprints (None in old runs).
    export: the `--export_pref` parity report, once one ran.
  """
  model: str
  sparsity: float
  pattern: str
  tasks: tuple[str, ...]
  dense_ppl: dict[str, float]
  models: tuple[ModelResult, ...]
  global_ppl: dict[str, float]
  timings: dict[str, float]
  layers: tuple[LayerRecord, ...]
  solver: SolverConfig
  test: TestSet | None = None
  export: ExportRecord | None = None

  def to_dict(self) -> dict[str, Any]:
    d = {"model": self.model, "sparsity": self.sparsity,
         "pattern": self.pattern, "tasks": list(self.tasks),
         "dense_ppl": self.dense_ppl,
         "models": [dataclasses.asdict(m) for m in self.models],
         "global_model": {"ppl": self.global_ppl},
         "timings": self.timings,
         "layers": [layer.to_dict() for layer in self.layers],
         "solver": dataclasses.asdict(self.solver),
         "test": None if self.test is None else dataclasses.asdict(
             self.test)}
    if self.export is not None:
      d["export"] = self.export.to_dict()
    return _json_normal(d)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> Results:
    try:
      test = d.get("test")
      return cls(
          model=d["model"], sparsity=float(d["sparsity"]),
          pattern=d["pattern"], tasks=tuple(d["tasks"]),
          dense_ppl=dict(d["dense_ppl"]),
          models=tuple(ModelResult(preference=tuple(m["preference"]),
                                   ppl=dict(m["ppl"]),
                                   sparsity=float(m["sparsity"]))
                       for m in d["models"]),
          global_ppl=dict(d["global_model"]["ppl"]),
          timings=dict(d["timings"]),
          layers=tuple(LayerRecord.from_dict(r) for r in d["layers"]),
          solver=solver_from_record(d["solver"]),
          test=None if test is None else TestSet(**test),
          export=None if d.get("export") is None
          else ExportRecord.from_dict(d["export"]))
    except (KeyError, TypeError, ValueError) as e:
      raise RunRecordError(f"not a run's {RESULTS_FILE} "
                           f"({type(e).__name__}: {e})") from e


def run_segments(run: RunConfig, tokenizer: Any
                 ) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Per task, the run's `(nsamples, seqlen)` calibration and `(n_test,
  seqlen)` test segments, int32, every task cut to the same number of
  test segments: as the runner builds them and a later reader (the
  export's parity check) rebuilds them; a ValueError names a task that is
  too small."""
  calib, test = [], []
  for task in run.tasks:
    td = data_lib.load_task(task, tokenizer, nsamples=run.nsamples,
                            seqlen=run.seqlen, test_tokens=run.test_tokens,
                            seed=run.seed)
    calib.append(td.calib)
    test.append(td.test)
  n_test = min(t.shape[0] for t in test)
  return calib, [t[:n_test] for t in test]


def read_json(path: pathlib.Path) -> dict[str, Any]:
  """A record file's JSON; RunRecordError naming the file when it is
  missing or not JSON."""
  try:
    return json.loads(path.read_text())
  except FileNotFoundError as e:
    raise RunRecordError(f"{path}: missing; is {path.parent} a run "
                         "directory of experiments.run?") from e
  except ValueError as e:
    raise RunRecordError(f"{path}: not valid JSON ({e})") from e


def _read(path: pathlib.Path, parse: Callable[[Any], Any]) -> Any:
  """`parse(read_json(path))`, with the file named in any error."""
  try:
    return parse(read_json(path))
  except RunRecordError as e:
    if str(e).startswith(str(path)):
      raise
    raise RunRecordError(f"{path}: {e}") from e


def read_config(out: pathlib.Path) -> ConfigRecord:
  return _read(out / CONFIG_FILE,
               lambda d: ConfigRecord.from_dict(d, out_dir=str(out)))


def read_results(out: pathlib.Path) -> Results:
  return _read(out / RESULTS_FILE, Results.from_dict)


def read_meta(out: pathlib.Path) -> ArtifactMeta:
  return _read(out / ARTIFACT_DIR / artifact.META, ArtifactMeta.from_dict)


def write_results(out: pathlib.Path, results: Results) -> None:
  artifact.write_json(out / RESULTS_FILE, results.to_dict())


def write_meta(out: pathlib.Path, meta: ArtifactMeta) -> None:
  artifact.write_json(out / ARTIFACT_DIR / artifact.META, meta.to_dict())


class RunDir(NamedTuple):
  """--out_dir as a run finds it (`check_run_dir`).

  path: the directory.
  resuming: it holds a run of the same configuration, to be resumed.
  finished: that run's results are complete: nothing to redo (the
    runner reads them back).
  """
  path: pathlib.Path
  resuming: bool
  finished: bool


def check_run_dir(record: ConfigRecord, *, overwrite: bool) -> RunDir:
  """Checks --out_dir without writing anything: the one resume check.

  A directory holding a run of the same configuration is resumed (and
  finished when its results are complete and no checkpoint is left); one
  holding anything else is refused (`cli.UsageError`) unless `overwrite`.
  """
  out = cli.check_out_dir(record.run.out_dir, flag="--out_dir")
  if not (out.is_dir() and any(out.iterdir())) or overwrite:
    return RunDir(out, False, False)
  cfg = out / CONFIG_FILE
  try:
    prev = json.loads(cfg.read_text()) if cfg.is_file() else None
  except (OSError, ValueError):
    prev = None
  now = record.to_dict()
  if isinstance(prev, dict):
    # A field added after the run was written reads as its default, the
    # behaviour the run had (e.g. `core_rule`'s 'dual').
    try:
      prev = ConfigRecord.from_dict(prev).to_dict()
    except RunRecordError:
      pass
  if prev == now:
    return RunDir(out, True, (out / RESULTS_FILE).exists()
                  and not (out / CHECKPOINT_DIR).exists())
  if not isinstance(prev, dict):
    raise cli.UsageError(f"--out_dir {out} is not empty and holds no run; "
                         "choose a new directory or pass --overwrite")
  diff = sorted(k for k in set(prev) | set(now) if prev.get(k) != now.get(k))
  raise cli.UsageError(f"--out_dir {out} holds a run with another "
                       f"configuration (differs in: {', '.join(diff)}); "
                       "pass --overwrite or choose a new directory")


def run_outputs(out: pathlib.Path) -> list[pathlib.Path]:
  """Every output of a run in `out` (what --overwrite deletes)."""
  found = [out / name for name in RUN_OUTPUTS if (out / name).exists()]
  return found + sorted(p for p in out.glob(f"{EXPORT_PREFIX}*")
                        if p.is_dir())


def start_run_dir(record: ConfigRecord, *, overwrite: bool,
                  resuming: bool) -> pathlib.Path:
  """Makes --out_dir the run's: deletes the previous run's outputs when
  `overwrite`, creates it and writes its `config.json` (kept when
  resuming). Call it once the inputs are validated, so that a run refused
  by validation leaves nothing behind."""
  out = pathlib.Path(record.run.out_dir)
  if overwrite:
    for p in run_outputs(out):
      if p.is_dir():
        shutil.rmtree(p)
      else:
        p.unlink()
  out.mkdir(parents=True, exist_ok=True)
  if not resuming:
    artifact.write_json(out / CONFIG_FILE, record.to_dict())
  return out


def prepare_run_dir(record: ConfigRecord, *, overwrite: bool) -> RunDir:
  """`check_run_dir`, then `start_run_dir`."""
  run_dir = check_run_dir(record, overwrite=overwrite)
  start_run_dir(record, overwrite=overwrite, resuming=run_dir.resuming)
  return run_dir
