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


def _results(gains: dict[str, list[float]], seeds=(0, 1, 2), clean_base=0.5) -> Results:
  """Detection results: clean-only at `clean_base`, OT at base + gain per seed and condition."""
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
    for arm in ("clean", "ot"):
      for condition in CONDITIONS:
        gain = gains.get(condition, [0.0] * len(seeds))[i] if arm == "ot" else 0.0
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
  assert met["met"] and met["verdicts"] == {"ot_attack": "wins", "pgd": "wins"}
  np.testing.assert_allclose(met["gain_ot_attack"], 2.1)
  # A positive mean that one seed contradicts is a tie, so the bar is not met.
  tie = report.bar(
    _results({"ot_attack": [0.05, 0.05, -0.01], "pgd": [0.01, 0.012, 0.011]}), "map50"
  )
  assert tie["gain_ot_attack"] > 0 and tie["verdicts"]["ot_attack"] == "ties"
  assert not tie["met"] and "bar NOT met" in tie["text"]


def test_bar_wins_inside_the_tie_band_do_not_count():
  gains = {"ot_attack": [0.004, 0.0041, 0.0042], "pgd": [0.01, 0.012, 0.011]}
  assert report.bar(_results(gains), "map50")["verdicts"]["ot_attack"] == "ties"


def test_bar_fails_on_clean_cost_above_three_points():
  gains = {"ot_attack": [0.02, 0.021, 0.022], "pgd": [0.01, 0.012, 0.011], "clean": [-0.04] * 3}
  out = report.bar(_results(gains), "map50")
  np.testing.assert_allclose(out["clean_cost"], 4.0)
  assert out["verdicts"] == {"ot_attack": "wins", "pgd": "wins"} and not out["met"]


def test_one_seed_is_never_a_win():
  out = report.bar(_results({"ot_attack": [0.2], "pgd": [0.2]}, seeds=(0,)), "map50")
  assert out["verdicts"] == {"ot_attack": "ties", "pgd": "ties"} and not out["met"]


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
