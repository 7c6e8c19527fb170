"""The M5 report from saved `Results` alone: tables, verdicts, the bar, and plots.

Records (see `experiment.train_and_evaluate`): per (arm, seed), split `test` with one condition
per evaluation (`map50` and `map`, or `accuracy`) and split `train` with `steps`, `converged`
(1 or 0), `loss` (the arm's own target loss on the convergence batch at the end) and `time_s`.
`meta` holds the setup, the data facts and the arrays of the plots. Spreads are sample stds
(ddof 1) and every verdict is `study.stats.paired_verdict` (a win needs every per-seed
difference positive and the mean above 2 standard errors): the bar is met only with paired
wins, and a positive mean that is a paired tie is reported as a tie.
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
  "ot_redraw": "OT perturbation, set redrawn every step",
  "pgd": "PGD adv. training",
}
METHOD_ARMS = ("ot", "ot_redraw")
METRIC_LABELS = {"map50": "mAP@0.5", "accuracy": "accuracy"}
ATTACKS = ("ot_attack", "pgd")
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


def _verdict(results: Results, arm: str, baseline: str, metric: str, condition: str):
  return stats.paired_verdict(
    results.per_seed(arm, metric, condition=condition),
    results.per_seed(baseline, metric, condition=condition),
  )


def bar(results: Results, metric: str, arm: str = "ot") -> dict:
  """The bar of `arm` against clean-only training, in metric points (x100), paired verdicts.

  Met only when the arm wins paired under the OT attack and under PGD, at a mean clean cost of
  at most `MAX_CLEAN_COST` points.

  Returns:
    `{"met", "gain_ot_attack", "gain_pgd", "clean_cost", "verdicts", "text"}`; `met` is None
    when clean-only training or the arm was not run.
  """
  if "clean" not in results.arms() or arm not in results.arms():
    return {"met": None, "text": f"{ARM_NAMES[arm]} or clean-only training was not run."}
  verdicts = {c: _verdict(results, arm, "clean", metric, c) for c in (*ATTACKS, "clean")}
  gain_ot, gain_pgd = (100 * np.array(verdicts[c].diffs) for c in ATTACKS)
  cost = -100 * np.array(verdicts["clean"].diffs)
  wins = all(verdicts[c].verdict == stats.WINS for c in ATTACKS)
  met = bool(wins and cost.mean() <= MAX_CLEAN_COST)
  text = (
    f"{ARM_NAMES[arm]}: robust gain under the OT attack {gain_ot.mean():+.2f} points "
    f"({verdicts['ot_attack'].verdict}; per seed {np.round(gain_ot, 2).tolist()}), under PGD "
    f"{gain_pgd.mean():+.2f} points ({verdicts['pgd'].verdict}; per seed "
    f"{np.round(gain_pgd, 2).tolist()}), clean cost {cost.mean():+.2f} points (per seed "
    f"{np.round(cost, 2).tolist()}): bar {'met' if met else 'NOT met'} over {len(gain_ot)} "
    f"seed(s) (met needs paired wins under both attacks and a mean clean cost <= "
    f"{MAX_CLEAN_COST:g} points)."
  )
  return {
    "met": met,
    "gain_ot_attack": float(gain_ot.mean()),
    "gain_pgd": float(gain_pgd.mean()),
    "clean_cost": float(cost.mean()),
    "verdicts": {c: verdicts[c].verdict for c in (*ATTACKS, "clean")},
    "text": text,
  }


def verdicts_table(results: Results, metric: str) -> str:
  """Each OT arm against every other arm, per condition: both means, diff (points), verdict."""
  arms = results.arms()
  rows = []
  for arm in (a for a in METHOD_ARMS if a in arms):
    for baseline in (b for b in ("clean", "pgd", "ot") if b in arms and b != arm):
      for c in CONDITIONS:
        v = _verdict(results, arm, baseline, metric, c)
        rows.append(
          [
            ARM_NAMES[arm],
            ARM_NAMES[baseline],
            c,
            f"{100 * v.mean_diff:+.2f}" if v.n else "n/a",
            f"{200 * v.se:.2f}" if v.n > 1 else "n/a",
            f"{v.verdict}" if v.n > 1 else "ties (fewer than 2 seeds)",
          ]
        )
  header = ["method", "baseline", "condition", "diff (points)", "2 SE", "paired verdict"]
  return tables.markdown_table(header, rows)


def against_pgd_text(results: Results, metric: str) -> str:
  """Where this method loses to (or ties, or beats) PGD adversarial training, in one line each."""
  arms = results.arms()
  if "pgd" not in arms:
    return "PGD adversarial training was not run."
  lines = []
  for arm in (a for a in METHOD_ARMS if a in arms):
    by = {c: _verdict(results, arm, "pgd", metric, c) for c in CONDITIONS}
    parts = [f"{c} {100 * v.mean_diff:+.2f} points ({v.verdict})" for c, v in by.items()]
    lost = [c for c, v in by.items() if v.verdict == stats.LOSES]
    lines.append(
      f"{ARM_NAMES[arm]} vs PGD-AT: {'; '.join(parts)}. "
      + (f"It loses to PGD-AT under: {', '.join(lost)}." if lost else "It loses nowhere paired.")
    )
  return "\n\n".join(lines)


def results_table(results: Results, metrics: list[str]) -> str:
  """One row per arm: stops, steps and final target loss per seed, mean ± std per condition."""
  header = ["training", "stops", "steps", "target loss"]
  header += [f"{c} {m}" for c in CONDITIONS for m in metrics]
  rows = []
  for arm in results.arms():
    arm_stops = stops(results, arm)
    s = _summaries(results, arm, metrics)
    rows.append(
      [
        ARM_NAMES[arm],
        ", ".join(x["stop_reason"] for x in arm_stops),
        ", ".join(str(x["steps"]) for x in arm_stops),
        ", ".join(f"{x['loss']:.3g}" for x in arm_stops),
      ]
      + [_cell(s[c][m]) for c in CONDITIONS for m in metrics]
    )
  return tables.markdown_table(header, rows)


def setup_text(results: Results) -> str:
  """The setup sentence of the report."""
  s = results.meta["setup"]
  return (
    f"eps={s['eps']:.4g}, alpha={s['alpha']:.4g}, k={s['ascent_steps']} training ascent "
    f"steps; {s['attack_steps']} attack steps of {s['attack_alpha']:.4g}, the OT attack over "
    f"groups of {s.get('ot_group_size', 'n/a')} test images (padding rows weigh 0); vectors="
    f"{s['vectors']}, cost={s['cost']}, Sinkhorn {s['sinkhorn_iterations']} fixed iterations, "
    f"perturbed_only={s['perturbed_only']}, perturbed set {s.get('initial_set', 'n/a')} for "
    f"the method; stop: each arm's own target loss at the current parameters on the first "
    f"{s.get('convergence_batch_size', 'n/a')} training images <= {s['loss_threshold']} at "
    f"a log point, else the step limit {s['steps']}; seeds {results.seeds()}; "
    f"{results.meta['test_images']} test images."
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
  bars = {arm: bar(results, metric, arm) for arm in METHOD_ARMS if arm in arms}
  tables.write_report(
    workdir,
    f"M5 OT-matched perturbation training ({meta['task']}, {meta['dataset']})",
    [
      ("Setup", setup_text(results)),
      ("Results (mean ± sample std over seeds)", results_table(results, metrics)),
      (
        f"Bar ({label} under both attacks above clean-only, paired wins, at <= "
        f"{MAX_CLEAN_COST:g} points clean cost)",
        "\n\n".join(b["text"] for b in bars.values()),
      ),
      (f"Paired verdicts ({label}, points)", verdicts_table(results, metric)),
      ("Against PGD adversarial training", against_pgd_text(results, metric)),
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
    "bar": {k: v for k, v in bars["ot"].items() if k != "text"},
    "bar_by_arm": {a: {k: v for k, v in b.items() if k != "text"} for a, b in bars.items()},
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


def encode_image(image: np.ndarray) -> dict:
  """`{"shape", "uint8_base64"}` of a uint8 `[H, W, C]` image (compact JSON for `meta`)."""
  data = base64.b64encode(np.ascontiguousarray(image, np.uint8).tobytes()).decode("ascii")
  return {"shape": list(image.shape), "uint8_base64": data}


def rounded(a: Any) -> list:
  """`a` as nested lists of floats with 5 significant digits (compact JSON for plots)."""
  return np.vectorize(lambda v: float(f"{v:.5g}"))(np.asarray(a, np.float64)).tolist()


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
