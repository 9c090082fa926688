"""Runs one command on many command lines in one process, as its
`__main__` does (`mosp_jax.cli.run(main)`), for `tests/test_cli_errors.py`.

  python -m tests.cli_worker MODULE CASES.json RESULTS.json

CASES.json is a list of argv lists (without the program name). For each,
RESULTS.json gets the exit status, what reached file descriptors 1 and 2
(so library output written below Python is seen too) and, when an
exception escaped, its traceback (also appended to stderr, as Python
would print it). One process per command: the commands' absl flags
clash, and importing JAX once keeps the tests fast.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import traceback

from absl import flags

from mosp_jax import cli


def run_case(main, module: str, argv: list[str], cli_argv=list) -> dict:
  """One command line through `cli.run`, as the module's `__main__` passes
  it (its `cli_argv`, e.g. accepting experiments.run's flags)."""
  flags.FLAGS.unparse_flags()
  sys.stdout.flush()
  sys.stderr.flush()
  saved = os.dup(1), os.dup(2)
  with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
    os.dup2(out.fileno(), 1)
    os.dup2(err.fileno(), 2)
    status, tb = 0, ""
    try:
      cli.run(main, cli_argv([module, *argv]))
    except SystemExit as e:
      status = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:  # noqa: BLE001  (what a user would see)
      status, tb = None, traceback.format_exc()
    finally:
      sys.stdout.flush()
      sys.stderr.flush()
      os.dup2(saved[0], 1)
      os.dup2(saved[1], 2)
      os.close(saved[0])
      os.close(saved[1])
    out.seek(0)
    err.seek(0)
    return {"argv": argv, "status": status,
            "stdout": out.read().decode(errors="replace"),
            "stderr": err.read().decode(errors="replace") + tb,
            "traceback": tb}


def run_cases(module: str, argvs: list[list[str]], tmp: pathlib.Path, *,
              timeout: float = 900) -> list[dict]:
  """Runs `module` on each argv in one worker process (from a test);
  returns one result dict per argv, in order (see the module docstring).
  `tmp` holds the case and result files."""
  cases = tmp / f"{module}.cases.json"
  results = tmp / f"{module}.results.json"
  cases.write_text(json.dumps(argvs))
  proc = subprocess.run(
      [sys.executable, "-m", "tests.cli_worker", module, str(cases),
       str(results)], cwd=pathlib.Path(__file__).resolve().parents[1],
      capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(results.read_text())


def main() -> None:
  module, cases_path, results_path = sys.argv[1:]
  mod = importlib.import_module(module)
  with open(cases_path) as f:
    cases = json.load(f)
  results = [run_case(mod.main, module, argv,
                      getattr(mod, "cli_argv", list)) for argv in cases]
  with open(results_path, "w") as f:
    json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
