"""M4's report as pure functions of `Results`: per-step PQ tables, forgetting, verdicts, bars.

Records: arm `step0` (condition `step0`: the step-0 model, scored with the groups of step 1),
each arm after incremental step `t` (condition `step<t>`: `pq_old`, `sq_old`, ..., `pq_all`
over the step's old / new / old + new classes and `pq_class_<c>` for every class, in points),
and `pseudo_labels` (condition `noise_<threshold>_area_<n>`: pseudo-label statistics).

Forgetting of an arm after step `t`: over the classes learnt before `t`, the mean PQ each had
right after the step that taught it (in the arm's own chain; step-0 classes: the step-0 model)
minus their mean PQ after step `t`, per seed. After step 1 this is METHODS.md's
`PQ_old(before) - PQ_old(after)`. The issue's bar (forgetting at most half of naive's,
new-class PQ within 5 points of naive's) is met only with a paired win over seeds
(`study.stats.paired_verdict`), so a single seed never meets it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from research.incremental_panoptic.settings import VARIANTS
from research.study import figures, stats, tables
from research.study.results import Results

STEP0 = "step0"
GROUPS = ("old", "new", "all")
HEAD_TO_HEAD = ("naive", "comformer")
ABLATIONS = ("ablation", "extension")
JOINT_DIAGNOSTICS = ("naive", "joint", "joint_3x", "joint_step_images", "joint_step_images_3x")


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


def condition(step: int) -> str:
  """The records' condition of incremental step `step` (0: the step-0 model)."""
  return STEP0 if step == 0 else f"step{step}"


def arms_at(results: Results, step: int) -> list[str]:
  """Arms with records after `step`, in the order they first appear."""
  return [a for a in results.arms() if results.select(arm=a, condition=condition(step))]


def per_seed(results: Results, arm: str, metric: str, step: int) -> dict[int, float]:
  """`{seed: value}` of an arm's metric after `step` (`forgetting` included)."""
  if metric == "forgetting":
    return forgetting(results, arm, step)
  return results.per_seed(arm, metric, condition=condition(step))


def forgetting(results: Results, arm: str, step: int) -> dict[int, float]:
  """`{seed: forgetting}` of `arm` after incremental `step` (module docstring), in points."""
  class_steps = results.meta["class_steps"]
  before: dict[int, list[float]] = {}
  for s in range(step):
    source = STEP0 if s == 0 else arm
    for c in class_steps[s]:
      for seed, v in results.per_seed(source, f"pq_class_{c}", condition=condition(s)).items():
        before.setdefault(seed, []).append(v)
  after: dict[int, list[float]] = {}
  for c in (c for s in class_steps[:step] for c in s):
    for seed, v in results.per_seed(arm, f"pq_class_{c}", condition=condition(step)).items():
      after.setdefault(seed, []).append(v)
  return {
    seed: float(np.nanmean(before[seed]) - np.nanmean(after[seed]))
    for seed in after
    if seed in before and len(before[seed]) == len(after[seed])
  }


def mean(values: Mapping[int, float]) -> float:
  """Mean over seeds (NaN when there is none)."""
  return stats.summarize(list(values.values())).mean


def cell(values: Mapping[int, float]) -> str:
  """`mean ± std (n=S)` (std with ddof = 1)."""
  return stats.format_mean_std(stats.summarize(list(values.values())))


def check_bar(results: Results, step: int, variant: str = "method") -> dict:
  """The issue's bar for `variant` against naive fine-tuning after `step` (paired verdicts).

  Returns:
    `forgetting_naive`, `forgetting_method` (`variant`'s) and `new_pq_gap_to_naive` (means
    over seeds, points); `forgetting_halved` (a paired win of `0.5 * forgetting(naive) -
    forgetting(variant)`) and `new_pq_within_5` (a paired win of `PQ_new(variant) + 5 -
    PQ_new(naive)`), with their verdicts (`*_verdict`).
  """
  f_naive, f_variant = forgetting(results, "naive", step), forgetting(results, variant, step)
  new_naive = per_seed(results, "naive", "pq_new", step)
  new_variant = per_seed(results, variant, "pq_new", step)
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


def title(arm: str) -> str:
  """The arm's name in the report."""
  return "step 0 (before step 1)" if arm == STEP0 else VARIANTS[arm].title


def step_table(results: Results, step: int) -> str:
  """Mean ± std of PQ old / new / all and forgetting of every arm after `step`."""
  arms = ([STEP0] if step == 1 else []) + arms_at(results, step)
  rows = []
  for arm in arms:
    s = 0 if arm == STEP0 else step
    row = [title(arm), VARIANTS[arm].role if arm in VARIANTS else "before"]
    row += [cell(per_seed(results, arm, f"pq_{g}", s)) for g in GROUPS]
    row.append("0" if arm == STEP0 else cell(forgetting(results, arm, step)))
    rows.append(row)
  header = ["arm", "role", "PQ old", "PQ new", "PQ all", "forgetting"]
  return tables.markdown_table(header, rows)


def verdict_table(
  results: Results, step: int, method: str = "method", baselines: tuple = HEAD_TO_HEAD
) -> str:
  """`method` against `baselines` (naive, CoMFormer) after `step`: paired verdicts."""
  rows = []
  for baseline in (b for b in baselines if b in arms_at(results, step)):
    for metric in ("pq_old", "pq_new", "pq_all", "forgetting"):
      a = per_seed(results, method, metric, step)
      b = per_seed(results, baseline, metric, step)
      v = stats.paired_verdict(a, b, higher_is_better=metric != "forgetting")
      rows.append([baseline, metric, cell(a), cell(b), str(v)])
  header = ["vs", "metric", VARIANTS[method].title, "baseline", "paired verdict (method side)"]
  return tables.markdown_table(header, rows)


def _yes(met: bool) -> str:
  return "yes" if met else "NO"


def bar_table(results: Results, step: int) -> tuple[str, dict]:
  """The bar for the method (headline) and the other pseudo-label arms after `step`."""
  bars = {v: check_bar(results, step, v) for v in arms_at(results, step) if VARIANTS[v].pseudo}
  rows = [
    [
      title(v), f"{b['forgetting_method']:.2f} (naive {b['forgetting_naive']:.2f})",
      f"{_yes(b['forgetting_halved'])}: {b['forgetting_halved_verdict']}",
      f"{b['new_pq_gap_to_naive']:.2f}",
      f"{_yes(b['new_pq_within_5'])}: {b['new_pq_within_5_verdict']}",
    ]
    for v, b in bars.items()
  ]  # fmt: skip
  header = ["arm", "forgetting", "at most half of naive's", "new PQ gap to naive", "within 5"]
  return tables.markdown_table(header, rows), bars


def sensitivity_table(results: Results) -> str:
  """Pseudo labels of the step-0 model on the step-1 images per noise-removal setting."""
  conditions = list(dict.fromkeys(r.condition for r in results.select(arm="pseudo_labels")))
  metrics = ("masks_per_image", "pixels_per_image", "precision", "on_new", "new_claimed")
  rows = [
    [c.replace("noise_", "threshold ").replace("_area_", ", min area ")]
    + [cell(results.per_seed("pseudo_labels", m, condition=c)) for m in metrics]
    for c in conditions
  ]
  header = [
    "setting",
    "pseudo masks / image",
    "pseudo pixels / image",
    "precision %",
    "on new-class pixels %",
    "new-class pixels claimed %",
  ]
  return tables.markdown_table(header, rows)


def joint_table(results: Results) -> str:
  """The joint-ceiling diagnostics after step 1: new-class PQ overall and per class."""
  names, new = results.meta["class_names"], results.meta["class_steps"][1]
  arms = [a for a in JOINT_DIAGNOSTICS if a in arms_at(results, 1)]
  rows = [
    [title(a), cell(per_seed(results, a, "pq_new", 1)), cell(per_seed(results, a, "pq_old", 1))]
    + [cell(per_seed(results, a, f"pq_class_{c}", 1)) for c in new]
    for a in arms
  ]
  header = ["arm", "PQ new", "PQ old"] + [f"PQ {names[c]}" for c in new]
  counts = results.meta.get("target_counts", {})
  count_rows = [[k] + [v[c] for c in new] for k, v in counts.items() if k.startswith("step1/")]
  return (
    tables.markdown_table(header, rows)
    + "\n\nTraining targets of the new classes in each step-1 training set (first seed; key: "
    "step/labels/images):\n\n"
    + tables.markdown_table(["training set"] + [names[c] for c in new], count_rows)
  )


def per_class_table(results: Results, step: int) -> str:
  """Per-class PQ (mean over seeds) of every arm after `step`."""
  names = results.meta["class_names"]
  arms = arms_at(results, step)
  seen = [c for s in results.meta["class_steps"][: step + 1] for c in s]
  rows = [
    [names[c]] + [f"{mean(per_seed(results, a, f'pq_class_{c}', step)):.1f}" for a in arms]
    for c in seen
  ]
  return tables.markdown_table(["class"] + arms, rows)


def overlay_rows(meta: dict) -> list[tuple[str, list[np.ndarray]]]:
  """Figure rows `image | truth | step 0 | arms after the last step` (first seed)."""
  shown = meta["overlays"]
  k = len(meta["class_names"])
  arms = list(shown["maps"])
  rows = []
  for i, pairs in enumerate(shown["truth_tables"]):
    panels = [np.asarray(shown["image"][i]), panoptic_rgb(shown["truth"][i], dict(pairs), k)]
    panels += [panoptic_rgb(shown["maps"][a][i], dict(shown["tables"][a][i]), k) for a in arms]
    rows.append((f"test {i}: image | truth | " + " | ".join(arms), panels))
  return rows


def write_report(results: Results, workdir: str) -> dict:
  """`report.md`, `plots/pq.png`, `plots/overlays.png` and `summary.json` from the results.

  Returns:
    the summary: per step and arm the mean PQ old / new / all and forgetting, the bars and
    the demo's rows (last step, method vs naive).
  """
  meta = results.meta
  names = meta["class_names"]
  steps = range(1, len(meta["class_steps"]))
  last = steps[-1]
  step_names = " | ".join(
    f"step {t}: {[names[c] for c in cs]}" for t, cs in enumerate(meta["class_steps"])
  )
  sections = [
    (
      "Set-up",
      f"{step_names}. Step 0: {meta['steps']['step0']} updates; each incremental step: "
      f"{meta['steps']['increment']} updates per arm (x{meta['steps_factor']} where marked). "
      f"Seeds {meta['seeds']}; images per step and training set: {meta['num_images']} (first "
      f"seed). Images with more than max_segments segments keep their largest: "
      f"{meta['truncated']}. PQ in points on held-out, fully labelled test images at the "
      f"labels' resolution; mean ± sample std over seeds. Wall time {meta.get('time_s', 0):.0f} s.",
    )
  ]
  summary_steps, bars_by_step = {}, {}
  for t in steps:
    bars_text, bars = bar_table(results, t)
    bars_by_step[t] = bars
    sections += [
      (f"After step {t}: PQ per arm", step_table(results, t)),
      (f"After step {t}: paired verdicts of this method", verdict_table(results, t)),
      (f"After step {t}: the issue's bar (patent's rule is the headline row)", bars_text),
    ]
    others = tuple(a for a in arms_at(results, t) if VARIANTS[a].role in ABLATIONS)
    if others:
      sections.append(
        (
          f"After step {t}: ablations and extension against this method (method side)",
          verdict_table(results, t, baselines=others),
        )
      )
    summary_steps[t] = {
      a: {g: mean(per_seed(results, a, f"pq_{g}", t)) for g in GROUPS}
      | {"forgetting": mean(forgetting(results, a, t))}
      for a in arms_at(results, t)
    }
  if results.select(arm="pseudo_labels"):
    sections.append(
      ("Noise removal: pseudo-label sensitivity (step 1)", sensitivity_table(results))
    )
  sections += [
    ("Joint ceiling diagnostics (step 1)", joint_table(results)),
    (f"Per-class PQ after step {last}", per_class_table(results, last)),
    ("Plots", "![pq](plots/pq.png)\n\n![overlays](plots/overlays.png)"),
  ]
  figures.plot_bars(
    {
      f"{a}@{t}": [summary_steps[t][a][g] for g in GROUPS]
      for t in steps
      for a in arms_at(results, t)
      if a in HEAD_TO_HEAD + ("method", "joint")
    },
    ["PQ old", "PQ new", "PQ all"],
    "PQ (points)",
    tables.plot_path(workdir, "pq.png"),
  )
  rows = overlay_rows(meta)
  if rows:
    figures.plot_segmentation_rows(rows, len(names), tables.plot_path(workdir, "overlays.png"))
  tables.write_report(
    workdir, f"Class-incremental panoptic fine-tuning (M4) on {meta['dataset']}", sections
  )
  final = summary_steps[last]
  bar = bars_by_step[last]["method"]
  naive = "naive fine-tuning"
  summary = {
    "experiment": results.experiment,
    "time_s": meta.get("time_s", 0.0),
    "steps": {str(t): v for t, v in summary_steps.items()},
    "bars": {str(t): v for t, v in bars_by_step.items()},
    "rows": [
      tables.summary_row(
        f"PQ_old after step {last} (points)", final["method"]["old"], naive, final["naive"]["old"]
      ),
      tables.summary_row(
        f"forgetting after step {last}", bar["forgetting_method"], naive, bar["forgetting_naive"]
      ),
      tables.summary_row(
        f"PQ_new after step {last} (points)", final["method"]["new"], naive, final["naive"]["new"]
      ),
    ],
  }
  tables.write_summary(workdir, summary)
  return summary
