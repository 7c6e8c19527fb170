"""M4's report as pure functions of `Results`: PQ tables, forgetting, the issue's bar, plots.

Arms are `step0` (the historical model, "before") and the step-1 variants; metrics are
`pq_old`, `sq_old`, `rq_old`, `pq_new`, ..., `rq_all` and `pq_class_<c>` in points.
Forgetting of an arm is `pq_old(step0) - pq_old(arm)` of the same seed. The bar of the issue
(forgetting at most half of naive fine-tuning's, new-class PQ within 5 points of naive's) is
met only with a paired win over seeds (`study.stats.paired_verdict`, METHODS.md "How every
comparison is judged"), so a single seed never meets it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from research.incremental_panoptic.settings import VARIANTS
from research.study import figures, stats, tables
from research.study.results import Results

STEP0 = "step0"
GROUPS = ("old", "new", "all")
MAIN_ARMS = ("naive", "method", "joint")


def table_pairs(table: Mapping[int, int]) -> list[list[int]]:
  """`{segment id: class}` as sorted `[[id, class], ...]` (JSON keeps it exactly)."""
  return [[int(s), int(c)] for s, c in sorted(table.items())]


def panoptic_rgb(segment_map: np.ndarray, table: Mapping[int, int], num_classes: int) -> np.ndarray:
  """`[H, W]` segment ids -> `[H, W, 3]` colours: class colour, instances shaded; void black."""
  palette = figures.class_palette(num_classes)
  rgb = np.zeros(np.shape(segment_map) + (3,), np.float32)
  for rank, (segment, category) in enumerate(sorted(table.items())):
    rgb[np.asarray(segment_map) == segment] = palette[category] * (1.0 - 0.18 * (rank % 4))
  return rgb


def forgetting(results: Results, arm: str) -> dict[int, float]:
  """`{seed: PQ_old(step 0) - PQ_old(arm)}` in points."""
  before = results.per_seed(STEP0, "pq_old")
  after = results.per_seed(arm, "pq_old")
  return {s: before[s] - after[s] for s in after if s in before}


def mean(per_seed: Mapping[int, float]) -> float:
  """Mean over seeds (NaN when there is none)."""
  return stats.summarize(list(per_seed.values())).mean


def check_bar(results: Results, variant: str = "method") -> dict:
  """The issue's bar for `variant` against naive fine-tuning, judged by paired verdicts.

  Returns:
    `forgetting_naive`, `forgetting_method` (`variant`'s) and `new_pq_gap_to_naive` (means
    over seeds, points); `forgetting_halved` (forgetting <= half of naive's: a paired win of
    `0.5 * forgetting(naive) - forgetting(variant)`) and `new_pq_within_5` (a paired win of
    `PQ_new(variant) + 5 - PQ_new(naive)`), with their verdicts (`*_verdict`).
  """
  f_naive, f_variant = forgetting(results, "naive"), forgetting(results, variant)
  new_naive, new_variant = results.per_seed("naive", "pq_new"), results.per_seed(variant, "pq_new")
  halved = stats.paired_verdict(
    f_variant, {s: 0.5 * f for s, f in f_naive.items()}, higher_is_better=False
  )
  within = stats.paired_verdict({s: v + 5.0 for s, v in new_variant.items()}, new_naive)
  return {
    "forgetting_naive": mean(f_naive),
    "forgetting_method": mean(f_variant),
    "forgetting_halved": halved.verdict == stats.WINS,
    "forgetting_halved_verdict": str(halved),
    "new_pq_gap_to_naive": mean(new_naive) - mean(new_variant),
    "new_pq_within_5": within.verdict == stats.WINS,
    "new_pq_within_5_verdict": str(within),
  }


def _cell(results: Results, arm: str, metric: str) -> float | str:
  """One seed: the value; several: `mean ± std (n=S)`."""
  values = results.values(arm, metric)
  if len(values) == 1:
    return values[0]
  return stats.format_mean_std(stats.summarize(values))


def _forgetting_cell(results: Results, arm: str) -> float | str:
  values = list(forgetting(results, arm).values())
  if arm == STEP0 or len(values) == 1:
    return 0.0 if arm == STEP0 else values[0]
  return stats.format_mean_std(stats.summarize(values))


def pq_rows(results: Results, arms: Sequence[str]) -> list[list]:
  """Rows `[title, PQ/SQ/RQ old, PQ/SQ/RQ new, PQ all, forgetting]` of the PQ tables."""
  rows = []
  for arm in arms:
    title = "step 0 (before)" if arm == STEP0 else VARIANTS[arm].title
    cells = [_cell(results, arm, f"{m}_{g}") for g in ("old", "new") for m in ("pq", "sq", "rq")]
    rows.append([title, *cells, _cell(results, arm, "pq_all"), _forgetting_cell(results, arm)])
  return rows


def _yes(met: bool) -> str:
  return "yes" if met else "NO"


def bar_section(bars: Mapping[str, dict]) -> str:
  """The "Bar of the issue" section: the method's sentence and a table over variants."""
  bar = bars["method"]
  rows = [
    [
      VARIANTS[v].title,
      b["forgetting_method"],
      f"{_yes(b['forgetting_halved'])}: {b['forgetting_halved_verdict']}",
      b["new_pq_gap_to_naive"],
      f"{_yes(b['new_pq_within_5'])}: {b['new_pq_within_5_verdict']}",
    ]
    for v, b in bars.items()
  ]
  return (
    f"Forgetting of naive fine-tuning: {bar['forgetting_naive']:.2f} points. This method: "
    f"forgetting {bar['forgetting_method']:.2f} (at most half: "
    f"{_yes(bar['forgetting_halved'])}), new-class PQ gap to naive "
    f"{bar['new_pq_gap_to_naive']:.2f} points (within 5: {_yes(bar['new_pq_within_5'])}). "
    "A bar is met only with a paired win over seeds (every per-seed margin positive and the "
    "mean above 2 standard errors); fewer than 2 seeds cannot meet it.\n\n"
    + tables.markdown_table(
      ["variant", "forgetting", "at most half", "new PQ gap to naive", "within 5"], rows
    )
  )


def overlay_rows(meta: dict, arms: Sequence[str]) -> list[tuple[str, list[np.ndarray]]]:
  """Figure rows `image | truth | step 0 | variants...` of the saved test predictions."""
  shown = meta["overlays"]
  k = len(meta["class_names"])
  variants = [a for a in arms if a != STEP0]
  rows = []
  for i, pairs in enumerate(shown["truth_tables"]):
    panels = [np.asarray(shown["image"][i]), panoptic_rgb(shown["truth"][i], dict(pairs), k)]
    panels += [panoptic_rgb(shown["maps"][a][i], dict(shown["tables"][a][i]), k) for a in arms]
    rows.append((f"test {i}: image | truth | step 0 | " + " | ".join(variants), panels))
  return rows


def write_report(results: Results, workdir: str) -> dict:
  """`report.md`, `plots/pq.png`, `plots/overlays.png` and `summary.json` from the results.

  Returns:
    the summary: PQ before and after (means over seeds), the bar per pseudo-label variant and
    the demo's rows.
  """
  meta = results.meta
  names = meta["class_names"]
  arms = results.arms()
  variants = [a for a in arms if a != STEP0]
  bars = {v: check_bar(results, v) for v in variants if VARIANTS[v].pseudo}
  header = ["model", "PQ old", "SQ old", "RQ old", "PQ new", "SQ new", "RQ new", "PQ all"]
  header += ["forgetting"]
  main = [STEP0] + [v for v in variants if v in MAIN_ARMS]
  ablations = [v for v in variants if v not in ("naive", "joint")]
  per_class = [
    [names[c], "old" if c in meta["old_classes"] else "new"]
    + [_cell(results, arm, f"pq_class_{c}") for arm in arms]
    for c in range(len(names))
  ]
  figures.plot_bars(
    {
      ("step 0" if a == STEP0 else a): [mean(results.per_seed(a, f"pq_{g}")) for g in GROUPS]
      for a in arms
    },
    ["PQ old", "PQ new", "PQ all"],
    "PQ (points)",
    tables.plot_path(workdir, "pq.png"),
  )
  rows = overlay_rows(meta, arms)
  if rows:
    figures.plot_segmentation_rows(rows, len(names), tables.plot_path(workdir, "overlays.png"))
  steps = meta["steps"]
  tables.write_report(
    workdir,
    f"Class-incremental panoptic fine-tuning (M4) on {meta['dataset']}",
    [
      (
        "Set-up",
        f"Old classes {[names[c] for c in meta['old_classes']]}, new classes "
        f"{[names[c] for c in meta['new_classes']]}. Step 0: {steps['step0']} steps on "
        f"old-class labels; step 1: {steps['step1']} steps on images labelled only for the "
        f"new classes. PQ/SQ/RQ in points on held-out, fully labelled test images.",
      ),
      ("PQ before and after step 1", tables.markdown_table(header, pq_rows(results, main))),
      ("Bar of the issue", bar_section(bars)),
      (
        "Ablations",
        tables.markdown_table(header, pq_rows(results, ablations)) if ablations else "none",
      ),
      ("Per-class PQ", tables.markdown_table(["class", "split", "step 0"] + variants, per_class)),
      ("Plots", "![pq](plots/pq.png)\n\n![overlays](plots/overlays.png)"),
    ],
  )

  def pq(arm: str) -> dict:
    return {
      g: {m: mean(results.per_seed(arm, f"{m}_{g}")) for m in ("pq", "sq", "rq")} for g in GROUPS
    }

  bar = bars["method"]
  naive = "naive fine-tuning"
  summary = {
    "experiment": results.experiment,
    "time_s": meta["time_s"],
    "num_images": meta["num_images"],
    "before": pq(STEP0),
    "after": {v: pq(v) | {"forgetting": mean(forgetting(results, v))} for v in variants},
    "bar": bar,
    "bar_by_variant": bars,
    "rows": [
      tables.summary_row(
        "PQ_old after step 1 (points)",
        mean(results.per_seed("method", "pq_old")),
        naive,
        mean(results.per_seed("naive", "pq_old")),
      ),
      tables.summary_row(
        "forgetting PQ_old(before) - PQ_old(after)",
        bar["forgetting_method"],
        naive,
        bar["forgetting_naive"],
      ),
      tables.summary_row(
        "PQ_new after step 1 (points)",
        mean(results.per_seed("method", "pq_new")),
        naive,
        mean(results.per_seed("naive", "pq_new")),
      ),
    ],
  }
  tables.write_summary(workdir, summary)
  return summary
