"""M1 report: bars, tables and summary as pure functions of hand-made records (no training)."""

import json
import math

import numpy as np
import pytest

from research.study.results import Results, save_arrays
from research.uap_segmentation import experiment, report

CLASSES = ["road", "sidewalk", "car"]
PAIRS = ["sidewalk->road"]
SPLITS = ["day (held-out images)", "dusk (held-out images)", "night (held-out domain)"]


def _metrics(miou, success, flip_rate=0.1):
  return {
    "miou": miou,
    "pixel_accuracy": miou + 0.5,
    "success": success,
    "flip_rate": flip_rate,
    "success/sidewalk->road": success,
    **{f"iou/{c}": miou + 0.01 * i for i, c in enumerate(CLASSES)},
  }


# (arm, condition) -> (miou, success) on every split for seed 0; seed 1 adds `shift`.
TABLE = {
  ("baseline", "clean"): (0.50, 0.10),
  ("baseline", "R"): (0.30, 0.40),
  ("baseline", "noise"): (0.48, 0.20),
  ("adv", "clean"): (0.49, 0.10),
  ("adv", "R"): (0.45, 0.15),
  ("adv", "R'"): (0.40, 0.25),
  ("control", "clean"): (0.51, 0.10),
  ("control", "R"): (0.32, 0.35),
  ("control", "R'"): (0.31, 0.36),
  ("baseline", report.R_NO_RANDOM): (0.31, 0.39),
  ("baseline", report.R_GAMMA_XI): (0.40, 0.30),
  ("baseline", report.R_NO_ROUND): (0.30, 0.40),
  ("baseline", report.R_OTHER_PIXELS): (0.28, 0.42),
}


def _results(shift=0.02):
  results = Results(
    report.EXPERIMENT,
    meta={
      "dataset": "street_scenes",
      "datasets": ["day", "dusk"],
      "class_names": CLASSES,
      "pairs": PAIRS,
      "overlay_splits": ["day", "night"],
      "attack": {
        "xi": 8 / 255,
        "alpha": 2 / 255,
        "rounds": 2,
        "eps_round": 0.5 / 255,
        "correct_pixels": "all",
        "images_per_dataset": 4,
        "weight_mode": "uniform",
        "norm": "linf",
      },
      "tune": {"gamma_scales": [1.0, 4.0], "eps_rs": [1 / 255], "val_images": {"day": 2}},
      "ablation_attacks": ["eps_round", "correct_pixels"],
      "adv_train": {"steps": 2, "ratio": 0.5},
      "time_s": 1.0,
    },
  )
  for seed in (0, 1):
    results.add("tuning", seed, {"gamma_scale": 4.0, "eps_r": 1 / 255})
    for g, success in ((1.0, 0.2), (4.0, 0.3 + 0.1 * seed)):
      results.add(
        "baseline",
        seed,
        {"success": success, "flip_rate": 0.1, "miou": 0.4},
        split="day (validation)",
        condition=report.tune_label(g, 1 / 255),
      )
    for arm, condition in experiment.EVALUATIONS:
      miou, success = TABLE[(arm, condition)]
      for split in SPLITS:
        results.add(
          arm, seed, _metrics(miou + seed * shift, success), split=split, condition=condition
        )
    for arm in ("baseline", "adv"):
      for dataset in ("day", "dusk"):
        results.add(arm, seed, {"success": 0.3 + seed * 0.1}, split=dataset, condition="r_n")
  return results


def _write_arrays(workdir):
  r = np.full((4, 4, 3), 2 / 255, np.float32)
  save_arrays(
    workdir,
    {"R": r, "r_ds": np.stack([r, -r]), "noise": -r, "R'_adv": r / 2, "R'_control": r / 3},
    report.PERTURBATIONS,
  )
  panels = {}
  for j in (0, 1):
    panels.update(
      {
        f"{j}/image": np.zeros((1, 4, 4, 3), np.uint8),
        f"{j}/perturbed": np.full((1, 4, 4, 3), 0.5, np.float32),
        **{f"{j}/{p}": np.ones((1, 4, 4), np.int32) for p in ("truth", "clean", "R", "adv_R")},
      }
    )
  save_arrays(workdir, panels)


def test_labels_are_the_condition_names_of_tables_and_summary():
  assert [report.label(a, c) for a, c in experiment.EVALUATIONS] == [
    "clean",
    "R",
    report.R_NO_RANDOM,
    report.R_GAMMA_XI,
    "noise",
    report.R_NO_ROUND,
    report.R_OTHER_PIXELS,
    "adv clean",
    "adv R",
    "adv R'",
    "control clean",
    "control R",
    "control R'",
  ]


def test_seed_bars_on_hand_made_numbers():
  results = _results()
  held_in = SPLITS[:2]
  b = report.seed_bars(results, 0, held_in)
  assert b["success_R"] == pytest.approx(0.40)
  assert b["success_ratio"] == pytest.approx(0.40 / 0.20)
  assert b["success_ratio_ceiling"] == pytest.approx(5.0)
  assert b["miou_taken_by_R"] == pytest.approx(0.20)
  assert b["recovered_fraction"] == pytest.approx((0.45 - 0.30) / 0.20)
  assert b["recovered_fraction_control"] == pytest.approx((0.32 - 0.30) / 0.20)
  assert b["clean_miou_cost"] == pytest.approx(0.01)
  assert b["clean_miou_cost_vs_control"] == pytest.approx(0.02)


def test_recovered_fraction_is_nan_when_r_takes_nothing():
  results = Results(report.EXPERIMENT)
  for arm, condition in experiment.EVALUATIONS:
    results.add(arm, 0, _metrics(0.5, 0.1), split=SPLITS[0], condition=condition)
  assert math.isnan(report.seed_bars(results, 0, SPLITS[:1])["recovered_fraction"])


def test_bars_are_seed_means_of_per_seed_bars():
  results = _results(shift=0.02)
  b = report.bars(results)
  assert set(b) == {"held-out images", "held-out domain"}
  # Seed 1 shifts every mIoU by 0.02: differences stay, levels move by half the shift.
  assert b["held-out domain"]["miou_taken_by_R"] == pytest.approx(0.20)
  per_seed = [report.seed_bars(results, s, SPLITS[2:])["success_ratio"] for s in (0, 1)]
  assert b["held-out domain"]["success_ratio"] == pytest.approx(np.mean(per_seed))
  per_class = report.per_class_iou(results)
  assert per_class["under R"] == pytest.approx([0.31, 0.32, 0.33])


def test_split_metrics_and_train_success():
  results = _results()
  metrics = report.split_metrics(results)
  assert list(metrics) == [report.label(a, c) for a, c in experiment.EVALUATIONS]
  day = metrics["adv R'"]["day (held-out images)"]
  assert list(day) == ["miou", "pixel_accuracy", "success", "success_per_pair", "flip_rate"]
  assert day["miou"] == pytest.approx(0.41)
  assert day["success_per_pair"] == pytest.approx([0.25])
  assert report.train_success(results, "adv") == pytest.approx({"day": 0.35, "dusk": 0.35})


def test_write_report_from_saved_results(tmp_path):
  _results().save(tmp_path)
  _write_arrays(str(tmp_path))
  summary = report.write_report(Results.load(tmp_path), str(tmp_path))
  text = (tmp_path / "report.md").read_text()
  assert "| night (held-out domain) | unified R | 0.4 | 0.4 | 0.1 | 0.31 | 0.81 |" in text
  assert "2 steps, second-sample ratio 0.5" in text
  assert "||R||_inf = 2.00/255" in text
  for name in ("perturbations.png", "overlays.png", "per_class_iou.png"):
    assert (tmp_path / "plots" / name).exists()
  assert [r["metric"] for r in summary["rows"]] == [
    "targeted success under R (held-out domain)",
    "targeted success under R (held-out images)",
    "mIoU under R after adv. training (held-out images)",
  ]
  assert summary["rows"][2]["value"] == pytest.approx(0.46)
  assert summary["rows"][2]["baseline_value"] == pytest.approx(0.33)
  assert json.loads((tmp_path / "summary.json").read_text())["bars"] == json.loads(
    json.dumps(summary["bars"])
  )


def _three_seed_results(per_seed):
  """`per_seed[(arm, condition)] = [(miou, success) for seeds 0, 1, 2]` on every split."""
  results = _results()
  keep = [r for r in results.records if r.arm == "tuning" or r.split.endswith(report.VALIDATION)]
  results.records = keep
  for (arm, condition), values in per_seed.items():
    for seed, (miou, success) in enumerate(values):
      for split in SPLITS:
        results.add(arm, seed, _metrics(miou, success), split=split, condition=condition)
  return results


def _row(rows, group, claim, metric):
  (row,) = [r for r in rows if (r["group"], r["claim"], r["metric"]) == (group, claim, metric)]
  return row


def test_comparison_rows_give_paired_verdicts_on_hand_made_numbers():
  base = [(0.5, 0.1)] * 3
  results = _three_seed_results(
    {
      ("baseline", "clean"): base,
      ("baseline", "R"): [(0.30, 0.40), (0.31, 0.42), (0.29, 0.41)],
      ("baseline", "noise"): [(0.45, 0.20), (0.46, 0.21), (0.44, 0.19)],
      # One seed contradicts: a positive mean that is a tie.
      ("baseline", report.R_NO_RANDOM): [(0.30, 0.30), (0.31, 0.30), (0.29, 0.45)],
      ("adv", "R"): [(0.45, 0.15), (0.46, 0.16), (0.44, 0.14)],
      ("control", "R"): [(0.32, 0.35), (0.33, 0.34), (0.31, 0.36)],
    }
  )
  rows = report.comparison_rows(results)
  r_vs_noise = _row(
    rows, "held-out images", report.study_comparisons(results.meta)[0].claim, "targeted success"
  )
  assert r_vs_noise["verdict"].verdict == "wins"
  assert r_vs_noise["method_value"].mean == pytest.approx(0.41)
  assert r_vs_noise["method_value"].std == pytest.approx(0.01)
  assert r_vs_noise["diff"] == pytest.approx(0.41 - 0.20)
  random_term = _row(rows, "held-out domain", "claims 3/7: random term in R", "targeted success")
  assert random_term["diff"] > 0 and random_term["verdict"].verdict == "ties"
  steps_6_7 = "steps 6-7: adversarial training vs clean fine-tune control"
  miou = _row(rows, "held-out images", steps_6_7, "mIoU under R")
  assert miou["verdict"].verdict == "wins" and miou["diff"] == pytest.approx(0.13)
  # Targeted success under R is judged from the defender's side: lower is better.
  success = _row(rows, "held-out images", steps_6_7, "targeted success under R")
  assert success["diff"] == pytest.approx(-0.20) and success["verdict"].verdict == "wins"
  assert success["verdict"].mean_diff == pytest.approx(0.20)
  # Damage: mIoU under R is lower than under noise, which counts for the attack.
  damage = _row(rows, "held-out images", r_vs_noise["claim"], "mIoU (lower: more damage)")
  assert damage["verdict"].verdict == "wins"
  # Comparisons whose conditions were not run are left out (no R', no ablation attacks here).
  assert not [r for r in rows if "claim 5" in r["claim"] or "R'" in r["metric"]]


def test_dependent_claim_sides_follow_the_configured_default():
  meta = _results().meta
  partner = [c for c in report.study_comparisons(meta) if "partner" in c.claim][0]
  assert partner.method == ("baseline", report.R_OTHER_PIXELS) and partner.control == (
    "baseline",
    "R",
  )
  meta = {**meta, "attack": {**meta["attack"], "correct_pixels": "partner"}}
  partner = [c for c in report.study_comparisons(meta) if "partner" in c.claim][0]
  assert partner.method == ("baseline", "R") and partner.control == (
    "baseline",
    report.R_OTHER_PIXELS,
  )


def test_tuning_table_counts_the_chosen_grid_point():
  rows, chosen = report.tuning_table(_results())
  assert chosen == {0: (4.0, pytest.approx(1 / 255)), 1: (4.0, pytest.approx(1 / 255))}
  assert [r[0] for r in rows] == ["gamma=1xi, eps_r=1/255", "gamma=4xi, eps_r=1/255"]
  assert [r[-1] for r in rows] == [0, 2]
  assert rows[1][1].startswith("0.35 ± 0.07071")
