"""PyTorch <-> Flax parameter names: one rename table and one tree diff.

A PyTorch state-dict key `a.b.weight` becomes the Flax path `a/b/<leaf>`,
where `<leaf>` is the first of the rules below whose path exists in the
Flax model's expected tree (`model.params_shape_tree`). The single layout
rule: a PyTorch `weight` that becomes a Flax `kernel` is transposed. That
covers both `nn.Linear` (out, in) -> `nn.Dense` (in, out) and GPT-2's
`Conv1D` (in, out) -> `FlaxConv1D` (out, in).

`flax_to_pt` is the inverse, read from the same table: a Flax `a/b/<leaf>`
becomes the PyTorch key `a.b.<pt leaf>` of the rule for `<leaf>` whose key
exists in the PyTorch model's expected state dict; a tied head is left out
(PyTorch ties it again on load).

After renaming, the converted tree is diffed against the expected one
(missing / unexpected / shape) and any difference raises
`CheckpointMismatchError` with did-you-mean hints: HF's own loaders only warn
and fill missing weights with random values.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

Flat = dict[tuple[str, ...], np.ndarray]


class Shaped(Protocol):
  """A leaf with a shape: an array, a `jax.ShapeDtypeStruct`, a meta
  tensor."""

  @property
  def shape(self) -> Sequence[int]: ...


# (PyTorch leaf, Flax leaf, transpose), tried in order.
LEAF_RULES: tuple[tuple[str, str, bool], ...] = (
    ("weight", "kernel", True),  # nn.Linear, GPT-2 Conv1D.
    ("weight", "embedding", False),  # nn.Embedding.
    ("weight", "scale", False),  # nn.LayerNorm.
    ("weight", "weight", False),  # Llama RMSNorm.
    ("bias", "bias", False),
)

# Buffers that PyTorch checkpoints may carry but that are not parameters.
IGNORED_PT_KEYS: tuple[str, ...] = (
    r"\.rotary_emb\.inv_freq$",
    r"\.attn\.(masked_)?bias$",  # Old GPT-2 causal-mask buffers.
)

# model_type -> (PyTorch head key, Flax path of the embedding it is tied to).
TIED_HEADS: dict[str, tuple[str, tuple[str, ...]]] = {
    "llama": ("lm_head.weight", ("model", "embed_tokens", "embedding")),
    "opt": ("lm_head.weight", ("model", "decoder", "embed_tokens",
                               "embedding")),
    "gpt2": ("lm_head.weight", ("transformer", "wte", "embedding")),
    "qwen2": ("lm_head.weight", ("model", "embed_tokens", "embedding")),
    "qwen3": ("lm_head.weight", ("model", "embed_tokens", "embedding")),
    "mistral": ("lm_head.weight", ("model", "embed_tokens", "embedding")),
    "gemma3_text": ("lm_head.weight", ("model", "embed_tokens", "embedding")),
}


class CheckpointMismatchError(ValueError):
  """A checkpoint's tensors do not match the model's parameter tree."""


def flatten(tree: Mapping) -> Flat:
  """Nested dict -> {path tuple: leaf}."""
  out: Flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      for sub, leaf in flatten(value).items():
        out[(key,) + sub] = leaf
    else:
      out[(key,)] = value
  return out


def unflatten(flat: Mapping[tuple[str, ...], object]) -> dict:
  """{path tuple: leaf} -> nested dict."""
  out: dict = {}
  for path, leaf in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = leaf
  return out


def _hint(name: str, candidates: list[str]) -> str:
  close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
  return f" (did you mean {close[0]!r}?)" if close else ""


def tree_diff(
    got: Mapping[tuple[str, ...], Shaped],
    expected: Mapping[tuple[str, ...], Shaped],
    *,
    what: str,
) -> None:
  """Raises CheckpointMismatchError unless `got` matches `expected`.

  Args:
    got: flat converted tree (leaves with `.shape`).
    expected: flat expected tree (leaves with `.shape`, e.g. ShapeDtypeStruct).
    what: the checkpoint, for the message (e.g. its path).
  """
  # A missing name is most likely spelt like one of the unexpected ones.
  missing = ["/".join(k) for k in expected if k not in got]
  unexpected = ["/".join(k) for k in got if k not in expected]
  problems = [f"missing {n}{_hint(n, unexpected)}" for n in missing]
  problems += [f"unexpected {n}{_hint(n, missing)}" for n in unexpected]
  for k in expected:
    if k in got and tuple(got[k].shape) != tuple(expected[k].shape):
      problems.append(
          f"shape of {'/'.join(k)}: {tuple(got[k].shape)}, model expects "
          f"{tuple(expected[k].shape)}")
  if problems:
    shown = "\n  ".join(problems[:20])
    more = (f"\n  ... and {len(problems) - 20} more"
            if len(problems) > 20 else "")
    raise CheckpointMismatchError(
        f"{what}: {len(problems)} tensor(s) do not match the model:\n  "
        f"{shown}{more}")


def ignored(pt_key: str) -> bool:
  """Whether a PyTorch key is a buffer, not a parameter (`IGNORED_PT_KEYS`)."""
  return any(re.search(p, pt_key) for p in IGNORED_PT_KEYS)


def flax_path(pt_key: str, expected: Mapping[tuple[str, ...], Shaped]
              ) -> tuple[tuple[str, ...], bool] | None:
  """`(Flax path, transpose)` of a PyTorch key by the first rule of
  `LEAF_RULES` whose path is in `expected`; None when no rule applies."""
  *prefix, leaf = pt_key.split(".")
  for pt_leaf, flax_leaf, transpose in LEAF_RULES:
    path = tuple(prefix) + (flax_leaf,)
    if leaf == pt_leaf and path in expected:
      return path, transpose
  return None


def pt_to_flax(
    state_dict: Mapping[str, np.ndarray],
    expected: Mapping[tuple[str, ...], Shaped],
    *,
    model_type: str,
    tie_word_embeddings: bool,
    what: str,
) -> Flat:
  """Renames and transposes a PyTorch state dict into a flat Flax tree.

  Args:
    state_dict: PyTorch names -> arrays (numpy, any float dtype).
    expected: flat expected Flax tree (path -> leaf with `.shape`).
    model_type: the HF `model_type` (selects the tied-head entry).
    tie_word_embeddings: the config's flag; a tied model's PyTorch
      `lm_head.weight` is dropped after checking that it equals the
      embedding (the Flax model has no separate head then).
    what: the checkpoint, for error messages.

  Returns:
    {Flax path: float32 array}, checked with `tree_diff`.
  """
  flat: Flat = {}
  leftovers: dict[str, np.ndarray] = {}
  for pt_key, tensor in state_dict.items():
    if ignored(pt_key):
      continue
    rule = flax_path(pt_key, expected)
    if rule is None:
      leftovers[pt_key] = tensor
      continue
    path, transpose = rule
    arr = np.asarray(tensor, np.float32)
    flat[path] = arr.T if transpose else arr
  head_key, emb_path = TIED_HEADS.get(model_type, (None, None))
  if tie_word_embeddings and head_key in leftovers and emb_path in flat:
    check_tied_head(leftovers.pop(head_key), flat[emb_path],
                    head_key=head_key, what=what)
  for pt_key, tensor in leftovers.items():
    flat[tuple(pt_key.split("."))] = np.asarray(tensor)
  tree_diff(flat, expected, what=what)
  return flat


def check_tied_head(head: np.ndarray, embedding: np.ndarray, *,
                    head_key: str, what: str) -> None:
  """Raises CheckpointMismatchError unless a tied model's PyTorch head
  equals its embedding (both `(vocab, hidden)`)."""
  head = np.asarray(head, np.float32)
  if head.shape != embedding.shape or not np.array_equal(head, embedding):
    raise CheckpointMismatchError(
        f"{what}: the config ties {head_key} to the embeddings, but the "
        "checkpoint's head differs from them")


def drop_tied_flax_head(
    flat: Flat, *, model_type: str, tie_word_embeddings: bool, what: str
) -> Flat:
  """Removes a Flax `lm_head/kernel` equal to the tied embedding's transpose.

  HF's stock Flax Llama keeps such a copy; our tied model has none.
  """
  _, emb_path = TIED_HEADS.get(model_type, (None, None))
  head_path = ("lm_head", "kernel")
  if not (tie_word_embeddings and head_path in flat and emb_path in flat):
    return flat
  if not np.array_equal(np.asarray(flat[head_path]).T,
                        np.asarray(flat[emb_path])):
    raise CheckpointMismatchError(
        f"{what}: the config ties lm_head to the embeddings, but the "
        "checkpoint's lm_head/kernel differs from them")
  return {k: v for k, v in flat.items() if k != head_path}


def flax_to_pt(
    flat: Mapping[tuple[str, ...], np.ndarray],
    expected: Mapping[str, Shaped],
    *,
    model_type: str,
    tie_word_embeddings: bool,
    what: str,
) -> dict[str, np.ndarray]:
  """Renames and transposes a flat Flax tree into a PyTorch state dict.

  The inverse of `pt_to_flax`: `pt_to_flax(flax_to_pt(f, ...), ...) == f`.

  Args:
    flat: flat Flax tree (path -> numpy array, any dtype; kept as is).
    expected: the PyTorch model's state dict (name -> leaf with `.shape`,
      e.g. meta-device tensors). Buffers matching `IGNORED_PT_KEYS`, and
      the head of a tied model, are not expected in the result.
    model_type: the HF `model_type` (selects the tied-head entry).
    tie_word_embeddings: the config's flag.
    what: the checkpoint, for error messages.

  Returns:
    {PyTorch name: array}, checked with `tree_diff` (names and shapes).
  """
  want = {k: v for k, v in expected.items() if not ignored(k)}
  head_key, _ = TIED_HEADS.get(model_type, (None, None))
  if tie_word_embeddings and head_key is not None:
    want.pop(head_key, None)
  out: dict[str, np.ndarray] = {}
  for path, arr in flat.items():
    *prefix, leaf = path
    for pt_leaf, flax_leaf, transpose in LEAF_RULES:
      key = ".".join([*prefix, pt_leaf])
      if leaf == flax_leaf and key in want:
        out[key] = np.asarray(arr).T if transpose else np.asarray(arr)
        break
    else:
      out[".".join(path)] = np.asarray(arr)
  tree_diff({(k,): v for k, v in out.items()},
            {(k,): v for k, v in want.items()}, what=what)
  return out
