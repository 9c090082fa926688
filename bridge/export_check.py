"""`--export_pref`: export one preference of a finished run and check its
parity (`bridge.parity_check`); the run records the summary, an
`ExportReport`, as results.json['export'].
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

from bridge import pruned, torch_export
from bridge.parity_check import (
  DEFAULT_RTOL,
  TaskPpl,
  check_parity,
  format_report,
)


@dataclasses.dataclass(frozen=True)
class ExportReport:
  """The summary of an export and its parity check.

  Attributes:
    checkpoint: the exported folder.
    dtype: the export's dtype.
    preference: the `(m,)` preference exported.
    ok: every parity check passed.
    ppl: per task, the perplexities of both sides.
    max_rel_diff: the largest torch-vs-JAX relative perplexity difference
      (0 without tasks).
    sparsity: `[min, max]` sparsity of the exported pruned kernels (None
      without pruned linears).
    problems: what failed.
  """

  checkpoint: str
  dtype: str
  preference: list[float]
  ok: bool
  ppl: list[TaskPpl]
  max_rel_diff: float
  sparsity: list[float] | None
  problems: list[str]

  def to_json(self) -> dict[str, Any]:
    """The JSON record (keys in field order)."""
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> ExportReport:
    """The report of a `to_json` record (read back from results.json)."""
    return cls(**{**d, "ppl": [TaskPpl(**r) for r in d["ppl"]]})


def export_and_check(run_dir: str | pathlib.Path, preference: str, *,
                     dtype: str = "float32", rtol: float = DEFAULT_RTOL,
                     log: Callable[[str], None] = lambda s: None
                     ) -> ExportReport:
  """Exports `preference` into `<run_dir>/export_<tag>/` (replacing an
  older one) and checks its parity; returns the summary."""
  out = (pathlib.Path(run_dir)
         / f"export_{pruned.preference_tag(preference)}")
  run = pruned.read_run(run_dir)
  model = pruned.materialize(
      run, pruned.parse_preference(preference, run.tasks), log=log)
  torch_export.export_model(run, model, out, dtype=dtype, overwrite=True,
                            log=log)
  report = check_parity(out, run_dir, preference, rtol=rtol, model=model,
                        log=log)
  log(format_report(report))
  return ExportReport(
      checkpoint=str(out), dtype=dtype, preference=report.preference,
      ok=report.ok, ppl=report.ppl,
      max_rel_diff=max((r.rel_diff for r in report.ppl), default=0.0),
      sparsity=([min(c.sparsity for c in report.linears),
                 max(c.sparsity for c in report.linears)]
                if report.linears else None),
      problems=report.problems)
