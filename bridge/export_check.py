"""`--export_pref`: export one preference of a finished run and check its
parity (`bridge.parity_check`); the run records the summary, a
`run_record.ExportRecord`, as results.json['export'].
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable

from bridge import pruned, torch_export
from bridge.parity_check import DEFAULT_RTOL, check_parity, format_report
from mosp_jax.pipeline import run_record


def export_and_check(run_dir: str | pathlib.Path, preference: str, *,
                     dtype: str = "float32", rtol: float = DEFAULT_RTOL,
                     log: Callable[[str], None] = lambda s: None
                     ) -> run_record.ExportRecord:
  """Exports `preference` into `<run_dir>/export_<tag>/` (replacing an
  older one) and checks its parity; returns the summary."""
  out = (pathlib.Path(run_dir)
         / f"export_{pruned.preference_tag(preference)}")
  run = pruned.read_run(run_dir)
  model = pruned.preference_model(
      run, pruned.parse_preference(preference, run.tasks), log=log)
  torch_export.export_model(run, model, out, dtype=dtype, overwrite=True,
                            log=log)
  report = check_parity(out, run_dir, preference, rtol=rtol, model=model,
                        log=log)
  log(format_report(report))
  return run_record.ExportRecord(
      checkpoint=str(out), dtype=dtype,
      preference=tuple(float(x) for x in report.preference),
      ok=report.ok, ppl=tuple(dataclasses.asdict(r) for r in report.ppl),
      max_rel_diff=max((r.rel_diff for r in report.ppl), default=0.0),
      sparsity=((min(c.sparsity for c in report.linears),
                 max(c.sparsity for c in report.linears))
                if report.linears else None),
      problems=tuple(report.problems))
