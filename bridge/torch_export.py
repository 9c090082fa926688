"""One preference of a MOSP run as a Hugging Face PyTorch checkpoint.

The library behind `python -m bridge.export`. `export_preference` writes
into `out` (a new folder, written under a temporary name and renamed
into place): `model.safetensors` (PyTorch names and layouts, metadata
format 'pt'), `config.json` (with `architectures` and the dtype, so stock
`transformers.AutoModelForCausalLM.from_pretrained(out)` loads it with no
custom code), the tokenizer files, and `mosp_export.json` (provenance: run,
preference, dense fingerprint, and per linear its budget, mask and zeros).

The model is `bridge.pruned.preference_model` of the preference, i.e. exactly
the model the run evaluated. Names and layouts come from the one rename
table (`bridge.rename.flax_to_pt`), diffed against the PyTorch model's own
state dict before anything is written. Pruned weights are exact zeros in
every dtype (0 casts to 0). `bridge.parity_check` (`python -m bridge.parity`)
checks an export.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

from bridge import pruned as pruned_lib
from bridge import rename
from mosp_jax import cli
from mosp_jax.pipeline import preferences, run_record

WEIGHTS = "model.safetensors"
EXPORT_META = "mosp_export.json"
DTYPES = ("float32", "float16", "bfloat16")
# model_type -> the stock PyTorch class `from_pretrained` should build.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "opt": "OPTForCausalLM",
                 "gpt2": "GPT2LMHeadModel",
                 "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM",
                 "mistral": "MistralForCausalLM",
                 "gemma3_text": "Gemma3ForCausalLM"}


class ExportError(ValueError):
  """An export could not be written; names the flag or file."""


@dataclasses.dataclass(frozen=True)
class ExportInfo:
  """What `export_preference` wrote.

  Attributes:
    out: the checkpoint folder.
    preference: `(m,)` the exported preference.
    dtype: 'float32', 'float16' or 'bfloat16'.
    provenance: the contents of `mosp_export.json`.
  """

  out: pathlib.Path
  preference: np.ndarray
  dtype: str
  provenance: dict


def _torch_dtype(dtype: str) -> Any:
  import torch
  if dtype not in DTYPES:
    raise ExportError(f"--dtype: expected one of {', '.join(DTYPES)}, got "
                      f"{dtype!r}")
  return getattr(torch, dtype)


def cast_weights(arr: np.ndarray, dtype: str) -> Any:
  """float32 numpy -> contiguous torch tensor of `dtype` (round to nearest
  even, as every export rounds)."""
  import torch
  host = np.array(arr, np.float32, order="C", copy=True)  # Writable, packed.
  return torch.from_numpy(host).to(_torch_dtype(dtype)).contiguous()


def round_like_export(arr: np.ndarray, dtype: str) -> np.ndarray:
  """float32 values of `arr` after the export's cast to `dtype`."""
  import torch
  return cast_weights(arr, dtype).to(torch.float32).numpy()


def torch_config(config: Any, dtype: str) -> Any:
  """A copy of a HF config that stock PyTorch transformers loads as is."""
  if config.model_type not in ARCHITECTURES:
    raise ExportError(f"cannot export model_type {config.model_type!r}; "
                      f"supported: {', '.join(ARCHITECTURES)}")
  out = copy.deepcopy(config)
  out.architectures = [ARCHITECTURES[config.model_type]]
  out.dtype = _torch_dtype(dtype)
  return out


def expected_torch_state(config: Any) -> dict[str, Any]:
  """The PyTorch model's state dict for `config`, on the meta device
  (names and shapes, no memory)."""
  import torch
  from transformers import AutoModelForCausalLM

  from bridge.torch_convert import torch_dtype_kwargs
  with torch.device("meta"):
    model = AutoModelForCausalLM.from_config(
        config, **torch_dtype_kwargs(torch.float32))
  return dict(model.state_dict())


def to_torch_state(config: Any, params: Any, *, what: str
                   ) -> dict[str, np.ndarray]:
  """Flax params -> PyTorch state dict (numpy), checked by a tree diff."""
  return rename.flax_to_pt(
      rename.flatten(params), expected_torch_state(config),
      model_type=config.model_type,
      tie_word_embeddings=config.tie_word_embeddings, what=what)


def file_sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _chmod_like_umask(folder: pathlib.Path) -> None:
  """Gives a temporary folder and its files the usual permissions (mkdtemp
  makes them private), so that an export can be shared."""
  umask = os.umask(0)
  os.umask(umask)
  folder.chmod(0o777 & ~umask)
  for f in folder.iterdir():
    f.chmod(0o666 & ~umask)


def write_checkpoint(out: str | os.PathLike, config: Any,
                     state: dict[str, np.ndarray], tokenizer: Any, *,
                     dtype: str, provenance: dict,
                     overwrite: bool = False) -> pathlib.Path:
  """Writes a PyTorch checkpoint folder atomically.

  Everything goes to a temporary sibling folder, which is renamed to `out`
  once complete; an existing `out` is refused unless `overwrite`.

  Args:
    out: the checkpoint folder.
    config: the HF config (`torch_config` is applied here).
    state: PyTorch names -> float32 arrays.
    tokenizer: saved alongside, or None.
    dtype: the stored dtype.
    provenance: written as `mosp_export.json` (plus the weights' sha256).
  """
  from safetensors.torch import save_file

  out = pathlib.Path(out)
  _check_out(out, overwrite)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-",
                                      dir=out.parent))
  try:
    torch_config(config, dtype).save_pretrained(str(tmp))
    cfg_path = tmp / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["torch_dtype"] = dtype  # The key transformers < 4.56 reads.
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tensors = {k: cast_weights(v, dtype) for k, v in sorted(state.items())}
    save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
    del tensors
    if tokenizer is not None:
      tokenizer.save_pretrained(str(tmp))
    provenance = dict(provenance, weights_sha256=file_sha256(tmp / WEIGHTS))
    (tmp / EXPORT_META).write_text(json.dumps(provenance, indent=1) + "\n")
    _chmod_like_umask(tmp)
    old = None
    if out.exists():
      old = out.with_name(f".{out.name}.old-{os.getpid()}")
      os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out


def linear_stats(model: pruned_lib.PrunedModel, dtype: str
                 ) -> dict[str, dict]:
  """Per linear ('layer.name'): shape, budget, mask size, and the zeros of
  the exported (rounded) kernel; `kept_zeros` counts mask entries that are
  zero all the same (a kept weight exactly 0, or below float16's range)."""
  stats = {}
  for (layer, name), mask in model.masks.items():
    w = round_like_export(
        np.asarray(model.adapter.get_kernel(model.params, layer, name)),
        dtype)
    zeros = int(np.sum(w == 0))
    stats[f"{layer}.{name}"] = {
        "shape": list(mask.shape), "budget": model.budgets[(layer, name)],
        "kept": int(mask.sum()), "zeros": zeros,
        "kept_zeros": int(np.sum(mask & (w == 0))),
        "mask_sparsity": 1.0 - float(mask.mean()),
        "sparsity": zeros / mask.size}
  return stats


def export_preference(run_dir: str | os.PathLike, preference: str,
                      out: str | os.PathLike, *, dtype: str = "float32",
                      overwrite: bool = False,
                      log: Callable[[str], None] = lambda s: None
                      ) -> ExportInfo:
  """Materialises one preference of a run and writes it to `out`.

  Args:
    run_dir: a finished `experiments.run` directory.
    preference: 'centroid' or comma-separated weights, one per task.
    out: the checkpoint folder to create.
    dtype: stored dtype of every tensor.
    overwrite: replace an existing `out`.
    log: progress sink.

  Raises:
    ExportError, bridge.pruned.RunDirError, ValueError (naming the flag),
    bridge.rename.CheckpointMismatchError (names differ from PyTorch's).
  """
  _torch_dtype(dtype)
  _check_out(pathlib.Path(out), overwrite)
  run = pruned_lib.read_run(pathlib.Path(run_dir))
  with cli.usage_errors("--preference"):
    pref = pruned_lib.parse_preference(preference, run.tasks)
  model = pruned_lib.preference_model(run, pref, log=log)
  return export_model(run, model, out, dtype=dtype, overwrite=overwrite,
                      log=log)


def _check_out(out: pathlib.Path, overwrite: bool) -> None:
  """Refuses (`cli.UsageError`) an --out that is a file, cannot be
  created, or holds something and `overwrite` is off."""
  cli.check_out_dir(out, flag="--out")
  if out.is_dir() and any(out.iterdir()) and not overwrite:
    raise cli.UsageError(f"--out {out} exists and is not empty; pass "
                         "--overwrite or choose a new folder")


def export_model(run: pruned_lib.RunInfo, model: pruned_lib.PrunedModel,
                 out: str | os.PathLike, *, dtype: str = "float32",
                 overwrite: bool = False,
                 log: Callable[[str], None] = lambda s: None) -> ExportInfo:
  """Writes a materialised model of `run` to `out` (see
  `export_preference`)."""
  _torch_dtype(dtype)
  out = pathlib.Path(out)
  _check_out(out, overwrite)
  pref = model.preference
  config = model.adapter.config
  state = to_torch_state(config, model.params, what=str(out))
  stats = linear_stats(model, dtype)
  for key, s in stats.items():
    if s["kept"] != s["budget"]:
      raise ExportError(f"{key}: the mask keeps {s['kept']} weights, the "
                        f"pattern {run.pattern} allows {s['budget']}")
    if s["kept_zeros"]:
      log(f"warning: {key}: {s['kept_zeros']} kept weights are 0 in "
          f"{dtype}; its sparsity exceeds the mask's")
  run_ppl = None
  if model.run_index is not None and run.results is not None:
    run_ppl = run.results.models[model.run_index].ppl
  provenance = {
      "format": 1, "run_dir": str(run.run_dir.resolve()),
      "model": run.model, "tasks": list(run.tasks),
      "pattern": run_record.pattern_to_dict(run.pattern),
      "preference": pref.tolist(),
      "run_index": model.run_index, "run_ppl": run_ppl, "dtype": dtype,
      "dense_sha256": model.dense_sha256,
      "sparsity": float(sum(s["zeros"] for s in stats.values())
                        / sum(np.prod(s["shape"]) for s in stats.values())),
      "linears": stats}
  write_checkpoint(out, config, state, model.tokenizer, dtype=dtype,
                   provenance=provenance, overwrite=overwrite)
  log(f"wrote {out} ({dtype}, preference {preferences.format_pref(pref)}, "
      f"sparsity {provenance['sparsity']:.4f})")
  return ExportInfo(out=out, preference=pref, dtype=dtype,
                    provenance=provenance)
