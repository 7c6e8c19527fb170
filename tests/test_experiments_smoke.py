"""End-to-end runs of the two baseline experiments on tiny budgets, asserting what they are for."""

from configs import classification_digits, segmentation_street
from research import experiments
from research.data.classification import load_classification_data
from research.supervised import classification, segmentation


def _rebuilt_report_is_identical(workdir):
  written = (workdir / "report.md").read_text()
  (workdir / "report.md").unlink()
  experiments.rebuild_report(str(workdir))
  return (workdir / "report.md").read_text() == written


def test_classifier_learns_digits_and_its_report_is_a_function_of_its_results(tmp_path):
  config = classification_digits.get_config("smoke")
  config.train.steps = 40
  summary = classification.train_and_evaluate(config, str(tmp_path))
  # 40 steps of 16 images lift test accuracy far above the 10 % majority class.
  accuracy, majority = summary["metrics"]["accuracy"], summary["rows"][0]["baseline_value"]
  assert majority == 0.1 and accuracy > 0.5, accuracy
  assert _rebuilt_report_is_identical(tmp_path)


def test_long_tailed_digits_subset():
  config = classification_digits.get_config("smoke")
  config.data.imbalance_ratio = 10.0
  data = load_classification_data(config)
  counts = [int((data["train"]["label"] == c).sum()) for c in range(10)]
  assert counts[0] > counts[-1] and counts == sorted(counts, reverse=True)
  assert counts[0] / counts[-1] >= 9.0  # n_max / n_min ~ rho


def test_segmentation_report_is_a_function_of_its_results(tmp_path):
  summary = segmentation.train_and_evaluate(segmentation_street.get_config("smoke"), str(tmp_path))
  assert set(summary["metrics"]) == {"day", "dusk", "fog", "night"}
  assert _rebuilt_report_is_identical(tmp_path)
