"""The M5 report from hand-made results: tables, stops, the bar's paired verdicts (no training)."""

import base64
import json

import numpy as np
import pytest

from research.ot_perturbation import report
from research.ot_perturbation.settings import CONDITIONS
from research.study.results import Results

SETUP = {
  "eps": 4 / 255,
  "alpha": 4 / 255,
  "ascent_steps": 2,
  "attack_steps": 3,
  "attack_alpha": 2 / 255,
  "vectors": "pooled",
  "cost": "cosine",
  "sinkhorn_iterations": 20,
  "perturbed_only": False,
  "loss_threshold": 0.05,
  "steps": 120,
}


def _results(
  gains: dict[str, list[float]], seeds=(0, 1, 2), clean_base=0.5, arms=("clean", "ot"), pgd=None
) -> Results:
  """Detection results: clean-only at `clean_base`, OT (and OT redraw) at base + gain per seed
  and condition, PGD-AT at base + `pgd[condition]` on every seed."""
  results = Results(
    "ot_perturbation",
    meta={
      "task": "detection",
      "dataset": "street_scenes",
      "class_names": ["car", "truck", "person", "bicycle"],
      "test_images": 192,
      "setup": SETUP,
      "time_s": 1.0,
    },
  )
  for i, seed in enumerate(seeds):
    for arm in arms:
      for condition in CONDITIONS:
        gain = gains.get(condition, [0.0] * len(seeds))[i] if arm.startswith("ot") else 0.0
        if arm == "pgd":
          gain = (pgd or {}).get(condition, 0.0)
        value = clean_base + 0.01 * seed + gain
        results.add(arm, seed, {"map50": value, "map": value / 2}, condition=condition)
      converged = arm == "ot" and seed == 1
      results.add(
        arm,
        seed,
        {"steps": 40 if converged else 120, "converged": float(converged), "loss": 0.1 + seed},
        split="train",
      )
  return results


def test_bar_is_met_only_with_paired_wins_under_both_attacks():
  met = report.bar(
    _results({"ot_attack": [0.02, 0.021, 0.022], "pgd": [0.01, 0.012, 0.011]}), "map50"
  )
  assert met["met"] and met["verdicts"] == {"ot_attack": "wins", "pgd": "wins", "clean": "ties"}
  np.testing.assert_allclose(met["gain_ot_attack"], 2.1)
  # A positive mean that one seed contradicts is a tie, so the bar is not met.
  tie = report.bar(
    _results({"ot_attack": [0.05, 0.05, -0.01], "pgd": [0.01, 0.012, 0.011]}), "map50"
  )
  assert tie["gain_ot_attack"] > 0 and tie["verdicts"]["ot_attack"] == "ties"
  assert not tie["met"] and "bar NOT met" in tie["text"]


def test_bar_of_each_ot_arm_and_the_verdicts_against_every_other_arm(tmp_path):
  gains = {"ot_attack": [0.02, 0.021, 0.022], "pgd": [0.01, 0.012, 0.011]}
  results = _results(
    gains, arms=("clean", "ot", "ot_redraw", "pgd"), pgd={"pgd": 0.05, "clean": -0.02}
  )
  assert report.bar(results, "map50", "ot_redraw")["met"]
  table = report.verdicts_table(results, "map50")
  assert "| OT perturbation (this method) | PGD adv. training | pgd | -3.90 |" in table
  assert (
    "| OT perturbation, set redrawn every step | OT perturbation (this method) | pgd |" in table
  )
  text = report.against_pgd_text(results, "map50")
  assert "It loses to PGD-AT under: pgd." in text and "clean +2.00 points (wins)" in text
  summary = report.write_report(results, str(tmp_path))
  assert set(summary["bar_by_arm"]) == {"ot", "ot_redraw"} and summary["bar"]["met"]
  assert "loses to PGD-AT under: pgd" in (tmp_path / "report.md").read_text()


def test_bar_fails_on_clean_cost_above_three_points():
  gains = {"ot_attack": [0.02, 0.021, 0.022], "pgd": [0.01, 0.012, 0.011], "clean": [-0.04] * 3}
  out = report.bar(_results(gains), "map50")
  np.testing.assert_allclose(out["clean_cost"], 4.0)
  assert out["verdicts"] == {"ot_attack": "wins", "pgd": "wins", "clean": "loses"}
  assert not out["met"]


def test_one_seed_is_never_a_win():
  out = report.bar(_results({"ot_attack": [0.2], "pgd": [0.2]}, seeds=(0,)), "map50")
  assert set(out["verdicts"].values()) == {"ties"} and not out["met"]


def test_stops_come_from_the_train_records():
  assert report.stops(_results({}), "ot") == [
    {"stop_reason": "step_limit", "steps": 120, "loss": 0.1},
    {"stop_reason": "converged", "steps": 40, "loss": 1.1},
    {"stop_reason": "step_limit", "steps": 120, "loss": 2.1},
  ]


def test_table_cells_are_mean_and_sample_std():
  table = report.results_table(_results({}), ["map50", "map"])
  clean_row = table.splitlines()[2]
  values = [0.5, 0.51, 0.52]
  assert f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}" in clean_row
  assert "step_limit, step_limit, step_limit | 120, 120, 120" in clean_row
  single = report.results_table(_results({}, seeds=(0,)), ["map50"])
  assert "0.5000 (n=1)" in single


def test_write_report_from_results_alone(tmp_path):
  results = _results({"ot_attack": [0.02, 0.021, 0.022], "pgd": [0.01, 0.012, 0.011]})
  summary = report.write_report(results, str(tmp_path))
  text = (tmp_path / "report.md").read_text()
  assert "M5 OT-matched perturbation training (detection, street_scenes)" in text
  assert "seeds [0, 1, 2]; 192 test images" in text and "bar met" in text
  assert (tmp_path / "plots" / "robustness.png").exists()
  assert not (tmp_path / "plots" / "transport_plan.png").exists()  # no plot arrays in meta
  assert [r["metric"] for r in summary["rows"]] == [
    "mAP@0.5 under ot_attack",
    "mAP@0.5 under pgd",
    "mAP@0.5 under clean",
  ]
  assert summary["rows"][0]["value"] == pytest.approx(0.51 + 0.021)
  assert summary["rows"][0]["baseline"] == "clean-only"
  assert summary["metrics_per_seed"]["ot"][1]["pgd"]["map"] == pytest.approx((0.51 + 0.012) / 2)
  assert json.loads((tmp_path / "summary.json").read_text())["bar"]["met"] is True


def test_plots_are_drawn_from_meta_arrays(tmp_path):
  results = _results({})
  pixels = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
  image = {"shape": [8, 8, 3], "uint8_base64": base64.b64encode(pixels.tobytes()).decode()}
  np.testing.assert_array_equal(report.decode_image(image), pixels)
  shot = {"image": image, "boxes": [[1, 1, 5, 5]], "scores": [0.9], "classes": [2]}
  results.meta["plots"] = {
    "transport_plan": {"plan": np.eye(3).tolist(), "cost": np.ones((3, 3)).tolist()},
    "detections": {
      "ground_truth": [{"boxes": [[0, 0, 4, 4]], "classes": [1]}],
      **{c: [shot] for c in ("clean", "ot_attack", "pgd")},
    },
  }
  report.write_report(results, str(tmp_path))
  for plot in ("robustness.png", "transport_plan.png", "detections.png"):
    assert (tmp_path / "plots" / plot).exists()
  assert "![detections](plots/detections.png)" in (tmp_path / "report.md").read_text()
