"""The M5 report from saved `Results` alone: tables, the bar with paired verdicts, and plots.

Records (see `experiment.train_and_evaluate`): per (arm, seed), split `test` with one condition
per evaluation (`map50` and `map`, or `accuracy`) and split `train` with `steps`, `converged`
(1 or 0) and `loss` (the last interval's mean target loss). `meta` holds the setup, the data
facts and the arrays of the plots. Spreads are sample stds (ddof 1) and every verdict is
`study.stats.paired_verdict`: the bar is met only with paired wins.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from research.ot_perturbation.settings import CONDITIONS
from research.study import figures, stats, tables
from research.study.results import Results

ARM_NAMES = {
  "clean": "clean-only",
  "ot": "OT perturbation (this method)",
  "pgd": "PGD adv. training",
}
METRIC_LABELS = {"map50": "mAP@0.5", "accuracy": "accuracy"}
TIE_BAND = 0.005  # a mean gain of half a point or less is never a win
MAX_CLEAN_COST = 3.0  # points of the clean metric the method may lose and still meet the bar
DETECTION_SCORE = 0.3  # detections drawn from this score up


def headline_metric(results: Results) -> str:
  """`map50` for detection, `accuracy` for classification."""
  return "map50" if results.meta["task"] == "detection" else "accuracy"


def stops(results: Results, arm: str) -> list[dict]:
  """Per seed `{"stop_reason", "steps", "loss"}` of an arm's trainings, in seed order."""
  per_seed = {m: results.per_seed(arm, m, split="train") for m in ("converged", "steps", "loss")}
  return [
    {
      "stop_reason": "converged" if per_seed["converged"][seed] else "step_limit",
      "steps": int(per_seed["steps"][seed]),
      "loss": per_seed["loss"][seed],
    }
    for seed in per_seed["steps"]
  ]


def _summaries(results: Results, arm: str, metrics: list[str]) -> dict[str, dict]:
  """`{condition: {metric: SeedSummary}}` of an arm's test metrics."""
  return {
    c: {m: stats.summarize(results.values(arm, m, condition=c)) for m in metrics}
    for c in CONDITIONS
  }


def _cell(s: stats.SeedSummary) -> str:
  """`mean ± std` with 4 decimals; a single seed has no spread."""
  return f"{s.mean:.4f} ± {s.std:.4f}" if s.n > 1 else f"{s.mean:.4f} (n={s.n})"


def bar(results: Results, metric: str) -> dict:
  """The bar against clean-only training, in metric points (x100), with paired verdicts.

  Met only when the method wins paired (`stats.paired_verdict`, tie band `TIE_BAND`) under the
  OT attack and under PGD, at a mean clean cost of at most `MAX_CLEAN_COST` points.

  Returns:
    `{"met", "gain_ot_attack", "gain_pgd", "clean_cost", "verdicts", "text"}`; `met` is None
    when clean-only training was not run.
  """
  if "clean" not in results.arms():
    return {"met": None, "text": "clean-only training was not run."}
  verdicts = {
    c: stats.paired_verdict(
      results.per_seed("ot", metric, condition=c),
      results.per_seed("clean", metric, condition=c),
      min_effect=TIE_BAND,
    )
    for c in ("ot_attack", "pgd", "clean")
  }
  gain_ot, gain_pgd = (100 * np.array(verdicts[c].diffs) for c in ("ot_attack", "pgd"))
  cost = -100 * np.array(verdicts["clean"].diffs)
  wins = all(verdicts[c].verdict == stats.WINS for c in ("ot_attack", "pgd"))
  met = bool(wins and cost.mean() <= MAX_CLEAN_COST)
  text = (
    f"robust gain under OT attack {gain_ot.mean():+.2f} points ({verdicts['ot_attack'].verdict}; "
    f"per seed {np.round(gain_ot, 2).tolist()}), under PGD {gain_pgd.mean():+.2f} points "
    f"({verdicts['pgd'].verdict}; per seed {np.round(gain_pgd, 2).tolist()}), clean cost "
    f"{cost.mean():+.2f} points (per seed {np.round(cost, 2).tolist()}): bar "
    f"{'met' if met else 'NOT met'} over {len(gain_ot)} seed(s) (met needs paired wins under "
    f"both attacks and a mean clean cost <= {MAX_CLEAN_COST:g} points)."
  )
  return {
    "met": met,
    "gain_ot_attack": float(gain_ot.mean()),
    "gain_pgd": float(gain_pgd.mean()),
    "clean_cost": float(cost.mean()),
    "verdicts": {c: verdicts[c].verdict for c in ("ot_attack", "pgd")},
    "text": text,
  }


def results_table(results: Results, metrics: list[str]) -> str:
  """One row per arm: stop reasons, steps per seed, mean ± std per condition and metric."""
  header = ["training", "stops", "steps"] + [f"{c} {m}" for c in CONDITIONS for m in metrics]
  rows = []
  for arm in results.arms():
    arm_stops = stops(results, arm)
    s = _summaries(results, arm, metrics)
    rows.append(
      [
        ARM_NAMES[arm],
        ", ".join(x["stop_reason"] for x in arm_stops),
        ", ".join(str(x["steps"]) for x in arm_stops),
      ]
      + [_cell(s[c][m]) for c in CONDITIONS for m in metrics]
    )
  return tables.markdown_table(header, rows)


def setup_text(results: Results) -> str:
  """The setup sentence of the report."""
  s = results.meta["setup"]
  return (
    f"eps={s['eps']:.4g}, alpha={s['alpha']:.4g}, k={s['ascent_steps']} training ascent "
    f"steps; {s['attack_steps']} attack steps of {s['attack_alpha']:.4g}; vectors="
    f"{s['vectors']}, cost={s['cost']}, Sinkhorn {s['sinkhorn_iterations']} fixed iterations, "
    f"perturbed_only={s['perturbed_only']}; loss threshold {s['loss_threshold']}, step limit "
    f"{s['steps']}; seeds {results.seeds()}; {results.meta['test_images']} test images."
  )


def write_report(results: Results, workdir: str) -> dict:
  """`report.md`, plots and `summary.json` from the results alone; returns the summary."""
  meta = results.meta
  metric = headline_metric(results)
  label = METRIC_LABELS[metric]
  arms = results.arms()
  seeds = results.seeds()
  metrics = list(dict.fromkeys(r.metric for r in results.select(split="test", condition="clean")))
  summaries = {arm: _summaries(results, arm, metrics) for arm in arms}
  means = {
    a: {c: {m: s.mean for m, s in ms.items()} for c, ms in v.items()} for a, v in summaries.items()
  }
  figures.plot_bars(
    {ARM_NAMES[a]: [means[a][c][metric] for c in CONDITIONS] for a in arms},
    CONDITIONS,
    label,
    tables.plot_path(workdir, "robustness.png"),
  )
  plots = ["![robustness](plots/robustness.png)"]
  drawn = meta.get("plots", {})
  if "transport_plan" in drawn:
    plan = drawn["transport_plan"]
    plot_transport_plan(plan["plan"], plan["cost"], tables.plot_path(workdir, "transport_plan.png"))
    plots.append("![plan](plots/transport_plan.png)")
  if "detections" in drawn:
    path = tables.plot_path(workdir, "detections.png")
    plot_detections(drawn["detections"], meta["class_names"], path)
    plots.append("![detections](plots/detections.png)")
  the_bar = bar(results, metric)
  tables.write_report(
    workdir,
    f"M5 OT-matched perturbation training ({meta['task']}, {meta['dataset']})",
    [
      ("Setup", setup_text(results)),
      ("Results (mean ± sample std over seeds)", results_table(results, metrics)),
      ("Bar (robust metric above clean-only at <= 3 points clean cost)", the_bar["text"]),
      ("Plots", "\n\n".join(plots)),
    ],
  )
  base = "clean" if "clean" in arms else "ot"
  base_name = "clean-only" if base == "clean" else "not run (this method)"
  out = {
    "experiment": results.experiment,
    "task": meta["task"],
    "dataset": meta["dataset"],
    "time_s": meta.get("time_s", 0.0),
    "seeds": seeds,
    "metrics": means,
    "metrics_std": {
      a: {c: {m: s.std for m, s in ms.items()} for c, ms in v.items()} for a, v in summaries.items()
    },
    "metrics_per_seed": {
      a: [
        {c: {m: results.per_seed(a, m, condition=c)[seed] for m in metrics} for c in CONDITIONS}
        for seed in seeds
      ]
      for a in arms
    },
    "stops": {a: stops(results, a) for a in arms},
    "bar": {k: v for k, v in the_bar.items() if k != "text"},
    "rows": [
      tables.summary_row(
        f"{label} under {c}", means["ot"][c][metric], base_name, means[base][c][metric]
      )
      for c in ("ot_attack", "pgd", "clean")
    ],
  }
  tables.write_summary(workdir, out)
  return out


# --------------------------------------------------------------------------------------------
# Plots.


def plot_detections(detections: dict[str, Any], class_names: list[str], path: str) -> str:
  """Detections (score >= `DETECTION_SCORE`) on clean vs attacked images, ground truth dashed.

  Args:
    detections: `{"ground_truth": per image {"boxes" [n, 4], "classes" [n]}, condition: per
      image {"image" ({"shape", "uint8_base64"}), "boxes" [top_k, 4], "scores" [top_k],
      "classes"}}`.
    class_names: K names.
    path: the PNG to write.
  """
  import matplotlib.pyplot as plt  # noqa: PLC0415 - figures set the Agg backend.

  conditions = [c for c in ("clean", "ot_attack", "pgd") if c in detections]
  truth = detections["ground_truth"]
  n = len(truth)
  colours = figures.class_palette(len(class_names))
  fig, axes = plt.subplots(len(conditions), n, figsize=(2.2 * n, 2.3 * len(conditions)))
  axes = np.asarray(axes).reshape(len(conditions), n)
  for r, condition in enumerate(conditions):
    for i, ex in enumerate(detections[condition]):
      ax = axes[r, i]
      ax.imshow(decode_image(ex["image"]))
      ax.axis("off")
      for box, cls in zip(truth[i]["boxes"], truth[i]["classes"], strict=True):
        ax.add_patch(_rect(box, colours[cls], "--"))
      for box, s, cls in zip(ex["boxes"], ex["scores"], ex["classes"], strict=True):
        if s >= DETECTION_SCORE:
          ax.add_patch(_rect(box, colours[cls], "-"))
      if i == 0:
        ax.set_title(condition, fontsize=8, loc="left")
  fig.suptitle("detections (solid) and ground truth (dashed)", fontsize=8)
  return figures.save_figure(fig, path)


def decode_image(image: dict) -> np.ndarray:
  """`[H, W, C]` uint8 from `{"shape", "uint8_base64"}` (the experiment's compact encoding)."""
  data = base64.b64decode(image["uint8_base64"])
  return np.frombuffer(data, np.uint8).reshape(image["shape"])


def _rect(box, colour, style) -> Any:
  from matplotlib import patches  # noqa: PLC0415

  x0, y0, x1, y1 = box
  return patches.Rectangle(
    (x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linestyle=style, linewidth=1
  )


def plot_transport_plan(plan: Any, cost: Any, path: str) -> str:
  """The OT plan P* and the cost matrix C (`[B, B]`) between clean and perturbed vector sets."""
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), gridspec_kw={"wspace": 0.45})
  for ax, (title, m) in zip(axes, (("plan P*", plan), ("cost C", cost)), strict=True):
    im = ax.imshow(np.asarray(m), cmap="viridis")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("perturbed j")
    ax.set_ylabel("clean i")
    fig.colorbar(im, ax=ax, fraction=0.046)
  return figures.save_figure(fig, path)
