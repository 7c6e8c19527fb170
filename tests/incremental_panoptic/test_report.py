"""research/incremental_panoptic/report.py on hand-made records (no training)."""

import json

import numpy as np
import pytest

from research.incremental_panoptic import report
from research.study.results import Results

NAMES = ["road", "car", "truck", "person"]
STEPS = [[0, 1], [2], [3]]


def _results(pq: dict) -> Results:
  """Records of `{(arm, step): {seed: per-class PQ [4]}}`; groups derived from the classes."""
  shown = np.zeros((1, 4, 4), np.int32)
  shown[0, :2] = 1000
  arms = {arm for arm, _ in pq}
  results = Results(
    "incremental_panoptic",
    meta={
      "dataset": "street_scenes",
      "class_names": NAMES,
      "class_steps": STEPS,
      "seeds": [0, 1, 2],
      "steps": {"step0": 3, "increment": 2},
      "steps_factor": {},
      "truncated": {"train": {"images": 1, "segments": 2, "max_segments": 16}},
      "num_images": {"step1/step": 4},
      "target_counts": {"step1/new/step": [0, 0, 7, 0]},
      "time_s": 1.5,
      "overlays": {
        "image": np.zeros((1, 4, 4, 3), np.uint8),
        "truth": shown,
        "truth_tables": [[[1000, 0]]],
        "maps": {arm: shown for arm in arms},
        "tables": {arm: [[[1000, 0]]] for arm in arms},
      },
    },
  )
  for (arm, step), seeds in pq.items():
    t = max(step, 1)
    old = [c for s in STEPS[:t] for c in s]
    for seed, per_class in seeds.items():
      metrics = {f"pq_class_{c}": v for c, v in enumerate(per_class)}
      for group, classes in (("old", old), ("new", STEPS[t]), ("all", old + STEPS[t])):
        value = float(np.mean([per_class[c] for c in classes]))
        metrics |= {f"pq_{group}": value, f"sq_{group}": 80.0, f"rq_{group}": value / 0.8}
      results.add(arm, seed, metrics, condition=report.condition(step))
  return results


def _demo_records(method_new_seed2=27.0):
  step0 = {s: [50.0 + s, 40.0, 0.0, 0.0] for s in range(3)}
  return {
    ("step0", 0): step0,
    ("naive", 1): {s: [10.0, 10.0 + s, 30.0, 0.0] for s in range(3)},
    ("method", 1): {
      0: [48.0, 39.0, 28.0, 0.0],
      1: [49.0, 38.0, 29.0, 0.0],
      2: [50.0, 39.0, method_new_seed2, 0.0],
    },  # fmt: skip
    ("comformer", 1): {s: [45.0, 35.0, 29.0, 0.0] for s in range(3)},
    ("naive", 2): {s: [5.0, 5.0, 4.0, 20.0] for s in range(3)},
    ("method", 2): {s: [47.0, 37.0, 25.0, 17.0 + s] for s in range(3)},
    ("comformer", 2): {s: [40.0, 30.0, 24.0, 18.0] for s in range(3)},
  }


def test_forgetting_uses_each_class_when_it_was_learnt():
  r = _results(_demo_records())
  # Step 1: old = {road, car}: step-0 mean (50 + s + 40) / 2 minus the arm's mean after step 1.
  assert report.forgetting(r, "naive", 1) == pytest.approx({0: 35.0, 1: 35.0, 2: 35.0})
  # Step 2: old = {road, car, truck}; truck counted from the arm's own step-1 model.
  naive = report.forgetting(r, "naive", 2)
  assert naive[0] == pytest.approx((50 + 40 + 30) / 3 - (5 + 5 + 4) / 3)
  method = report.forgetting(r, "method", 2)
  assert method[1] == pytest.approx((51 + 40 + 29) / 3 - (47 + 37 + 25) / 3)


def test_bar_is_met_only_with_a_paired_win():
  bar = report.check_bar(_results(_demo_records()), 1)
  assert bar["forgetting_halved"] and bar["new_pq_within_5"]
  assert bar["forgetting_halved_verdict"].startswith("wins")
  # One seed 6 points short on the new class: the mean gap is below 5, the verdict a tie.
  bar = report.check_bar(_results(_demo_records(method_new_seed2=24.0)), 1)
  assert bar["new_pq_gap_to_naive"] < 5.0 and not bar["new_pq_within_5"]
  assert bar["new_pq_within_5_verdict"].startswith("ties")


def test_a_single_seed_never_meets_the_bar():
  records = {k: {0: v[0]} for k, v in _demo_records().items()}
  bar = report.check_bar(_results(records), 1)
  assert not bar["forgetting_halved"] and not bar["new_pq_within_5"]


def test_write_report_from_records_and_from_the_saved_file(tmp_path):
  results = _results(_demo_records())
  summary = report.write_report(results, str(tmp_path))
  text = (tmp_path / "report.md").read_text()
  assert "## After step 2: PQ per arm" in text and "## After step 1: paired verdicts" in text
  step1 = text.split("## After step 1: PQ per arm")[1].split("##")[0]
  assert "| step 0 (before step 1) | before | 45.5 ± 0.5 (n=3) |" in step1
  verdicts = text.split("## After step 2: paired verdicts of this method")[1].split("##")[0]
  assert "| naive | pq_old |" in verdicts and "| comformer | forgetting |" in verdicts
  assert summary["steps"]["2"]["method"]["new"] == pytest.approx(18.0)
  assert summary["bars"]["1"]["method"]["forgetting_halved"]
  assert summary["rows"][0]["metric"] == "PQ_old after step 2 (points)"
  assert (tmp_path / "plots" / "pq.png").exists() and (tmp_path / "plots" / "overlays.png").exists()
  results.save(tmp_path)
  (tmp_path / "report.md").unlink()
  again = report.write_report(Results.load(tmp_path), str(tmp_path))
  assert json.dumps(again) == json.dumps(summary)
  assert (tmp_path / "report.md").read_text() == text


def test_sensitivity_table_is_mean_and_std_over_seeds():
  r = _results(_demo_records())
  for seed in range(2):
    r.add("pseudo_labels", seed, {"masks_per_image": 2.0 + seed, "pixels_per_image": 10.0,
          "precision": 90.0, "on_new": 5.0}, condition="noise_0.7_area_2")  # fmt: skip
  table = report.sensitivity_table(r)
  assert "| threshold 0.7, min area 2 | 2.5 ± 0.7071 (n=2) |" in table


def test_panoptic_rgb_colours_segments_and_leaves_void_black():
  segment_map = np.array([[0, 1000], [2001, 2001]])
  rgb = report.panoptic_rgb(segment_map, {1000: 0, 2001: 1}, 3)
  assert (rgb[0, 0] == 0).all() and (rgb[0, 1] > 0).any() and (rgb[1, 0] == rgb[1, 1]).all()
