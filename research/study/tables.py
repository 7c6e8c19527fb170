"""Report tables and files: markdown tables, `report.md`, `summary.json`, comparison tables.

A method's `report.py` builds its sections from `Results` with these functions; they write
through `etils.epath`, so a workdir may be any path Orbax can write (e.g. `gs://...`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from research.study import stats
from research.study.results import Results
from research.training.progress import MetricWriter

SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.md"


def plot_path(workdir: str | epath.Path, name: str) -> str:
  """`<workdir>/plots/<name>`, where reports put their figures."""
  return str(epath.Path(workdir) / "plots" / name)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub-markdown table; floats are printed with 4 significant digits."""

  def cell(v: Any) -> str:
    if isinstance(v, float | np.floating):
      return "nan" if np.isnan(v) else f"{v:.4g}"
    return str(v)

  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def write_report(
  workdir: str | epath.Path, title: str, sections: Sequence[tuple[str, str]]
) -> epath.Path:
  """Writes `<workdir>/report.md` from (heading, markdown body) sections; returns its path.

  The PNG figures under `<workdir>/plots/` are also added to the run's TensorBoard event files
  (as images `plots/<name>`, unless TensorBoard is switched off).
  """
  parts = [f"# {title}", ""]
  for heading, body in sections:
    parts += [f"## {heading}", "", body, ""]
  path = epath.Path(workdir) / REPORT_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("\n".join(parts))
  plots = epath.Path(workdir) / "plots"
  if plots.exists():
    writer = MetricWriter(str(workdir))
    writer.write_images(str(plots), 0)
    writer.close()
  return path


def summary_row(metric: str, value: float, baseline: str, baseline_value: float) -> dict:
  """One row of the demo table: a metric of the method against a named baseline."""
  return {
    "metric": metric,
    "value": float(value),
    "baseline": baseline,
    "baseline_value": float(baseline_value),
  }


def write_summary(workdir: str | epath.Path, summary: dict) -> epath.Path:
  """Writes `<workdir>/summary.json` (what the demo's table is built from)."""
  path = epath.Path(workdir) / SUMMARY_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(summary, indent=2, default=float))
  return path


def mean_std_cell(
  results: Results, arm: str, metric: str, split: str = "test", condition: str = "-", scale=1.0
) -> str:
  """`mean ± std (n=S)` of one arm's metric over seeds."""
  summary = stats.summarize(results.values(arm, metric, split, condition))
  return stats.format_mean_std(summary, scale)


def comparison_table(
  results: Results,
  method: str,
  baselines: Sequence[str],
  metrics: Sequence[tuple[str, str, str]],
  *,
  arm_names: dict[str, str] | None = None,
  higher_is_better: dict[str, bool] | None = None,
  scale: float = 1.0,
) -> str:
  """Method against each baseline: both arms' mean ± std and the paired verdict, per metric.

  Args:
    results: the study's records.
    method: the method's arm.
    baselines: the arms it is compared with.
    metrics: `(metric, split, condition)` rows to compare.
    arm_names: display names of arms.
    higher_is_better: per metric name (default True).
    scale: multiplies every value (e.g. 100 for percent).

  Returns:
    a markdown table with one row per (metric, baseline).
  """
  names = arm_names or {}
  better = higher_is_better or {}
  rows = []
  for metric, split, condition in metrics:
    where = metric if (split, condition) == ("test", "-") else f"{metric} ({split}, {condition})"
    for baseline in baselines:
      verdict = stats.paired_verdict(
        results.per_seed(method, metric, split, condition),
        results.per_seed(baseline, metric, split, condition),
        higher_is_better=better.get(metric, True),
      )
      rows.append(
        [
          where,
          names.get(baseline, baseline),
          mean_std_cell(results, method, metric, split, condition, scale),
          mean_std_cell(results, baseline, metric, split, condition, scale),
          f"{verdict.mean_diff * scale:+.4g}" if verdict.n else "n/a",
          verdict.verdict if verdict.n >= 2 else "ties (fewer than 2 seeds)",
        ]
      )
  header = ["metric", "baseline", names.get(method, method), "baseline value", "diff", "verdict"]
  return markdown_table(header, rows)
