r"""Peak memory of converting a PyTorch checkpoint: tensor by tensor or whole.

  python -m experiments.bench_convert --out=convert.json
  python -m experiments.bench_convert --out=convert.json --layers=2 --hidden=256
  python -m experiments.bench_convert --out=convert_pickle.json --pickle

Saves a random Llama of the given shape as bfloat16 safetensors shards (as
transformers writes large checkpoints; `--pickle`: pickled `.bin` shards,
as OPT's checkpoints come), then converts it into an empty model cache
twice: streamed, tensor by tensor (`bridge.stream_convert`, what
`hf_import.cached_checkpoint` does for such a folder), and whole, through
the PyTorch model (what it did before, and still does for GGUF files and
legacy pickles). Every step runs in a fresh process, whose peak
resident memory (`os.wait4`) and wall time are recorded, beside the peak
of a process that only imports the same modules; and whether the two
float32 files hold the same tensors bit for bit. Everything is written
under a temporary folder, deleted at the end.
"""

from __future__ import annotations

import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
from absl import flags

from mosp_jax import cli
from mosp_jax.pipeline import artifact

_OUT = flags.DEFINE_string("out", None, "Where to write the JSON results.")
_LAYERS = flags.DEFINE_integer("layers", 8, "Decoder layers.")
_HIDDEN = flags.DEFINE_integer("hidden", 2048, "Hidden size.")
_MLP = flags.DEFINE_integer("mlp", 5632, "MLP (intermediate) size.")
_VOCAB = flags.DEFINE_integer("vocab", 32000, "Vocabulary size.")
_SHARD = flags.DEFINE_string("shard_size", "500MB",
                             "transformers' max_shard_size of the shards.")
_PICKLE = flags.DEFINE_bool("pickle", False,
                            "Pickled .bin shards instead of safetensors.")

ROOT = pathlib.Path(__file__).resolve().parents[1]

# One step in a fresh process: argv = mode, checkpoint, cache, shape JSON.
# Every step, the random model's construction included, runs in a child:
# a child's peak resident memory counts the parent's pages it was forked
# with, so the parent stays small.
_CHILD = """
import json, os, sys
mode, ckpt, cache, shape = sys.argv[1:]
os.environ["MOSP_JAX_CACHE"] = cache
import jax, torch, transformers
if mode == "make":
  s = json.loads(shape)
  cfg = transformers.LlamaConfig(
      hidden_size=s["hidden"], intermediate_size=s["mlp"],
      num_hidden_layers=s["layers"], num_attention_heads=16,
      num_key_value_heads=4, vocab_size=s["vocab"],
      tie_word_embeddings=False)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
  model.save_pretrained(ckpt, max_shard_size=s["shard_size"],
                        safe_serialization=not s["pickle"])
  print(sum(p.numel() for p in model.parameters()))
  sys.exit()
from bridge import hf_import
if mode == "imports":  # trust_pickle: the pickles are this benchmark's own
  hf_import.load_config(ckpt, trust_pickle=True)
else:
  print(hf_import.cached_checkpoint(ckpt, stream=mode == "stream",
                                    trust_pickle=True)[1])
"""


def _run_child(mode: str, ckpt: pathlib.Path, tmp: pathlib.Path
               ) -> dict[str, Any]:
  """One step in a fresh process: `{peak_rss_bytes, wall_s, printed}`
  (the last word it printed: the parameter count for `make`, the
  converted model.safetensors for `stream` and `whole`)."""
  shape = {"layers": _LAYERS.value, "hidden": _HIDDEN.value,
           "mlp": _MLP.value, "vocab": _VOCAB.value,
           "shard_size": _SHARD.value, "pickle": _PICKLE.value}
  log = tmp / f"{mode}.log"
  with open(log, "wb") as f:
    t = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, mode, str(ckpt),
         str(tmp / f"cache-{mode}"), json.dumps(shape)], stdout=f,
        stderr=subprocess.STDOUT, cwd=ROOT)
    # wait4, not proc.wait(): the child's own resource usage.
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
  text = log.read_text()
  if proc.returncode != 0:
    raise RuntimeError(f"the {mode} process failed ({proc.returncode}):\n"
                       f"{text[-2000:]}")
  words = text.split()
  return {"peak_rss_bytes": usage.ru_maxrss * 1024,  # Linux: KiB
          "wall_s": wall, "printed": words[-1] if words else ""}


def _same_tensors(a: str, b: str) -> bool:
  """Whether two safetensors files hold the same tensors, bit for bit."""
  from safetensors import safe_open

  with safe_open(a, "np") as fa, safe_open(b, "np") as fb:
    keys = set(fa.keys())  # noqa: SIM118 (safe_open handles)
    return keys == set(fb.keys()) and all(  # noqa: SIM118
        np.array_equal(fa.get_tensor(k), fb.get_tensor(k)) for k in keys)


def main(argv):
  del argv  # cli.run refuses positional arguments.
  if not _OUT.value:
    raise cli.UsageError("--out is required (a path for the JSON results)")
  cli.check_out_file(_OUT.value, flag="--out")
  for flag in (_LAYERS, _HIDDEN, _MLP, _VOCAB):
    if flag.value < 1:
      raise cli.UsageError(f"--{flag.name} must be >= 1, got {flag.value}")
  if _HIDDEN.value % 16:
    raise cli.UsageError(f"--hidden must be a multiple of 16 (the model's "
                         f"heads), got {_HIDDEN.value}")
  with tempfile.TemporaryDirectory(prefix="bench_convert-") as tmp_name:
    tmp = pathlib.Path(tmp_name)
    print("saving a random Llama ...", flush=True)
    ckpt = tmp / "checkpoint"
    params = int(_run_child("make", ckpt, tmp)["printed"])
    shards = sorted(ckpt.glob("*.bin" if _PICKLE.value else "*.safetensors"))
    # The floor of every child's peak: each is forked from this process.
    parent = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    runs = {}
    for mode in ("imports", "stream", "whole"):
      print(f"{mode} ...", flush=True)
      runs[mode] = _run_child(mode, ckpt, tmp)
    files = {m: runs[m].pop("printed") for m in runs}
    equal = _same_tensors(files["stream"], files["whole"])
    record = {
        "parameters": params, "layers": _LAYERS.value,
        "hidden": _HIDDEN.value, "mlp": _MLP.value, "vocab": _VOCAB.value,
        "shards": len(shards), "pickle": _PICKLE.value,
        "shard_bytes": sum(s.stat().st_size for s in shards),
        "float32_bytes": os.path.getsize(files["stream"]),
        "same_tensors": equal,
        "parent_peak_rss_bytes_before_children": parent,
        **{f"{m}_{k}": v for m, r in runs.items() for k, v in r.items()}}
  artifact.write_json(_OUT.value, record)
  gb = 1e9
  kind = "pickled" if _PICKLE.value else "safetensors"
  print(f"{params / 1e6:.0f} M parameters, {len(shards)} bfloat16 {kind} "
        f"shards "
        f"({record['shard_bytes'] / gb:.2f} GB) -> float32 "
        f"{record['float32_bytes'] / gb:.2f} GB")
  print(f"peak resident memory: streamed "
        f"{record['stream_peak_rss_bytes'] / gb:.2f} GB, whole "
        f"{record['whole_peak_rss_bytes'] / gb:.2f} GB "
        f"(imports alone {record['imports_peak_rss_bytes'] / gb:.2f} GB); "
        f"wall {record['stream_wall_s']:.0f} s against "
        f"{record['whole_wall_s']:.0f} s; same tensors: {equal}")
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  cli.run(main)
