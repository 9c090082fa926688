"""What every command of the project shares: errors, exit codes, logging.

Every command (`experiments.run`, `experiments.compare`,
`experiments.bench_solvers`, `bridge.export`, `bridge.parity`) starts with
`cli.run(main)` instead of `absl.app.run(main)`, and so:

- ends a bad input with one line `error: ...` on stderr that names the
  flag or the file, never a traceback;
- exits 2 for a usage error (`UsageError`: a flag that does not parse or
  has a bad value, a missing flag, a path that does not exist or is of the
  wrong kind, outputs that would be overwritten) and 1 for a failure at run
  time (a file whose contents cannot be used, a failed fetch, non-finite
  numbers, a failed check);
- refuses NaN and Inf in every float flag;
- is quiet: library logs (absl INFO, orbax, JAX, transformers) are shown
  only when `--verbosity` (`-v`) is given, e.g. `--verbosity=0` for INFO;
- computes float32 matrix products in true float32 on every device
  (`float32_matmuls`), not in JAX's faster default of a GPU or TPU.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import pathlib
import sys
import zipfile
from collections.abc import Callable, Iterator, Sequence

import jax
from absl import app, flags, logging

from mosp_jax import fetch

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(ValueError):
  """The command line is wrong: a flag's value, a missing flag, a path that
  does not exist or is of the wrong kind, or outputs it would overwrite.
  Exit status 2."""


def _failures() -> tuple[type[BaseException], ...]:
  """Errors that end a command with one line and exit status 1: bad file
  contents (ValueError and its subclasses, truncated archives), missing or
  unreadable files (OSError), failed fetches and non-finite numbers."""
  from mosp_jax.data import SourceUnavailableError
  return (ValueError, OSError, EOFError, FloatingPointError,
          zipfile.BadZipFile, fetch.FetchError, SourceUnavailableError)


def fail(message: object, status: int) -> None:
  """Prints `error: message` (continuation lines indented) and exits."""
  sys.stdout.flush()
  lines = str(message).strip().splitlines() or ["(no message)"]
  text = "\n".join([f"error: {lines[0]}", *(f"  {s}" for s in lines[1:])])
  print(text, file=sys.stderr, flush=True)
  sys.exit(status)


@contextlib.contextmanager
def usage_errors(flag: str | None = None) -> Iterator[None]:
  """Turns a ValueError raised inside into a `UsageError`, prefixed with
  `flag` unless its message already names it."""
  try:
    yield
  except UsageError:
    raise
  except ValueError as e:
    msg = str(e)
    if flag and not msg.startswith(flag):
      msg = f"{flag}: {msg}"
    raise UsageError(msg) from e


def _existing_ancestor(path: pathlib.Path) -> pathlib.Path:
  p = path.absolute()
  while not p.exists() and p != p.parent:
    p = p.parent
  return p


def check_out_dir(path: str | os.PathLike, *, flag: str) -> pathlib.Path:
  """An output folder that exists or can be created; raises UsageError
  naming `flag` when it, or a folder above it, is a file or not
  writable. Creates nothing."""
  out = pathlib.Path(path)
  if out.exists() and not out.is_dir():
    raise UsageError(f"{flag} {out}: is a file, not a folder")
  base = _existing_ancestor(out)
  if not base.is_dir():
    raise UsageError(f"{flag} {out}: {base} is a file, not a folder")
  if not os.access(base, os.W_OK | os.X_OK):
    raise UsageError(f"{flag} {out}: {base} is not writable")
  return out


def check_out_file(path: str | os.PathLike, *, flag: str) -> pathlib.Path:
  """An output file that can be written (replaced if it exists); raises
  UsageError naming `flag` when it is a folder or its folder cannot be
  created or written. Creates nothing."""
  out = pathlib.Path(path)
  if out.is_dir():
    raise UsageError(f"{flag} {out}: is a folder, not a file")
  if out.exists() and not os.access(out, os.W_OK):
    raise UsageError(f"{flag} {out}: is not writable")
  check_out_dir(out.parent if str(out.parent) else ".", flag=flag)
  return out


def check_in_dir(path: str | os.PathLike, *, flag: str) -> pathlib.Path:
  """An existing input folder; raises UsageError naming `flag` otherwise."""
  d = pathlib.Path(path)
  if not d.exists():
    raise UsageError(f"{flag} {d}: no such folder")
  if not d.is_dir():
    raise UsageError(f"{flag} {d}: is a file, not a folder")
  return d


def check_finite_flags(values: flags.FlagValues) -> None:
  """Raises UsageError for a float flag set to NaN or Inf."""
  for name in sorted(values):
    flag = values[name]
    value = flag.value
    if (isinstance(flag.parser, flags.FloatParser)
        and isinstance(value, float) and not math.isfinite(value)):
      raise UsageError(f"--{name}: expected a finite number, got {value}")


def quiet_libraries(verbose: bool) -> None:
  """Hides library logs (absl INFO, orbax, JAX, transformers) unless
  `verbose`; our own progress lines are printed, not logged."""
  if verbose:
    return
  logging.set_verbosity(logging.WARNING)
  if "transformers" in sys.modules:
    sys.modules["transformers"].utils.logging.set_verbosity_error()
  else:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


MATMUL_PRECISION_ENV = "JAX_DEFAULT_MATMUL_PRECISION"


def float32_matmuls() -> None:
  """Makes JAX compute float32 matrix products in true float32 on every
  device, unless `JAX_DEFAULT_MATMUL_PRECISION` is set (then that wins).

  [ours] JAX's default precision favours speed: TensorFloat32 (10-bit
  mantissas) on recent NVIDIA GPUs, bfloat16 passes on TPUs; on the CPU it
  is float32 either way. The solvers (products with eigenvectors, ADMM
  and PCG steps), the Grams and the forwards assume float32 products, as
  PyTorch computes them by default (TF32 off for matmuls since 1.12), so
  an export's PyTorch perplexity checks the same arithmetic. A product
  traced while this holds carries `Precision.HIGHEST`.
  """
  if MATMUL_PRECISION_ENV not in os.environ:
    jax.config.update("jax_default_matmul_precision", "float32")


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl `flags_parser`: a flag that does not parse, or a float flag that
  is not finite, ends with one `error:` line and exit status 2."""
  try:
    rest = flags.FLAGS(list(argv))
    check_finite_flags(flags.FLAGS)
  except flags.Error as e:
    msg = str(e).removeprefix("ERROR:: ")  # absl's prefix, for flagfiles.
    fail(f"{msg} (--helpfull lists every flag)", EXIT_USAGE)
  except UsageError as e:
    fail(e, EXIT_USAGE)
  quiet_libraries(flags.FLAGS["verbosity"].present > 0)
  return rest


def guarded(main: Callable[[list[str]], object]
            ) -> Callable[[list[str]], object]:
  """`main` with the project's error handling (see the module docstring)."""

  @functools.wraps(main)
  def wrapper(argv: list[str]) -> object:
    try:
      if len(argv) > 1:
        raise UsageError(f"unexpected arguments {argv[1:]}; every input is "
                         "a flag (--name=value)")
      return main(argv)
    except UsageError as e:
      fail(e, EXIT_USAGE)
    except _failures() as e:
      fail(e, EXIT_FAILURE)
    except KeyboardInterrupt:
      fail("interrupted", EXIT_INTERRUPTED)
    return None

  return wrapper


def run(main: Callable[[list[str]], object],
        argv: Sequence[str] | None = None) -> None:
  """`absl.app.run(main)` with the project's flag parsing, error handling
  and quiet logs, in float32 matmuls (`float32_matmuls`); `argv` defaults
  to `sys.argv`."""
  float32_matmuls()
  app.run(guarded(main), argv=None if argv is None else list(argv),
          flags_parser=parse_flags)
