"""One-call end-to-end runs of each baseline experiment at smoke size (tiny data, few steps)."""

import json

from configs import classification_digits, segmentation_street
from research.supervised import classification, segmentation


def test_classification_smoke(tmp_path):
  summary = classification.train_and_evaluate(
    classification_digits.get_config("smoke"), str(tmp_path)
  )
  assert 0.0 <= summary["metrics"]["accuracy"] <= 1.0
  assert json.loads((tmp_path / "summary.json").read_text())["experiment"] == (
    "supervised_classification"
  )


def test_long_tailed_digits_subset(tmp_path):
  config = classification_digits.get_config("smoke")
  config.data.imbalance_ratio = 10.0
  data = classification.load_classification_data(config)
  counts = [int((data["train"]["label"] == c).sum()) for c in range(10)]
  assert counts[0] > counts[-1] and counts == sorted(counts, reverse=True)


def test_segmentation_smoke(tmp_path):
  summary = segmentation.train_and_evaluate(segmentation_street.get_config("smoke"), str(tmp_path))
  assert set(summary["metrics"]) == {"day", "dusk", "fog", "night"}
  assert (tmp_path / "plots" / "overlays.png").exists()
