"""research/incremental_panoptic/report.py on hand-made records (no training)."""

import json

import numpy as np
import pytest

from research.incremental_panoptic import report
from research.study.results import Results

NAMES = ["road", "car", "truck"]


def _results(pq: dict[str, dict[int, tuple[float, float]]]) -> Results:
  """Records of `{arm: {seed: (pq_old, pq_new)}}`; the other metrics are derived from them."""
  shown = np.zeros((1, 4, 4), np.int32)
  shown[0, :2] = 1000
  results = Results(
    "incremental_panoptic",
    meta={
      "dataset": "street_scenes",
      "class_names": NAMES,
      "old_classes": [0, 1],
      "new_classes": [2],
      "steps": {"step0": 3, "step1": 2},
      "num_images": {"step0": 5, "step1": 4},
      "time_s": 1.5,
      "overlays": {
        "image": np.zeros((1, 4, 4, 3), np.uint8),
        "truth": shown,
        "truth_tables": [[[1000, 0]]],
        "maps": {arm: shown for arm in pq},
        "tables": {arm: [[[1000, 0]]] for arm in pq},
      },
    },
  )
  for arm, seeds in pq.items():
    for seed, (old, new) in seeds.items():
      metrics = {}
      for group, value in (("old", old), ("new", new), ("all", (2 * old + new) / 3)):
        metrics |= {f"pq_{group}": value, f"sq_{group}": 80.0, f"rq_{group}": value / 0.8}
      metrics |= {"pq_class_0": old, "pq_class_1": old, "pq_class_2": new}
      results.add(arm, seed, metrics)
  return results


def test_forgetting_is_paired_by_seed():
  r = _results(
    {"step0": {0: (50.0, 0.0), 1: (60.0, 0.0)}, "naive": {0: (10.0, 30.0), 1: (30.0, 30.0)}}
  )
  assert report.forgetting(r, "naive") == {0: 40.0, 1: 30.0}


def test_bar_is_met_only_with_a_paired_win():
  seeds = {
    "step0": {0: (50.0, 0.0), 1: (52.0, 0.0), 2: (51.0, 0.0)},
    "naive": {0: (10.0, 30.0), 1: (12.0, 31.0), 2: (11.0, 29.0)},
    "method": {0: (45.0, 27.0), 1: (46.0, 28.0), 2: (46.0, 26.5)},
  }
  bar = report.check_bar(_results(seeds))
  assert bar["forgetting_naive"] == pytest.approx(40.0)
  assert bar["forgetting_method"] == pytest.approx(16 / 3)
  assert bar["forgetting_halved"] and bar["new_pq_within_5"]
  assert bar["new_pq_gap_to_naive"] == pytest.approx(30.0 - 81.5 / 3)
  assert bar["forgetting_halved_verdict"].startswith("wins")
  # One seed whose new-class PQ is 6 points short: the mean gap is still below 5, but the
  # paired verdict is a tie, so the bar is not met.
  seeds["method"][2] = (46.0, 23.0)
  bar = report.check_bar(_results(seeds))
  assert bar["new_pq_gap_to_naive"] < 5.0 and not bar["new_pq_within_5"]
  assert bar["new_pq_within_5_verdict"].startswith("ties")


def test_a_single_seed_never_meets_the_bar():
  r = _results({"step0": {0: (50.0, 0.0)}, "naive": {0: (10.0, 30.0)}, "method": {0: (50.0, 30.0)}})
  bar = report.check_bar(r)
  assert bar["forgetting_method"] == 0.0 and bar["new_pq_gap_to_naive"] == 0.0
  assert not bar["forgetting_halved"] and not bar["new_pq_within_5"]


def test_write_report_from_records_and_from_the_saved_file(tmp_path):
  seeds = {
    "step0": {0: (50.0, 0.0)},
    "naive": {0: (10.0, 30.0)},
    "method": {0: (40.0, 26.0)},
    "joint": {0: (48.0, 29.0)},
    "true_wins": {0: (44.0, 29.5)},
  }
  summary = report.write_report(_results(seeds), str(tmp_path))
  text = (tmp_path / "report.md").read_text()
  assert "| step 0 (before) | 50 | 80 | 62.5 | 0 | 80 | 0 | 33.33 | 0 |" in text
  assert "| naive fine-tuning | 10 | 80 | 12.5 | 30 | 80 | 37.5 | 16.67 | 40 |" in text
  ablations = text.split("## Ablations")[1].split("## Per-class PQ")[0]
  assert "this method" in ablations and "matched masks dropped" in ablations
  assert "naive" not in ablations
  assert "| truck | new | 0 | 30 | 26 | 29 | 29.5 |" in text
  assert set(summary["bar_by_variant"]) == {"method", "true_wins"}
  assert summary["after"]["method"]["forgetting"] == 10.0
  assert summary["rows"][0] == {
    "metric": "PQ_old after step 1 (points)",
    "value": 40.0,
    "baseline": "naive fine-tuning",
    "baseline_value": 10.0,
  }
  assert (tmp_path / "plots" / "pq.png").exists() and (tmp_path / "plots" / "overlays.png").exists()
  # Saved and loaded again (numpy arrays become lists), the report is the same.
  _results(seeds).save(tmp_path)
  (tmp_path / "report.md").unlink()
  again = report.write_report(Results.load(tmp_path), str(tmp_path))
  assert json.dumps(again) == json.dumps(summary)
  assert (tmp_path / "report.md").read_text() == text


def test_several_seeds_show_mean_and_sample_std(tmp_path):
  seeds = {
    "step0": {0: (50.0, 0.0), 1: (54.0, 0.0)},
    "naive": {0: (10.0, 30.0), 1: (14.0, 32.0)},
    "method": {0: (40.0, 26.0), 1: (44.0, 28.0)},
  }
  report.write_report(_results(seeds), str(tmp_path))
  text = (tmp_path / "report.md").read_text()
  assert "| naive fine-tuning | 12 ± 2.828 (n=2) |" in text  # std with ddof = 1


def test_panoptic_rgb_colours_segments_and_leaves_void_black():
  segment_map = np.array([[0, 1000], [2001, 2001]])
  rgb = report.panoptic_rgb(segment_map, {1000: 0, 2001: 1}, 3)
  assert (rgb[0, 0] == 0).all() and (rgb[0, 1] > 0).any() and (rgb[1, 0] == rgb[1, 1]).all()
