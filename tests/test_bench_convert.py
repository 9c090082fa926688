"""experiments.bench_convert on a small random Llama: both conversions run
in their own processes and give the same tensors; the float32 file holds
every parameter of the saved model once."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import ROOT


@pytest.mark.parametrize("pickle", [False, True])
def test_bench_convert_record(tmp_path, pickle):
  out = tmp_path / "convert.json"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.bench_convert", f"--out={out}",
       "--layers=1", "--hidden=64", "--mlp=96", "--vocab=256",
       "--shard_size=40KB", f"--{'' if pickle else 'no'}pickle"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  r = json.loads(out.read_text())
  assert r["same_tensors"] is True and r["pickle"] is pickle
  assert r["shards"] >= 2
  # bfloat16 shards -> float32: 4 bytes per parameter plus a header.
  assert 4 * r["parameters"] < r["float32_bytes"] < 4 * r["parameters"] + 2**16
  assert 2 * r["parameters"] < r["shard_bytes"] < 2 * r["parameters"] + 2**17
  for mode in ("imports", "stream", "whole"):
    assert r[f"{mode}_peak_rss_bytes"] > 0 and r[f"{mode}_wall_s"] > 0
  assert "same tensors: True" in proc.stdout
