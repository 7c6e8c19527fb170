"""Report of experiment M2, built from its `Results` alone (no training).

Records (see `experiment.add_strategy`): every strategy (arm) and seed has one condition
`round<r>` per completed round, with the test metrics (`accuracy`, `mean_class_accuracy`,
`worst_class_accuracy`, `class_<k>`) on split `test` and the loop's bookkeeping
(`POOL_METRICS`) on split `pool`. Round `r` of the comparison holds the seeds whose norm loop
reached `r` rounds; an arm that stopped earlier (pool empty, or the random-draw loop meeting
its stop condition sooner) counts with its last round.

Comparisons: the norm loop against the random-draw loop (`RANDOM_DRAW`, issue 16's ablation:
same loop, same stop conditions, same m per class, only step 3's draw differs) at equal
rounds, and against each equal-budget baseline at the norm loop's label budgets. Every table
and plot puts "pool labels read" (Step 5's reads of remaining pool labels, counted per round,
repeats included; the baselines read none) beside "labels used" (the training set).

Every "±" is the sample standard deviation over seeds (ddof = 1, `study.stats`), and every
"wins" / "loses" is a paired verdict (`stats.paired_verdict`): all per-seed differences of one
sign and the mean beyond max(2 SE, half a point); anything else, one seed included, is a tie.
"""

from __future__ import annotations

import math
from typing import Any

from research.norm_selection import rounds
from research.norm_selection.settings import FULL, METHOD, RANDOM_DRAW
from research.study import figures, stats, tables
from research.study.results import Results

EXPERIMENT = "norm_selection"
# What the experiment writes on split `pool` every round: the loop's round record, less its
# index, and the steps trained.
POOL_METRICS = (*(k for k in rounds.ROUND_RECORD_KEYS if k != "round"), "train_steps")
LOOPS = (METHOD, RANDOM_DRAW)
MIN_EFFECT = 0.005  # half a point of accuracy
OUTCOMES = (stats.WINS, stats.TIES, stats.LOSES)


def num_rounds(results: Results, arm: str, seed: int) -> int:
  """Rounds that `arm` completed with `seed`."""
  return len(results.select(arm=arm, seed=seed, split="pool", metric="num_labels"))


def compared_rounds(results: Results) -> int:
  """The rounds every seed's norm loop reached (the rows of the comparison)."""
  return min(num_rounds(results, METHOD, seed) for seed in results.seeds())


def at_round(results: Results, arm: str, metric: str, r: int, split: str = "test") -> dict:
  """`{seed: value}` of `arm` at round `r` (1-based), or at its last round if it stopped earlier."""
  out = {}
  for seed in results.seeds():
    n = num_rounds(results, arm, seed)
    if n:
      out[seed] = results.per_seed(arm, metric, split, f"round{min(r, n)}")[seed]
  return out


def summary_at(results: Results, arm: str, metric: str, r: int, split: str = "test"):
  """`stats.SeedSummary` over seeds of `at_round`."""
  return stats.summarize(list(at_round(results, arm, metric, r, split).values()))


def percent(s: stats.SeedSummary) -> str:
  """`mean ± std` in percent with one decimal (just the mean for one seed)."""
  if s.n < 2:
    return f"{100 * s.mean:.1f}"
  return f"{100 * s.mean:.1f} ± {100 * s.std:.1f}"


def baselines(results: Results) -> list[str]:
  """The equal-budget baselines in the results, in run order."""
  return [arm for arm in results.arms() if arm not in (*LOOPS, FULL)]


def controls(results: Results) -> list[str]:
  """What the norm loop is compared with: the random-draw loop (if run), then the baselines."""
  return ([RANDOM_DRAW] if RANDOM_DRAW in results.arms() else []) + baselines(results)


def arms_in_order(results: Results) -> list[str]:
  """The norm loop, its controls and the full data (if run)."""
  return [METHOD, *controls(results)] + ([FULL] if FULL in results.arms() else [])


def labels_at(results: Results, r: int, arm: str = METHOD) -> float:
  """Mean number of training labels of `arm` at round `r`."""
  return summary_at(results, arm, "num_labels", r, "pool").mean


def reads_at(results: Results, r: int, arm: str = METHOD) -> float:
  """Mean number of pool labels `arm` read (Step 5, repeats counted) up to round `r`."""
  return summary_at(results, arm, "label_reads", r, "pool").mean


def seen_at(results: Results, r: int, arm: str = METHOD) -> float:
  """Mean number of distinct labels `arm` used or read up to round `r`."""
  return summary_at(results, arm, "labels_seen", r, "pool").mean


def verdicts(results: Results) -> list[tuple[int, float, str, stats.Verdict]]:
  """`(round, labels, control, paired verdict of the norm rule's test accuracy)` rows."""
  return [
    (
      r,
      labels_at(results, r),
      name,
      stats.paired_verdict(
        at_round(results, METHOD, "accuracy", r),
        at_round(results, name, "accuracy", r),
        min_effect=MIN_EFFECT,
      ),
    )
    for r in range(1, compared_rounds(results) + 1)
    for name in controls(results)
  ]


def verdict_counts(results: Results) -> dict[str, dict[str, int]]:
  """Per control: at how many budgets (rounds) the norm rule wins, ties and loses."""
  counts = {name: dict.fromkeys(OUTCOMES, 0) for name in controls(results)}
  for _, _, name, v in verdicts(results):
    counts[name][v.verdict] += 1
  return counts


def within_one_point_of_full(results: Results) -> float | None:
  """The first budget (labels) where the norm rule is within 1 point of the full data.

  Compares the means over seeds; None when no budget gets there or there is no full-data run.
  """
  if FULL not in results.arms():
    return None
  full = summary_at(results, FULL, "accuracy", 1).mean
  for r in range(1, compared_rounds(results) + 1):
    if summary_at(results, METHOD, "accuracy", r).mean >= full - 0.01:
      return labels_at(results, r)
  return None


ACCURACY_HEADER = [
  "round",
  "strategy",
  "labels used",
  "pool labels read",
  "train steps",
  "accuracy",
  "worst class",
  "mean class",
]


def _row(results: Results, name: str, r: int, shown_round: Any) -> list[Any]:
  metrics = ("accuracy", "worst_class_accuracy", "mean_class_accuracy")
  counts = [labels_at(results, r, name), reads_at(results, r, name)]
  counts.append(summary_at(results, name, "train_steps", r, "pool").mean)
  return [shown_round, name, *(f"{c:.0f}" for c in counts)] + [
    percent(summary_at(results, name, m, r)) for m in metrics
  ]


def accuracy_rows(results: Results) -> list[list[Any]]:
  """Rows of `ACCURACY_HEADER`: every loop and baseline per round, then the full data."""
  rows = [
    _row(results, name, r, r)
    for r in range(1, compared_rounds(results) + 1)
    for name in [METHOD, *controls(results)]
  ]
  if FULL in results.arms():
    rows.append(_row(results, FULL, 1, "-"))
  return rows


def loop_rows(results: Results) -> list[list[Any]]:
  """Per loop and seed: rounds, labels, pool labels read, labels seen, removed, left, stop."""
  rows = []
  for arm in [a for a in LOOPS if a in results.arms()]:
    for seed in results.seeds():
      n = num_rounds(results, arm, seed)
      last = {m: results.per_seed(arm, m, "pool", f"round{n}")[seed] for m in POOL_METRICS}
      removed = sum(
        results.per_seed(arm, "num_correct", "pool", f"round{r}")[seed] for r in range(1, n + 1)
      )
      counts = ("num_labels", "label_reads", "labels_seen")
      rows.append(
        [arm, seed, n, *(int(last[c]) for c in counts), int(removed), int(last["num_remaining"])]
        + [results.meta["stop_reasons"][arm][str(seed)]]
      )
  return rows


def _plot_curves(results: Results, workdir: str) -> None:
  """Accuracy and worst-class accuracy against labels used, and against labels seen.

  Labels seen = labels used + distinct pool labels read; the full data is a flat line.
  """
  rounds = range(1, compared_rounds(results) + 1)
  several = len(results.seeds()) > 1
  for x_of, xlabel, suffix in (
    (labels_at, "labels used", "labels"),
    (seen_at, "labels seen (labels used + distinct pool labels read)", "labels_seen"),
  ):
    for metric, ylabel, stem in (
      ("accuracy", "test accuracy", "accuracy"),
      ("worst_class_accuracy", "worst-class accuracy", "worst_class"),
    ):
      curves = {}
      for name in [METHOD, *controls(results)]:
        s = [summary_at(results, name, metric, r) for r in rounds]
        reads = reads_at(results, compared_rounds(results), name)
        label = f"{name} ({reads:.0f} pool labels read)"
        xs = [x_of(results, r, name) for r in rounds]
        curves[label] = (xs, [x.mean for x in s], [x.std for x in s] if several else None)
      if FULL in results.arms():
        xs = [x for xs, _, _ in curves.values() for x in xs]
        full = [summary_at(results, FULL, metric, 1).mean] * 2
        curves[FULL + " (ceiling, 0 pool labels read)"] = ([min(xs), max(xs)], full, None)
      path = tables.plot_path(workdir, f"{stem}_vs_{suffix}.png")
      figures.plot_curves(curves, xlabel, ylabel, path)


def _setting(results: Results) -> str:
  meta = results.meta
  num_runs = len(results.seeds()) * len(results.arms())
  a = meta["a"] if meta["a"] is not None else "ceil(m/2)"
  mean_over = meta.get("mean_over", "pool")
  return (
    f"m = {meta['m']} per class and round, a = {a}, each class's mean norm over its "
    f"{'original set (the patent)' if mean_over == 'original' else 'current pool'}, norm "
    f"order p = {meta['norm_order']}, grouping by {meta['grouping']}, "
    f"{'warm start' if meta['warm_start'] else 'from scratch'}; "
    f"{meta['steps_per_round']} steps of batch {meta['batch_size']} per round, one compiled "
    f"train step for all {num_runs} runs (train-step compilations: "
    f"{meta['train_step_compilations']}). Stop conditions: {meta['stop_conditions']}, the "
    f"same for both loops. `{RANDOM_DRAW}` is the ablation: the same loop (steps 4-7, correct "
    "samples removed, same stop conditions and seeds) drawing its m per class at random, so "
    "the norm rule is the only difference. The baselines run at the norm loop's label budgets "
    "and never read a pool label; moderate coreset and max-entropy draw their first round "
    "class-balanced at random (they need a model), then use the current model. 'Labels used' "
    "counts training labels; 'pool labels read' counts the labels Step 5 reads to find the "
    "correctly classified pool samples (every remaining pool sample, every round; repeats "
    "counted). The full-data ceiling trains as many rounds as the seed's longest loop "
    "('train steps'). No hyperparameter was tuned on the test split: m, a, the stop "
    "conditions and the training settings are the config's presets.\n\n"
    f"{len(results.seeds())} seed(s) (model init, batch order and the random draws). Mean ± "
    "sample std (ddof = 1) over seeds, in %; one seed shows the mean alone. Verdicts are "
    "paired over seeds: the norm rule wins (loses) only when every per-seed difference is "
    "positive (negative) and the mean difference exceeds max(2 SE, 0.5 points); anything "
    "else, and any comparison with fewer than 2 seeds, is a tie. Each seed's baselines run at "
    "that seed's norm-loop budgets; the loops compare round by round (the random-draw loop's "
    "labels can differ when a class's pool runs short); counts are means over seeds."
  )


def _claim(results: Results, name: str, counts: dict[str, int]) -> str:
  """One sentence: the norm loop against one control, with the last round's numbers."""
  n = compared_rounds(results)
  last = [v for r, _, c, v in verdicts(results) if c == name and r == n][0]
  what = (
    "the norm rule's own effect (the same loop drawing at random)"
    if name == RANDOM_DRAW
    else f"{name} at equal labels used, which reads no pool label"
  )
  return (
    f"- vs {what}: the norm loop wins at {counts['wins']}, ties at {counts['ties']} and loses "
    f"at {counts['loses']} of {n} rounds; at the last round ({labels_at(results, n):.0f} vs "
    f"{labels_at(results, n, name):.0f} labels used, {reads_at(results, n):.0f} vs "
    f"{reads_at(results, n, name):.0f} pool labels read) it is "
    f"{100 * last.mean_diff:+.1f} points ({last.verdict})."
  )


def _honest(results: Results, within: float | None) -> str:
  n = compared_rounds(results)
  lines = [_claim(results, name, c) for name, c in verdict_counts(results).items()]
  if FULL in results.arms():
    full = summary_at(results, FULL, "accuracy", 1)
    if within is not None:
      verdict = f"The norm rule gets within 1 point of it at {within:.0f} labels."
    else:
      best = max(summary_at(results, METHOD, "accuracy", r).mean for r in range(1, n + 1))
      reasons = ", ".join(sorted({str(v) for v in results.meta["stop_reasons"][METHOD].values()}))
      verdict = (
        "The norm rule does not get within 1 point of it at any budget it reached "
        f"(best: {100 * best:.1f} %): the loop stopped at {labels_at(results, n):.0f} labels "
        f"({reasons})."
      )
    steps = summary_at(results, FULL, "train_steps", 1, "pool").mean
    lines.append(
      f"- Full data ({labels_at(results, 1, FULL):.0f} labels, {steps:.0f} steps): "
      f"{percent(full)} %. {verdict}"
    )
  return "\n".join(lines)


def write_report(results: Results, workdir: str) -> dict:
  """`report.md`, the two plots and `summary.json` from the results; returns the summary."""
  meta = results.meta
  n = compared_rounds(results)
  final_labels = labels_at(results, n)
  within = within_one_point_of_full(results)
  names = arms_in_order(results)
  per_class_rows = [
    [name]
    + [
      f"{100 * summary_at(results, name, f'class_{k}', n).mean:.0f}"
      for k in range(len(meta["class_names"]))
    ]
    for name in names
  ]
  verdict_rows = [
    [r, f"{labels:.0f}", name, f"{labels_at(results, r, name):.0f}"]
    + [f"{reads_at(results, r):.0f} / {reads_at(results, r, name):.0f}"]
    + [f"{100 * v.mean_diff:+.1f}", f"{100 * v.se:.1f}", v.verdict]
    for r, labels, name, v in verdicts(results)
  ]
  _plot_curves(results, workdir)
  tables.write_report(
    workdir,
    f"M2 norm-ranked selection loop on {meta['dataset']}",
    [
      ("Setting", _setting(results)),
      ("Where the norm rule wins, ties or loses", _honest(results, within)),
      (
        "Test accuracy per round (baselines at the norm loop's label budgets)",
        tables.markdown_table(ACCURACY_HEADER, accuracy_rows(results)),
      ),
      (
        "Norm loop minus each control, per round (paired over seeds)",
        tables.markdown_table(
          [
            "round",
            "labels used (norm)",
            "control",
            "labels used (control)",
            "pool labels read (norm / control)",
            "mean diff (points)",
            "SE (points)",
            "verdict",
          ],
          verdict_rows,
        ),
      ),
      (
        f"Per-class accuracy at the final budget ({final_labels:.0f} labels), %",
        tables.markdown_table(["strategy", *meta["class_names"]], per_class_rows),
      ),
      (
        "The loops per seed",
        tables.markdown_table(
          [
            "loop",
            "seed",
            "rounds",
            "labels used",
            "pool labels read",
            "labels seen (distinct)",
            "removed as correct",
            "pool left",
            "stop reason",
          ],
          loop_rows(results),
        ),
      ),
      (
        "Plots (legends give each arm's pool labels read)",
        "\n\n".join(
          f"![{stem} vs {x}](plots/{stem}_vs_{x}.png)"
          for x in ("labels", "labels_seen")
          for stem in ("accuracy", "worst_class")
        ),
      ),
    ],
  )
  metric = f"test acc. at {final_labels:.0f} labels"
  final = summary_at(results, METHOD, "accuracy", n).mean
  rows = []
  if RANDOM_DRAW in results.arms():
    same_loop = summary_at(results, RANDOM_DRAW, "accuracy", n).mean
    rows.append(tables.summary_row(metric, final, "random-draw loop (ablation)", same_loop))
  if "random" in results.arms():
    random = summary_at(results, "random", "accuracy", n).mean
    rows.append(tables.summary_row(metric, final, "random selection", random))
  if FULL in results.arms():
    full = summary_at(results, FULL, "accuracy", 1).mean
    full_name = f"full data ({labels_at(results, 1, FULL):.0f})"
    rows.append(tables.summary_row(metric, final, full_name, full))
  summary = {
    "experiment": EXPERIMENT,
    "dataset": meta["dataset"],
    "time_s": meta["time_s"],
    "num_seeds": len(results.seeds()),
    "train_step_compilations": meta["train_step_compilations"],
    "within_1_point_of_full_data_at": within,
    "verdicts": verdict_counts(results),
    "pool_labels_read": {name: reads_at(results, n, name) for name in [METHOD, *controls(results)]},
    "last_round": {
      name: {
        "mean_diff": v.mean_diff,
        "se": None if math.isnan(v.se) else v.se,
        "verdict": v.verdict,
        "diffs": list(v.diffs),
      }
      for r, _, name, v in verdicts(results)
      if r == n
    },
    "rows": rows,
  }
  tables.write_summary(workdir, summary)
  return summary
