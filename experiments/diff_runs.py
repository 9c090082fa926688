r"""Two run directories compared bit for bit, wall times left out.

  python -m experiments.diff_runs RUN_A RUN_B

Compares what `experiments.run` writes: `config.json` and
`pareto/meta.json` exactly; `results.json` with its timings left out
(`timings`, and each layer's `<phase>_s`); every array of the Pareto set
(`pareto/layer_*.npz`: name, dtype, shape and bytes); `flags.txt`
without its `--out_dir` line; `report.md` without its wall-time line;
every other file (`pareto.png`, `export_*/`, `checkpoint/`) byte for
byte. Prints one line per difference and exits 1 when there is one, 0
when the runs are equal [ours: a refactor's check that results stayed
bitwise the same].
"""

from __future__ import annotations

import json
import pathlib
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from mosp_jax.pipeline import run_record

TIMING_SUFFIX = "_s"


def _results(path: pathlib.Path) -> Any:
  """results.json without wall times (`timings`, layers' `<phase>_s`)."""
  d = json.loads(path.read_text())
  d.pop("timings", None)
  d["layers"] = [{k: v for k, v in layer.items()
                  if not k.endswith(TIMING_SUFFIX)}
                 for layer in d.get("layers", [])]
  return d


def _json(path: pathlib.Path) -> Any:
  return json.loads(path.read_text())


def _lines_without(prefix: str) -> Callable[[pathlib.Path], list[str]]:
  def read(path: pathlib.Path) -> list[str]:
    return [ln for ln in path.read_text().splitlines()
            if not ln.startswith(prefix)]
  return read


# How a file is read before it is compared; any other file: its bytes.
_READERS: dict[str, Callable[[pathlib.Path], Any]] = {
    run_record.RESULTS_FILE: _results,
    run_record.CONFIG_FILE: _json,
    f"{run_record.ARTIFACT_DIR}/meta.json": _json,
    run_record.FLAGS_FILE: _lines_without("--out_dir="),
    run_record.REPORT_FILE: _lines_without("Wall time (s):"),
}


def _first_difference(a: Any, b: Any, where: str = "") -> str:
  """Where two JSON values first differ ('layers[0].linears...')."""
  if isinstance(a, dict) and isinstance(b, dict):
    for k in list(a) + [k for k in b if k not in a]:
      if k not in a or k not in b:
        return f"{where}.{k}: only in {'A' if k in a else 'B'}"
      if a[k] != b[k]:
        return _first_difference(a[k], b[k], f"{where}.{k}")
    return f"{where}: key order"
  if (isinstance(a, list) and isinstance(b, list) and len(a) == len(b)):
    i = next(i for i, (x, y) in enumerate(zip(a, b, strict=True))
             if x != y)
    return _first_difference(a[i], b[i], f"{where}[{i}]")
  return f"{where or 'value'}: {str(a)[:80]} != {str(b)[:80]}"


def _diff_npz(rel: str, a: pathlib.Path, b: pathlib.Path) -> list[str]:
  out = []
  with np.load(a) as za, np.load(b) as zb:
    for key in sorted(set(za.files) | set(zb.files)):
      if key not in za.files or key not in zb.files:
        out.append(f"{rel}: array {key} only in "
                   f"{'A' if key in za.files else 'B'}")
        continue
      x, y = za[key], zb[key]
      if x.dtype != y.dtype or x.shape != y.shape:
        out.append(f"{rel}: {key}: {x.dtype}{x.shape} != "
                   f"{y.dtype}{y.shape}")
      elif x.tobytes() != y.tobytes():
        per_element = (np.ascontiguousarray(x).view(np.uint8)
                       != np.ascontiguousarray(y).view(np.uint8))
        n = int(per_element.reshape(x.size, -1).any(axis=1).sum())
        out.append(f"{rel}: {key}: {n} of {x.size} elements differ")
  return out


def _diff_file(rel: str, a: pathlib.Path, b: pathlib.Path) -> list[str]:
  if rel.endswith(".npz"):
    return _diff_npz(rel, a, b)
  read = _READERS.get(rel)
  if read is None:
    return [] if a.read_bytes() == b.read_bytes() else [
        f"{rel}: bytes differ"]
  x, y = read(a), read(b)
  return [] if x == y else [f"{rel}: {_first_difference(x, y)}"]


def diff_runs(a: str | pathlib.Path, b: str | pathlib.Path) -> list[str]:
  """The differences of run directories `a` and `b`, one line each
  (empty: equal); a FileNotFoundError names a missing directory."""
  roots = [pathlib.Path(a), pathlib.Path(b)]
  for root in roots:
    if not root.is_dir():
      raise FileNotFoundError(f"{root}: no such run directory")
  files = [{p.relative_to(r).as_posix() for p in r.rglob("*")
            if p.is_file()} for r in roots]
  out = [f"{rel}: only in {'A' if rel in files[0] else 'B'}"
         for rel in sorted(files[0] ^ files[1])]
  for rel in sorted(files[0] & files[1]):
    out += _diff_file(rel, roots[0] / rel, roots[1] / rel)
  return out


def main(argv: list[str]) -> int:
  if len(argv) != 3:
    print("usage: python -m experiments.diff_runs RUN_A RUN_B",
          file=sys.stderr)
    return 2
  try:
    diffs = diff_runs(argv[1], argv[2])
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for line in diffs:
    print(line)
  print(f"{len(diffs)} difference(s)" if diffs else
        f"equal: {argv[1]} and {argv[2]} (wall times left out)")
  return 1 if diffs else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
