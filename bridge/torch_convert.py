"""Whole-model conversion through PyTorch: a non-Flax source (GGUF, a Hub
id, a PyTorch folder that does not convert tensor by tensor) loaded by
`AutoModelForCausalLM`, then renamed into Flax parameters
(`bridge.rename`, a tree diff against the Flax model).

Pickled PyTorch weights are read only where `bridge.model_files.resolve`
allowed them (`trust_pickle`): unpickling runs arbitrary code.
"""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import Iterator
from typing import Any

import jax.numpy as jnp

from bridge import rename
from bridge.flax_checkpoint import check_supported, expected_params, flax_model
from bridge.model_files import ModelLoadError, Source, check_gguf
from bridge.tokenizers import read_tokenizer


def torch_dtype_kwargs(dtype: Any) -> dict[str, Any]:
  """The keyword that sets the weights' dtype in `from_pretrained` /
  `from_config`: `dtype` from transformers 4.56 on (`torch_dtype` is then
  deprecated and warns), `torch_dtype` before."""
  import transformers
  from packaging.version import Version

  new = Version(transformers.__version__) >= Version("4.56")
  return {"dtype" if new else "torch_dtype": dtype}


@contextlib.contextmanager
def _without_gguf_progress_bar() -> Iterator[None]:
  """Within it, transformers' GGUF loader draws no progress bar.

  It wraps the tensors in `tqdm.auto.tqdm` (272 bar updates on SmolLM2's
  first conversion), which no transformers setting turns off and tqdm's
  own switch reads only at import [ours: the command prints its own
  'loading the model' line]; the loader's name for it is swapped for a
  pass-through and put back on exit."""
  try:
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
  except ImportError:  # A transformers without GGUF support.
    yield
    return
  bar = getattr(gguf_utils, "tqdm", None)
  if bar is None:
    yield
    return
  gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
  try:
    yield
  finally:
    gguf_utils.tqdm = bar


def load_torch(source: Source) -> tuple[Any, Any, Any]:
  """(torch model, config, tokenizer or None) of a non-Flax source."""
  import torch
  from transformers import AutoConfig, AutoModelForCausalLM

  what = source.location
  kwargs: dict[str, Any] = {}
  arch = ""
  if source.kind == "gguf":
    path = pathlib.Path(source.location)
    arch = f" (GGUF architecture {check_gguf(path)!r})"
    where, kwargs = str(path.parent), {"gguf_file": path.name}
  else:
    where = source.location
  try:
    config = AutoConfig.from_pretrained(where, **kwargs)
  except (OSError, ValueError) as e:
    raise ModelLoadError(
        f"{what}: cannot read the model config{arch}: {e}") from e
  check_supported(config, what)
  if source.kind != "gguf":
    kwargs["use_safetensors"] = not source.pickle
  try:
    with _without_gguf_progress_bar():
      model = AutoModelForCausalLM.from_pretrained(
          where, config=config, **torch_dtype_kwargs(torch.float32),
          **kwargs)
  except (OSError, ValueError, RuntimeError) as e:
    raise ModelLoadError(f"{what}: cannot load the weights: {e}") from e
  return model, model.config, read_tokenizer(source, where, kwargs)



def torch_to_flax(
    torch_model: Any, *, dtype: Any = jnp.float32, what: str = "model"
) -> tuple[Any, dict]:
  """Converts a PyTorch HF causal LM to (Flax model, float32 numpy params).

  Args:
    torch_model: a `*ForCausalLM` PyTorch module of a supported family.
    dtype: computation dtype of the returned Flax model.
    what: the source, for error messages.
  """
  import torch

  config = torch_model.config
  model = flax_model(config, dtype, what)
  state = {k: v.detach().to(torch.float32).cpu().numpy()
           for k, v in torch_model.state_dict().items()}
  flat = rename.pt_to_flax(
      state, expected_params(model), model_type=config.model_type,
      tie_word_embeddings=config.tie_word_embeddings, what=what)
  return model, rename.unflatten(flat)

