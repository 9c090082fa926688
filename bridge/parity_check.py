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
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import numpy as np

from bridge import hf_import, model_files, pruned, rename, torch_export
from mosp_jax import cli
from mosp_jax.pipeline import preferences, run_record, walk

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

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d["ok"] = self.ok
    return d


# Perplexity on both sides: summed next-token NLL over (N, T) segments.


def jax_perplexity(adapter: Any, params: Any, segments: np.ndarray, *,
                   batch_size: int) -> float:
  """exp(mean next-token NLL) of `(N, T)` segments, layer by layer as the
  run evaluates (`walk.perplexity`: embed, every decoder block, head), in
  float32."""
  with jax.transfer_guard("disallow"):
    return walk.perplexity(adapter, jax.device_put(params),
                           np.asarray(segments, np.int32),
                           batch_size=batch_size)


def torch_perplexity(model: Any, segments: np.ndarray, *,
                     batch_size: int) -> float:
  """exp(mean next-token NLL) of `(N, T)` segments with a PyTorch causal LM
  (positions 0..T-1, no padding); log-softmax in float32."""
  import torch
  total, count = 0.0, 0
  with torch.no_grad():
    for lo in range(0, segments.shape[0], batch_size):
      ids = torch.from_numpy(np.asarray(segments[lo:lo + batch_size],
                                        np.int64))
      logits = model(input_ids=ids).logits[:, :-1].float()
      logp = torch.log_softmax(logits, dim=-1)
      nll = -torch.gather(logp, -1, ids[:, 1:, None])
      total += float(nll.double().sum())
      count += ids.shape[0] * (ids.shape[1] - 1)
  return float(np.exp(total / count))


def _rel(a: float, b: float) -> float:
  return abs(a - b) / abs(b) if b else float("inf")


# Reading the checkpoint.


def _read_state(folder: pathlib.Path) -> tuple[dict[str, np.ndarray], str]:
  """Float32 tensors of every safetensors file, and their common dtype."""
  import torch
  from safetensors.torch import load_file

  state, dtypes = {}, set()
  files = sorted(folder.glob("*.safetensors"))
  for f in files:
    for k, v in load_file(str(f)).items():
      if k in state:
        raise rename.CheckpointMismatchError(
            f"{folder}: tensor {k} is stored twice")
      dtypes.add(str(v.dtype).removeprefix("torch."))
      state[k] = v.to(torch.float32).numpy()
  if len(dtypes) != 1:
    raise rename.CheckpointMismatchError(
        f"{folder}: expected one dtype for all tensors, found "
        f"{sorted(dtypes) or 'no tensors'}")
  return state, dtypes.pop()


def _provenance(folder: pathlib.Path) -> dict:
  path = folder / torch_export.EXPORT_META
  return json.loads(path.read_text()) if path.exists() else {}


def check_checkpoint_files(folder: pathlib.Path) -> None:
  """Checks that an export folder holds what `bridge.export` writes
  (config.json with a model_type, safetensors weights, tokenizer files)
  before anything is loaded; raises ValueError naming what is missing."""
  what = ("an export holds config.json, model.safetensors and the "
          "tokenizer files (python -m bridge.export writes them)")
  cfg = folder / "config.json"
  if not cfg.is_file():
    raise ValueError(f"{folder}: config.json is missing; {what}")
  try:
    model_type = json.loads(cfg.read_text()).get("model_type")
  except (OSError, ValueError, AttributeError) as e:
    raise ValueError(f"{cfg}: not a readable JSON object ({e})") from e
  if not model_type:
    raise ValueError(f"{cfg}: no 'model_type'; {what}")
  if not any(folder.glob("*.safetensors")):
    raise ValueError(f"{folder}: no *.safetensors weights; {what}")
  if not any((folder / n).is_file() for n in hf_import.TOKENIZER_FILES):
    raise ValueError(f"{folder}: no tokenizer files (any of "
                     f"{', '.join(hf_import.TOKENIZER_FILES)}); {what}")


def check_provenance(prov: dict, run: pruned.RunInfo,
                     folder: pathlib.Path) -> None:
  """Refuses a run that cannot be the one the export came from (its
  mosp_export.json names other tasks, model or sparsity pattern)."""
  if not prov:
    return
  theirs = {"tasks": list(prov.get("tasks", [])), "model": prov.get("model"),
            "pattern": prov.get("pattern")}
  ours = {"tasks": list(run.tasks), "model": run.model,
          "pattern": run_record.pattern_to_dict(run.pattern)}
  differ = [k for k in theirs if theirs[k] != ours[k]]
  if differ:
    raise ValueError(
        f"--run_dir {run.run_dir}: not the run {folder} was exported from "
        f"(its {torch_export.EXPORT_META} names run {prov.get('run_dir')}); "
        + "; ".join(f"{k}: export {theirs[k]}, run {ours[k]}"
                    for k in differ))


def check_parity(
    checkpoint: str | pathlib.Path,
    run_dir: str | pathlib.Path | None = None,
    preference: str | None = None,
    *,
    rtol: float = DEFAULT_RTOL,
    weight_atol: float = 0.0,
    batch_size: int | None = None,
    model: pruned.PrunedModel | None = None,
    log=lambda s: None,
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
      (`export_and_check`); default: materialised here.
    log: progress sink.

  Returns:
    the report; `report.ok` is False when any check failed.

  Raises:
    bridge.model_files.ModelLoadError, bridge.pruned.RunDirError, ValueError:
      the inputs cannot be read at all.
  """
  folder = pathlib.Path(checkpoint)
  run, pref = _run_and_preference(folder, run_dir, preference)
  batch_size = batch_size or run.config.run.batch_size
  model = _model_for(run, pref, model, log=log)
  state, dtype = _read_state(folder)
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


def _run_and_preference(folder: pathlib.Path,
                        run_dir: str | pathlib.Path | None,
                        preference: str | None
                        ) -> tuple[pruned.RunInfo, np.ndarray]:
  """The run and the `(m,)` float32 preference an export is checked
  against: the arguments, else what its `mosp_export.json` names. Refuses
  a folder that is not a safetensors export of that run."""
  source = model_files.resolve(str(folder))  # Refuses pickled weights.
  if source.kind != "torch":
    raise model_files.ModelLoadError(
        f"{folder}: not a PyTorch safetensors checkpoint ({source.kind})")
  check_checkpoint_files(folder)
  prov = _provenance(folder)
  run_dir = run_dir or prov.get("run_dir")
  if run_dir is None:
    raise cli.UsageError(f"--run_dir: required ({folder} has no "
                         f"{torch_export.EXPORT_META})")
  run = pruned.read_run(run_dir)
  check_provenance(prov, run, folder)
  if preference is None:
    if "preference" not in prov:
      raise cli.UsageError("--preference: required (the checkpoint has no "
                           f"{torch_export.EXPORT_META})")
    return run, np.asarray(prov["preference"], np.float32)
  with cli.usage_errors("--preference"):
    return run, pruned.parse_preference(preference, run.tasks)


def _model_for(run: pruned.RunInfo, pref: np.ndarray,
               model: pruned.PrunedModel | None, *, log
               ) -> pruned.PrunedModel:
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
                    folder: pathlib.Path, *, log
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
    rtol: float, batch_size: int, log) -> tuple[list[TaskPpl], list[str]]:
  """Per task, perplexity of the export loaded by stock PyTorch against
  the JAX walk on `jax_params` (the rounded weights), and the JAX one
  against what the run recorded (float32 exports of a run preference);
  returns the rows and the problems."""
  tmodel, problems = _load_torch(folder)
  run_ppl = None
  if (model.run_index is not None and run.results is not None
      and dtype == "float32"):
    run_ppl = run.results.models[model.run_index].ppl
  ppl = []
  for task, seg in segments.items():
    p_torch = torch_perplexity(tmodel, seg, batch_size=batch_size)
    p_jax = jax_perplexity(model.adapter, jax_params, seg,
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


def _load_torch(folder: pathlib.Path) -> tuple[Any, list[str]]:
  """The export loaded by `AutoModelForCausalLM` in float32 (eval mode),
  and a problem per kind of tensor the load missed or could not use."""
  import torch
  from transformers import AutoModelForCausalLM

  # (model, info) with output_loading_info; transformers' stub says model.
  loaded: Any = AutoModelForCausalLM.from_pretrained(
      str(folder), **hf_import.torch_dtype_kwargs(torch.float32),
      use_safetensors=True,
      output_loading_info=True)
  tmodel, info = loaded
  tmodel.eval()
  return tmodel, [f"torch load: {key} {sorted(info[key])[:5]}"
                  for key in ("missing_keys", "unexpected_keys",
                              "mismatched_keys") if info.get(key)]


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


def export_and_check(run_dir: str | pathlib.Path, preference: str, *,
                     dtype: str = "float32", rtol: float = DEFAULT_RTOL,
                     log=lambda s: None) -> dict:
  """Exports `preference` into `<run_dir>/export_<tag>/` (replacing an
  older one) and checks its parity; returns a JSON summary with `ok`."""
  out = (pathlib.Path(run_dir)
         / f"export_{pruned.preference_tag(preference)}")
  run = pruned.read_run(run_dir)
  model = pruned.preference_model(
      run, pruned.parse_preference(preference, run.tasks), log=log)
  torch_export.export_model(run, model, out, dtype=dtype, overwrite=True,
                        log=log)
  report = check_parity(out, run_dir, preference, rtol=rtol, model=model,
                        log=log)
  log(format_report(report))
  return {"checkpoint": str(out), "dtype": dtype,
          "preference": report.preference, "ok": report.ok,
          "ppl": [dataclasses.asdict(r) for r in report.ppl],
          "max_rel_diff": max((r.rel_diff for r in report.ppl), default=0.0),
          "sparsity": [min(c.sparsity for c in report.linears),
                       max(c.sparsity for c in report.linears)]
          if report.linears else None,
          "problems": report.problems}
