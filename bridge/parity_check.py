"""Parity of an exported PyTorch checkpoint with the model the run pruned.

The library behind `python -m bridge.parity`. `check_parity` rebuilds the
preference's model on the JAX side (`bridge.pruned.preference_model`, the
run's own computation) and checks the export against it:

  names     the checkpoint's tensors, read back through the import rename
            table, are exactly the Flax model's (no missing, extra or
            reshaped tensor; a tied head is not stored);
  weights   every tensor equals the JAX weights rounded to the export
            dtype (`weight_atol`, default 0: bitwise);
  masks     per linear, the exported nonzeros are the JAX mask (less the
            kept weights that are exactly 0), the mask keeps the pattern's
            budget, and the sparsity of the exported kernel is reported
            beside the mask's;
  tokenizer the checkpoint's tokenizer cuts the run's test text into the
            same token segments as the run's tokenizer;
  ppl       perplexity on the run's test segments with stock PyTorch
            (`AutoModelForCausalLM.from_pretrained`, computed in float32)
            and with JAX (the layer walk of the run, on the same rounded
            weights), relative difference <= `rtol` per task;
  run       the JAX perplexity equals what the run recorded for this
            preference (float32 exports of a preference the run evaluated),
            the segments are the run's (fingerprints in results.json) and
            the dense model is the run's (fingerprint in meta.json).

Both perplexities are computed in float32 from the same rounded weights,
so `rtol` (default 1e-3) means the same for float16 / bfloat16 exports.
The export folder is read by `bridge.export_files`, the perplexities
computed by `bridge.perplexity`; `bridge.export_check` exports a run's
preference and checks it (`--export_pref`).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np

from bridge import export_files, perplexity, pruned, rename, torch_export
from mosp_jax.pipeline import preferences, run_record

DEFAULT_RTOL = 1e-3


@dataclasses.dataclass(frozen=True)
class TaskPpl:
  """Perplexities of one task (run: what the run recorded, or None)."""

  task: str
  torch: float
  jax: float
  rel_diff: float
  run: float | None
  run_rel_diff: float | None


@dataclasses.dataclass(frozen=True)
class LinearCheck:
  """One pruned linear: `name` is 'layer.linear'.

  Attributes:
    shape: `(n_in, n_out)`.
    budget: weights the pattern keeps; kept: the mask's count.
    mask_sparsity: 1 - kept / size.
    sparsity: fraction of exact zeros in the exported kernel.
    off_mask: exported nonzeros outside the mask.
    mask_equal: exported nonzeros == mask & (JAX weight != 0).
  """

  name: str
  shape: tuple[int, int]
  budget: int
  kept: int
  mask_sparsity: float
  sparsity: float
  off_mask: int
  mask_equal: bool


@dataclasses.dataclass(frozen=True)
class ParityReport:
  """Everything `check_parity` measured; `ok` when `problems` is empty."""

  checkpoint: str
  run_dir: str
  preference: list[float]
  dtype: str
  ppl: list[TaskPpl]
  linears: list[LinearCheck]
  tensors_checked: int
  tensors_differing: dict[str, float]
  problems: list[str]

  @property
  def ok(self) -> bool:
    return not self.problems

  def to_json(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["ok"] = self.ok
    return d



def _rel(a: float, b: float) -> float:
  return abs(a - b) / abs(b) if b else float("inf")



def check_parity(
    checkpoint: str | pathlib.Path,
    run_dir: str | pathlib.Path | None = None,
    preference: str | None = None,
    *,
    rtol: float = DEFAULT_RTOL,
    weight_atol: float = 0.0,
    batch_size: int | None = None,
    model: pruned.PrunedModel | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> ParityReport:
  """Checks an export against the run's model (see the module docstring).

  Args:
    checkpoint: the exported folder (safetensors; pickled weights are
      refused).
    run_dir: the run; default: the one `mosp_export.json` names.
    preference: 'centroid' or weights; default: the exported one.
    rtol: largest relative perplexity difference allowed.
    weight_atol: largest absolute weight difference allowed (0: bitwise;
      raise it to check an export made on another device).
    batch_size: segments per forward pass; default: the run's.
    model: the preference's model when the caller has just materialised it
      (`export_check.export_and_check`); default: materialised here.
    log: progress sink.

  Returns:
    the report; `report.ok` is False when any check failed.

  Raises:
    bridge.model_files.ModelLoadError, bridge.pruned.RunDirError, ValueError:
      the inputs cannot be read at all.
  """
  folder = pathlib.Path(checkpoint)
  run, pref = export_files.run_and_preference(folder, run_dir, preference)
  batch_size = batch_size or run.config.run.batch_size
  model = _model_for(run, pref, model, log=log)
  state, dtype = export_files.read_state(folder)
  problems: list[str] = []
  if dtype not in torch_export.DTYPES:
    problems.append(f"weights: stored as {dtype}, expected one of "
                    f"{torch_export.DTYPES}")
    dtype = "float32"
  # The JAX side in the export's precision: what every check compares to.
  jax_flat = {k: torch_export.round_like_export(v, dtype)
              for k, v in rename.flatten(model.params).items()}
  jax_state, differing, linears, found = _check_tensors(
      folder, state, jax_flat, model, weight_atol=weight_atol)
  problems += found
  segments, found = _check_segments(run, model, folder, log=log)
  problems += found
  ppl, found = _check_perplexities(
      folder, run, model, rename.unflatten(jax_flat), segments, dtype=dtype,
      rtol=rtol, batch_size=batch_size, log=log)
  problems += found
  return ParityReport(
      checkpoint=str(folder), run_dir=str(run.run_dir),
      preference=pref.tolist(), dtype=dtype, ppl=ppl, linears=linears,
      tensors_checked=len(jax_state), tensors_differing=differing,
      problems=problems)


def _model_for(run: pruned.RunInfo, pref: np.ndarray,
               model: pruned.PrunedModel | None, *,
               log: Callable[[str], None]) -> pruned.PrunedModel:
  """`model` when it is the preference's, else the preference's model
  materialised from the run; raises ValueError for another preference's."""
  if model is None:
    return pruned.preference_model(run, pref, log=log)
  if not np.array_equal(model.preference, pref):
    raise ValueError(f"--preference {pref.tolist()}: the model given is "
                     f"that of {model.preference.tolist()}")
  return model


def _check_tensors(
    folder: pathlib.Path, state: dict[str, np.ndarray],
    jax_flat: rename.Flat, model: pruned.PrunedModel, *, weight_atol: float
) -> tuple[dict[str, np.ndarray], dict[str, float], list[LinearCheck],
           list[str]]:
  """Names, weights and masks of the export against the JAX model.

  Args:
    folder: the export (named in errors).
    state: the export's float32 tensors by PyTorch name.
    jax_flat: the JAX weights rounded to the export dtype, by Flax path.
    model: the preference's model (adapter, masks, budgets).
    weight_atol: largest absolute weight difference allowed.

  Returns:
    `(jax_state, differing, linears, problems)`: the JAX weights by
    PyTorch name, max |diff| of each differing tensor, one `LinearCheck`
    per pruned linear (none when the names differ) and the problems.
  """
  config = model.adapter.config
  jax_state = torch_export.to_torch_state(config, rename.unflatten(jax_flat),
                                          what="the JAX model")
  try:
    rename.tree_diff({(k,): v for k, v in state.items()},
                     {(k,): v for k, v in jax_state.items()},
                     what=str(folder))
    got_flat = rename.pt_to_flax(
        state, jax_flat, model_type=config.model_type,
        tie_word_embeddings=config.tie_word_embeddings, what=str(folder))
  except rename.CheckpointMismatchError as e:
    return jax_state, {}, [], [f"names: {e}"]
  differing: dict[str, float] = {}
  for key, want in jax_state.items():
    diff = np.abs(state[key] - want)
    if diff.size and not diff.max() <= weight_atol:  # NaN fails too.
      differing[key] = float(np.nan_to_num(diff.max(), nan=np.inf))
  problems = [f"weights: {name} differs from the JAX model "
              f"(max |diff| {d:.3g})"
              for name, d in sorted(differing.items())[:10]]
  if len(differing) > 10:
    problems.append(f"weights: ... {len(differing) - 10} more tensors")
  linears, found = _check_masks(model, rename.unflatten(got_flat),
                                rename.unflatten(jax_flat))
  return jax_state, differing, linears, problems + found


def _check_masks(model: pruned.PrunedModel, got_params: dict,
                 jax_params: dict) -> tuple[list[LinearCheck], list[str]]:
  """Per pruned linear, the exported kernel's nonzeros against the JAX
  mask and the mask's count against the pattern's budget; returns the
  checks and the problems."""
  linears, problems = [], []
  for (layer, name), mask in model.masks.items():
    w = np.asarray(model.adapter.get_kernel(got_params, layer, name))
    w_jax = np.asarray(model.adapter.get_kernel(jax_params, layer, name))
    nz = w != 0
    check = LinearCheck(
        name=f"{layer}.{name}", shape=tuple(mask.shape),
        budget=model.budgets[(layer, name)], kept=int(mask.sum()),
        mask_sparsity=1.0 - float(mask.mean()),
        sparsity=1.0 - float(nz.mean()), off_mask=int(np.sum(nz & ~mask)),
        mask_equal=bool(np.array_equal(nz, mask & (w_jax != 0))))
    linears.append(check)
    if not check.mask_equal:
      problems.append(
          f"masks: {check.name}: exported nonzeros differ from the mask "
          f"({check.off_mask} nonzero outside it; sparsity "
          f"{check.sparsity:.6f}, mask {check.mask_sparsity:.6f})")
    if check.kept != check.budget:
      problems.append(f"masks: {check.name}: the mask keeps "
                      f"{check.kept}, the pattern allows {check.budget}")
  return linears, problems


def _check_segments(run: pruned.RunInfo, model: pruned.PrunedModel,
                    folder: pathlib.Path, *, log: Callable[[str], None]
                    ) -> tuple[dict[str, np.ndarray], list[str]]:
  """The run's test segments rebuilt with the run's tokenizer, checked
  against the fingerprints in results.json and against the segments the
  export's tokenizer cuts; returns `({task: (N, T) ids}, problems)`."""
  from transformers import AutoTokenizer

  problems = []
  segments = pruned.run_test_segments(run, model.tokenizer)
  recorded = (run.results.test.sha256 if run.results and run.results.test
              else None)
  if recorded is None:
    log("results.json records no test fingerprints; the segments are "
        "rebuilt from config.json unchecked")
  else:
    for task, seg in segments.items():
      if recorded.get(task) != run_record.segments_sha256(seg):
        problems.append(f"run: the test segments of {task} rebuilt now "
                        "are not the ones the run evaluated")
  exported_tok = AutoTokenizer.from_pretrained(str(folder))
  for task, seg in pruned.run_test_segments(run, exported_tok).items():
    if not np.array_equal(seg, segments[task]):
      problems.append(f"tokenizer: the checkpoint's tokenizer cuts {task} "
                      "into other segments than the run's")
  return segments, problems


def _check_perplexities(
    folder: pathlib.Path, run: pruned.RunInfo, model: pruned.PrunedModel,
    jax_params: dict, segments: dict[str, np.ndarray], *, dtype: str,
    rtol: float, batch_size: int, log: Callable[[str], None]
) -> tuple[list[TaskPpl], list[str]]:
  """Per task, perplexity of the export loaded by stock PyTorch against
  the JAX walk on `jax_params` (the rounded weights), and the JAX one
  against what the run recorded (float32 exports of a run preference);
  returns the rows and the problems."""
  tmodel, problems = perplexity.load_torch_export(folder)
  run_ppl = None
  if (model.run_index is not None and run.results is not None
      and dtype == "float32"):
    run_ppl = run.results.models[model.run_index].ppl
  ppl = []
  for task, seg in segments.items():
    p_torch = perplexity.torch_perplexity(tmodel, seg, batch_size=batch_size)
    p_jax = perplexity.jax_perplexity(model.adapter, jax_params, seg,
                           batch_size=batch_size)
    r = run_ppl[task] if run_ppl is not None else None
    row = TaskPpl(task=task, torch=p_torch, jax=p_jax,
                  rel_diff=_rel(p_torch, p_jax), run=r,
                  run_rel_diff=_rel(p_jax, r) if r is not None else None)
    ppl.append(row)
    log(f"{task}: PPL torch {p_torch:.6g}, jax {p_jax:.6g}, rel diff "
        f"{row.rel_diff:.2e}")
    if not row.rel_diff <= rtol:
      problems.append(f"ppl: {task}: torch {p_torch:.6g} vs jax "
                      f"{p_jax:.6g}, relative difference "
                      f"{row.rel_diff:.3g} > {rtol:g}")
    if row.run_rel_diff is not None and not row.run_rel_diff <= rtol:
      problems.append(f"run: {task}: JAX PPL {p_jax:.6g} vs {r:.6g} "
                      f"recorded by the run, relative difference "
                      f"{row.run_rel_diff:.3g} > {rtol:g}")
  return ppl, problems



def format_report(report: ParityReport, *, verbose: bool = False) -> str:
  """The report as text: a perplexity table, sparsity, then problems."""
  lines = [f"parity of {report.checkpoint} ({report.dtype}) with "
           f"{report.run_dir}, preference "
           f"{preferences.format_pref(report.preference)}", "",
           f"{'task':<12} {'PPL torch':>12} {'PPL jax':>12} "
           f"{'rel diff':>9} {'PPL run':>12} {'jax/run':>9}"]
  for r in report.ppl:
    run = (f"{r.run:12.6g} {r.run_rel_diff:9.2e}" if r.run is not None
           else f"{'-':>12} {'-':>9}")
    lines.append(f"{r.task:<12} {r.torch:12.6g} {r.jax:12.6g} "
                 f"{r.rel_diff:9.2e} {run}")
  if report.linears:
    sp = [c.sparsity for c in report.linears]
    same = sum(c.mask_equal for c in report.linears)
    lines += ["", f"{len(report.linears)} pruned linears: sparsity "
              f"{min(sp):.6f}..{max(sp):.6f}; masks equal: {same}/"
              f"{len(report.linears)}; tensors equal: "
              f"{report.tensors_checked - len(report.tensors_differing)}/"
              f"{report.tensors_checked}"]
    if verbose:
      lines += [f"  {c.name:<28} {str(c.shape):<12} sparsity "
                f"{c.sparsity:.6f} mask {c.mask_sparsity:.6f} "
                f"{'ok' if c.mask_equal else 'DIFFERS'}"
                for c in report.linears]
  lines.append("")
  if report.ok:
    lines.append("PARITY OK")
  else:
    lines.append(f"PARITY FAILED ({len(report.problems)} problems):")
    lines += [f"  - {p}" for p in report.problems]
  return "\n".join(lines)

