"""An exported folder and the run it came from: its files, tensors and
provenance record (`torch_export.EXPORT_META`), checked before any
parity check (`bridge.parity_check`)."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np

from bridge import model_files, pruned, rename, tokenizers, torch_export
from mosp_jax import cli
from mosp_jax.pipeline import run_record


def read_state(folder: pathlib.Path) -> tuple[dict[str, np.ndarray], str]:
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


def provenance(folder: pathlib.Path) -> dict[str, Any]:
  """The export's provenance record ({} when it has none)."""
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
  if not any((folder / n).is_file() for n in tokenizers.TOKENIZER_FILES):
    raise ValueError(f"{folder}: no tokenizer files (any of "
                     f"{', '.join(tokenizers.TOKENIZER_FILES)}); {what}")


def check_provenance(prov: dict[str, Any], run: pruned.RunInfo,
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


def run_and_preference(folder: pathlib.Path,
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
  prov = provenance(folder)
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

