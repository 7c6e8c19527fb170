"""The M1 report as pure functions of `Results`: bars, tables, figures, `summary.json`.

The records of the experiment are `(arm, seed, split, condition, metric, value)` with
  arm:       `baseline` (the supervised segmenter), `adv` (adversarially trained on 1:1 clean
             and `clip(x + R)`), `control` (fine-tuned the same steps on clean images only);
  split:     `<dataset> (held-out images)`, `<domain> (held-out domain)`, or `<dataset>` for
             the attack's own training images (condition `r_n`);
  condition: `clean`, `R` (the unified perturbation of the baseline), `noise` (random signs of
             the same L-inf norm), `R'` (a fresh unified perturbation of the adv. model), `r_n`;
  metric:    `miou`, `pixel_accuracy`, `success`, `flip_rate`, `success/<src>-><tgt>`,
             `iou/<class>`.
Every number shown is the mean over seeds (`study.stats.summarize`) of a per-seed value; a
bar is computed per seed first (e.g. a ratio of two group means), then averaged.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from research.study import figures, stats, tables
from research.study.results import Results, load_arrays

EXPERIMENT = "uap_segmentation"
BASELINE, ADV, CONTROL = "baseline", "adv", "control"
TUNING = "tuning"  # records `gamma_scale`, `eps_r` chosen per seed (split and condition `-`)
HELD_IN, HELD_OUT = "(held-out images)", "(held-out domain)"
VALIDATION = "(validation)"
GROUPS = {"held-out images": HELD_IN, "held-out domain": HELD_OUT}
TRAIN_R_N = "r_n"
# Baseline conditions beside `R` (each with the validated gamma and eps_r unless it says so).
R_NO_RANDOM = "R without random term"  # eps_r = 0 (claims 3/7's term off)
R_GAMMA_XI = "R with gamma = xi"  # METHODS.md's default gamma instead of the validated one
R_NO_ROUND = "R from attack without in-round term"  # claim 5's eps_round = 0
R_OTHER_PIXELS = "R from attack with other correct_pixels"  # 'partner' <-> 'all'


def tune_label(gamma_scale: float, eps_r: float) -> str:
  """The condition of one validation grid point, e.g. `gamma=4xi, eps_r=1/255`."""
  return f"gamma={gamma_scale:g}xi, eps_r={eps_r * 255:g}/255"


PERTURBATIONS = "perturbations.npz"
SPLIT_METRICS = ("miou", "pixel_accuracy", "success", "flip_rate")  # logged per evaluation

VERDICT_NOTES = (
  "A verdict is `study.stats.paired_verdict` on the per-seed values: the method wins only "
  "when every per-seed difference favours it and the mean difference exceeds 2 standard "
  "errors; a positive mean that one seed contradicts is a tie. `diff` is method - control "
  "(raw); the number in the verdict is oriented (positive = better for the method). "
  "'Targeted success' is from the attacker's side (higher = the element "
  "helps the attack); for the adversarially trained model it is oriented the other way "
  "(lower = better defence). Every R uses the gamma and eps_r chosen on the validation split "
  "of its seed, except the row that compares with METHODS.md's default gamma = xi."
)

BAR_NOTES = (
  "Targeted success is the fraction of `src` pixels predicted `tgt`; it includes the model's "
  "clean confusion (the `clean` rows), which the noise control also keeps, so the raw ratio "
  "R / noise is bounded by roughly 1 / (clean success). The flip rate counts only `src` pixels "
  "the model does not already call `tgt` on the clean image and that flip to `tgt` under the "
  "perturbation; the ratio can never exceed 1 / (noise success), the ceiling column. "
  "Recovered / taken is (mIoU under R after adversarial training - mIoU under R "
  "before) / (clean mIoU before - mIoU under R before); it also contains whatever the extra "
  "training steps improve on their own, which the clean fine-tune control (the same steps, "
  "optimizer and batches on clean images only) measures. "
  "The noise control has the L-inf norm of R but, being +-||R||_inf everywhere, a larger L2 norm."
)


def label(arm: str, condition: str) -> str:
  """The name of an (arm, condition) in tables and `summary.json`: `R`, `adv R'`, ..."""
  return condition if arm == BASELINE else f"{arm} {condition}"


def eval_splits(results: Results) -> list[str]:
  """The evaluation splits (held-out images, then held-out domain), in record order."""
  return list(dict.fromkeys(r.split for r in results.select(arm=BASELINE, condition="clean")))


def seed_mean(results: Results, arm: str, condition: str, split: str, metric: str) -> float:
  """Mean over seeds of one number."""
  return stats.summarize(results.values(arm, metric, split, condition)).mean


def group_mean(
  results: Results, seed: int, arm: str, condition: str, splits: list[str], metric: str
) -> float:
  """One seed's mean of a metric over splits."""
  return float(np.mean([results.per_seed(arm, metric, s, condition)[seed] for s in splits]))


def seed_bars(results: Results, seed: int, splits: list[str]) -> dict[str, float]:
  """The issue bars of one seed over one group of splits (see `BAR_NOTES`)."""

  def g(arm: str, condition: str, metric: str) -> float:
    return group_mean(results, seed, arm, condition, splits, metric)

  r_success, noise_success = g(BASELINE, "R", "success"), g(BASELINE, "noise", "success")
  r_flip, noise_flip = g(BASELINE, "R", "flip_rate"), g(BASELINE, "noise", "flip_rate")
  clean, under_r = g(BASELINE, "clean", "miou"), g(BASELINE, "R", "miou")
  taken = clean - under_r
  recovered = g(ADV, "R", "miou") - under_r
  recovered_control = g(CONTROL, "R", "miou") - under_r
  return {
    "success_R": r_success,
    "success_noise": noise_success,
    "success_clean": g(BASELINE, "clean", "success"),
    "success_ratio": r_success / max(noise_success, 1e-12),
    "success_ratio_ceiling": 1.0 / max(noise_success, 1e-12),
    "flip_rate_R": r_flip,
    "flip_rate_noise": noise_flip,
    "flip_ratio": r_flip / max(noise_flip, 1e-12),
    "miou_taken_by_R": taken,
    "miou_recovered": recovered,
    "recovered_fraction": recovered / taken if taken > 0 else float("nan"),
    "recovered_fraction_control": recovered_control / taken if taken > 0 else float("nan"),
    "clean_miou_cost": clean - g(ADV, "clean", "miou"),
    "clean_miou_cost_vs_control": g(CONTROL, "clean", "miou") - g(ADV, "clean", "miou"),
  }


def bars(results: Results) -> dict[str, dict[str, float]]:
  """`{group: {bar: mean over seeds}}` for the held-out images and the held-out domain."""
  splits = eval_splits(results)
  out = {}
  for group, suffix in GROUPS.items():
    members = [s for s in splits if s.endswith(suffix)]
    per_seed = [seed_bars(results, seed, members) for seed in results.seeds()]
    out[group] = {k: stats.summarize([b[k] for b in per_seed]).mean for k in per_seed[0]}
  return out


def per_class_iou(results: Results) -> dict[str, list[float]]:
  """Per-class IoU averaged over the evaluation splits (then seeds), per shown condition."""
  splits, names = eval_splits(results), results.meta["class_names"]
  shown = {
    "clean": (BASELINE, "clean"),
    "under R": (BASELINE, "R"),
    "noise": (BASELINE, "noise"),
    "adv. trained, under R": (ADV, "R"),
    "adv. trained, clean": (ADV, "clean"),
  }
  return {
    title: [
      stats.summarize(
        [group_mean(results, seed, arm, cond, splits, f"iou/{n}") for seed in results.seeds()]
      ).mean
      for n in names
    ]
    for title, (arm, cond) in shown.items()
  }


def split_metrics(results: Results) -> dict[str, dict[str, dict]]:
  """`{label: {split: {miou, pixel_accuracy, success, success_per_pair, flip_rate}}}`."""
  out: dict[str, dict[str, dict]] = {}
  splits = set(eval_splits(results))
  for arm in (BASELINE, ADV, CONTROL):
    conditions = dict.fromkeys(r.condition for r in results.select(arm=arm) if r.split in splits)
    for cond in conditions:
      out[label(arm, cond)] = {
        s: {
          **{m: seed_mean(results, arm, cond, s, m) for m in ("miou", "pixel_accuracy", "success")},
          "success_per_pair": [
            seed_mean(results, arm, cond, s, f"success/{p}") for p in results.meta["pairs"]
          ],
          "flip_rate": seed_mean(results, arm, cond, s, "flip_rate"),
        }
        for s in eval_splits(results)
      }
  return out


@dataclasses.dataclass(frozen=True)
class Comparison:
  """One paired comparison of the study: `method` against `control`, both `(arm, condition)`.

  Attributes:
    claim: the patent element it isolates.
    metric: the record metric (`success`, `miou`, `flip_rate`, ...).
    shown: how the metric is named in the table.
    method: `(arm, condition)` of the side with the patent's element.
    control: `(arm, condition)` of the side without it.
    higher_is_better: orientation of the verdict (from the method's side).
  """

  claim: str
  metric: str
  shown: str
  method: tuple[str, str]
  control: tuple[str, str]
  higher_is_better: bool = True


def study_comparisons(meta: dict) -> list[Comparison]:
  """Every paired comparison the report judges (METHODS.md M1 "Measure", issue 16)."""
  b, r = BASELINE, (BASELINE, "R")
  partner_side = (b, R_OTHER_PIXELS) if meta["attack"]["correct_pixels"] == "all" else r
  all_side = r if partner_side != r else (b, R_OTHER_PIXELS)
  steps_1_5 = "steps 1-5: unified R vs equal-L-inf sign noise"
  steps_6_7 = "steps 6-7: adversarial training vs clean fine-tune control"
  return [
    Comparison(steps_1_5, "success", "targeted success", r, (b, "noise")),
    Comparison(steps_1_5, "flip_rate", "flip rate", r, (b, "noise")),
    Comparison(steps_1_5, "miou", "mIoU (lower: more damage)", r, (b, "noise"), False),
    Comparison(
      "claim 5: random term in every round", "success", "targeted success", r, (b, R_NO_ROUND)
    ),
    Comparison("claims 3/7: random term in R", "success", "targeted success", r, (b, R_NO_RANDOM)),
    Comparison("gamma validated vs gamma = xi", "success", "targeted success", r, (b, R_GAMMA_XI)),
    Comparison(
      "dependent claim: partner pixels vs all",
      "success",
      "targeted success",
      partner_side,
      all_side,
    ),
    Comparison(
      "dependent claim: partner pixels vs all",
      "miou",
      "mIoU (higher: stealthier)",
      partner_side,
      all_side,
    ),
    Comparison(steps_6_7, "miou", "mIoU under R", (ADV, "R"), (CONTROL, "R")),
    Comparison(steps_6_7, "miou", "mIoU under own fresh R'", (ADV, "R'"), (CONTROL, "R'")),
    Comparison(steps_6_7, "miou", "clean mIoU", (ADV, "clean"), (CONTROL, "clean")),
    Comparison(steps_6_7, "success", "targeted success under R", (ADV, "R"), (CONTROL, "R"), False),
    Comparison(
      steps_6_7, "success", "targeted success under own R'", (ADV, "R'"), (CONTROL, "R'"), False
    ),
  ]


def group_per_seed(results: Results, arm: str, condition: str, splits: list[str], metric: str):
  """`{seed: mean over splits}` of the seeds that have every split (empty if none)."""
  per_split = [results.per_seed(arm, metric, s, condition) for s in splits]
  seeds = set.intersection(*(set(p) for p in per_split)) if per_split else set()
  return {seed: float(np.mean([p[seed] for p in per_split])) for seed in sorted(seeds)}


def comparison_rows(results: Results) -> list[dict]:
  """Each `study_comparisons` row per group: mean ± std of both sides and the paired verdict.

  Rows whose conditions the run left out (an ablation not configured) are skipped.
  """
  splits, rows = eval_splits(results), []
  for group, suffix in GROUPS.items():
    members = [s for s in splits if s.endswith(suffix)]
    for c in study_comparisons(results.meta):
      method = group_per_seed(results, *c.method, members, c.metric)
      control = group_per_seed(results, *c.control, members, c.metric)
      if not method or not control:
        continue
      verdict = stats.paired_verdict(method, control, higher_is_better=c.higher_is_better)
      rows.append(
        {
          "group": group,
          "claim": c.claim,
          "metric": c.shown,
          "method": label(*c.method),
          "control": label(*c.control),
          "method_value": stats.summarize(list(method.values())),
          "control_value": stats.summarize(list(control.values())),
          "verdict": verdict,
          "diff": verdict.mean_diff * (1.0 if c.higher_is_better else -1.0),  # method - control
        }
      )
  return rows


def tuning_table(results: Results) -> tuple[list[list], dict[int, tuple[float, float]]]:
  """The validation table and the chosen `{seed: (gamma_scale, eps_r)}`.

  One row per grid point: success, flip rate and mIoU (mean ± std over seeds of the mean over
  the validation datasets) and how many seeds chose it.
  """
  chosen = {
    seed: (g, results.per_seed(TUNING, "eps_r")[seed])
    for seed, g in results.per_seed(TUNING, "gamma_scale").items()
  }
  val_splits = list(dict.fromkeys(r.split for r in results.records if r.split.endswith(VALIDATION)))
  rows = []
  for g in results.meta["tune"]["gamma_scales"]:
    for e in results.meta["tune"]["eps_rs"]:
      cond = tune_label(g, e)
      cells = []
      for metric in ("success", "flip_rate", "miou"):
        per_seed = group_per_seed(results, BASELINE, cond, val_splits, metric)
        cells.append(stats.format_mean_std(stats.summarize(list(per_seed.values()))))
      times = sum(1 for v in chosen.values() if np.allclose(v, (g, e)))
      rows.append([cond, *cells, times])
  return rows, chosen


def train_success(results: Results, arm: str) -> dict[str, float]:
  """Mean targeted success of the per-sample `r_n` on each dataset's attacked images."""
  return {d: seed_mean(results, arm, TRAIN_R_N, d, "success") for d in results.meta["datasets"]}


def amplified(perturbation: np.ndarray) -> np.ndarray:
  """`0.5 + R / (2 ||R||_inf)` in [0, 1]: a perturbation made visible."""
  radius = max(float(np.max(np.abs(perturbation))), 1e-12)
  return np.clip(0.5 + perturbation / (2.0 * radius), 0.0, 1.0)


def _plots(results: Results, workdir: str, per_class: dict[str, list[float]]) -> str:
  meta, k = results.meta, len(results.meta["class_names"])
  perts = load_arrays(workdir, PERTURBATIONS)
  titles = [f"r_D {n}" for n in meta["datasets"]]
  titles += ["R", "R' (vs adv. model)", "R' (vs control)", "noise control"]
  panels = [*perts["r_ds"], perts["R"], perts["R'_adv"], perts["R'_control"], perts["noise"]]
  rows = [(" | ".join(titles) + " (amplified)", [amplified(p) for p in panels])]
  figures.plot_segmentation_rows(rows, k, tables.plot_path(workdir, "perturbations.png"))
  arrays = load_arrays(workdir)
  overlay_rows = []
  for j, name in enumerate(meta["overlay_splits"]):
    order = ("image", "perturbed", "truth", "clean", "R", "adv_R")
    for i in range(len(arrays[f"{j}/image"])):
      overlay_rows.append(
        (
          f"{name} {i}: input | +R | truth | pred clean | pred under R | adv-trained under R",
          [arrays[f"{j}/{p}"][i] for p in order],
        )
      )
  figures.plot_segmentation_rows(overlay_rows, k, tables.plot_path(workdir, "overlays.png"))
  figures.plot_bars(
    per_class, meta["class_names"], "IoU", tables.plot_path(workdir, "per_class_iou.png")
  )
  return (
    "![perturbations](plots/perturbations.png)\n\n![overlays](plots/overlays.png)\n\n"
    "![per-class IoU](plots/per_class_iou.png)"
  )


def _setup(results: Results, workdir: str, chosen: dict) -> str:
  meta, a = results.meta, results.meta["attack"]
  perts = load_arrays(workdir, PERTURBATIONS)
  l2_ratio = np.linalg.norm(perts["R"]) / max(np.linalg.norm(perts["noise"]), 1e-12)
  picks = ", ".join(f"seed {s}: {tune_label(g, e)}" for s, (g, e) in chosen.items())
  return (
    f"{len(results.seeds())} seeds ({', '.join(map(str, results.seeds()))}). "
    f"M = {len(meta['datasets'])} datasets ({', '.join(meta['datasets'])}); "
    f"pairs {', '.join(meta['pairs'])}; "
    f"xi = {a['xi']:.4f} ({a['xi'] * 255:.1f}/255), alpha = {a['alpha'] * 255:.1f}/255, "
    f"{a['rounds']} rounds, in-round random term eps_round = {a['eps_round'] * 255:g}/255, "
    f"correct pixels '{a['correct_pixels']}', {a['images_per_dataset']} images per dataset, "
    f"weights {a['weight_mode']}, norm {a['norm']}. gamma and eps_r of R chosen per seed by "
    f"targeted success on validation images carved from the training datasets "
    f"({meta['tune']['val_images']} images; never trained on, attacked or in the headline): "
    f"{picks}. First seed's "
    f"||R||_inf = {np.max(np.abs(perts['R'])) * 255:.2f}/255, ||R||_2 / ||noise||_2 = "
    f"{l2_ratio:.3f}. Per-dataset success of the per-sample r_n on attacked training images: "
    + ", ".join(f"{n} {v:.3f}" for n, v in train_success(results, BASELINE).items())
    + f". Adversarial training: {meta['adv_train']['steps']} steps, second-sample ratio "
    f"{meta['adv_train']['ratio']}."
  )


def _comparison_table(rows: list[dict]) -> str:
  fmt = stats.format_mean_std
  return tables.markdown_table(
    [
      "group",
      "claim",
      "metric",
      "method",
      "control",
      "method value",
      "control value",
      "diff",
      "verdict",
    ],
    [
      [
        r["group"],
        r["claim"],
        r["metric"],
        r["method"],
        r["control"],
        fmt(r["method_value"]),
        fmt(r["control_value"]),
        f"{r['diff']:+.4f}",
        str(r["verdict"]),
      ]
      for r in rows
    ],
  )


BASELINE_SHOWN = (
  ("clean", "clean"),
  ("R", "unified R"),
  (R_NO_RANDOM, R_NO_RANDOM),
  (R_GAMMA_XI, R_GAMMA_XI),
  ("noise", "noise control"),
  (R_NO_ROUND, R_NO_ROUND),
  (R_OTHER_PIXELS, R_OTHER_PIXELS),
)
ADV_COLUMNS = (
  ("clean", "miou", "mIoU clean (before)"),
  ("R", "miou", "mIoU under R (before)"),
  # The adversarially trained model ("adv", after) and its control, each on the same three sets.
  *(
    (f"{arm} {attack}", "miou", f"mIoU {label} ({when})")
    for arm, when in (("adv", "after"), ("control", "control"))
    for attack, label in (("clean", "clean"), ("R", "under R"), ("R'", "under own fresh R'"))
  ),
  ("R", "success", "success R (before)"),
  ("adv R", "success", "success R (after)"),
  ("adv R'", "success", "success R' (after)"),
  ("control R'", "success", "success R' (control)"),
)


def write_report(results: Results, workdir: str) -> dict:
  """`report.md`, plots and `summary.json` from the saved results; returns the summary."""
  splits, pairs, names = eval_splits(results), results.meta["pairs"], results.meta["class_names"]
  metrics = split_metrics(results)
  b = bars(results)
  main_rows = [
    [s, shown, m["success"], *m["success_per_pair"], m["flip_rate"], m["miou"], m["pixel_accuracy"]]
    for s in splits
    for cond, shown in BASELINE_SHOWN
    if cond in metrics
    for m in (metrics[cond][s],)
  ]
  adv_rows = [[s, *[metrics[c][s][m] for c, m, _ in ADV_COLUMNS]] for s in splits]
  bar_keys = (
    "success_R",
    "success_noise",
    "success_ratio",
    "success_ratio_ceiling",
    "flip_rate_R",
    "flip_rate_noise",
    "flip_ratio",
    "recovered_fraction",
    "recovered_fraction_control",
  )
  bar_rows = [
    [
      g,
      *[v[k] for k in bar_keys],
      100 * v["clean_miou_cost"],
      100 * v["clean_miou_cost_vs_control"],
    ]
    for g, v in b.items()
  ]
  compared = comparison_rows(results)
  tune_rows, chosen = tuning_table(results)
  per_class = per_class_iou(results)
  plots = _plots(results, workdir, per_class)
  tables.write_report(
    workdir,
    f"M1: universal adversarial training samples for segmentation on {results.meta['dataset']}",
    [
      ("Setup", _setup(results, workdir, chosen)),
      (
        "Paired verdicts (mean ± std over seeds; per-seed value = mean over the group's splits)",
        _comparison_table(compared),
      ),
      ("How the verdicts are judged", VERDICT_NOTES),
      (
        "Validation split: gamma and eps_r of R (baseline model; mean over datasets)",
        tables.markdown_table(
          ["grid point", "targeted success", "flip rate", "mIoU", "times chosen"], tune_rows
        ),
      ),
      (
        "Baseline model under each perturbation (means over seeds)",
        tables.markdown_table(
          ["split", "input", "targeted success", *pairs, "flip rate", "mIoU", "pixel accuracy"],
          main_rows,
        ),
      ),
      (
        "Adversarial training and its clean fine-tune control (means over seeds)",
        tables.markdown_table(["split", *[c for _, _, c in ADV_COLUMNS]], adv_rows),
      ),
      (
        "Issue bars (means over splits, then seeds)",
        tables.markdown_table(
          [
            "group",
            "success under R",
            "success under noise",
            "ratio (bar >= 5)",
            "ratio ceiling (1 / noise success)",
            "flip rate under R",
            "flip rate under noise",
            "flip ratio",
            "mIoU recovered / taken (bar >= 0.5)",
            "same, clean fine-tune control",
            "clean-mIoU cost, points (bar <= 2)",
            "same, vs control",
          ],
          bar_rows,
        ),
      ),
      ("How to read the bars", BAR_NOTES),
      (
        "Per-class IoU (mean over splits)",
        tables.markdown_table(
          ["class", *per_class],
          [[n, *[v[i] for v in per_class.values()]] for i, n in enumerate(names)],
        ),
      ),
      ("Plots", plots),
    ],
  )
  held_in = [s for s in splits if s.endswith(HELD_IN)]

  def held_in_miou(arm: str) -> float:
    per_seed = group_per_seed(results, arm, "R", held_in, "miou")
    return stats.summarize(list(per_seed.values())).mean

  out = {
    "experiment": EXPERIMENT,
    "time_s": results.meta["time_s"],
    "seeds": results.seeds(),
    "chosen": {str(seed): {"gamma_scale": g, "eps_r": e} for seed, (g, e) in chosen.items()},
    "comparisons": [
      {
        **{k: r[k] for k in ("group", "claim", "metric", "method", "control")},
        "method_mean": r["method_value"].mean,
        "method_std": r["method_value"].std,
        "control_mean": r["control_value"].mean,
        "control_std": r["control_value"].std,
        "verdict": r["verdict"].verdict,
        "diff": r["diff"],
        "se": r["verdict"].se,
        "n": r["verdict"].n,
      }
      for r in compared
    ],
    "bars": b,
    "attack_success_train": {
      "before": train_success(results, BASELINE),
      "after": train_success(results, ADV),
    },
    "metrics": metrics,
    "rows": [
      tables.summary_row(
        f"targeted success under R ({group})",
        b[group]["success_R"],
        "noise control",
        b[group]["success_noise"],
      )
      for group in ("held-out domain", "held-out images")
    ]
    + [
      tables.summary_row(
        "mIoU under R after adv. training (held-out images)",
        held_in_miou(ADV),
        "clean fine-tune control",
        held_in_miou(CONTROL),
      )
    ],
  }
  tables.write_summary(workdir, out)
  return out
