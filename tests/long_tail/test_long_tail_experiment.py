"""End-to-end tests of research.long_tail.experiment (METHODS.md M3) and its configs."""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import long_tail_cifar10, long_tail_cifar100, long_tail_digits
from research import experiments
from research.data import catalogue
from research.data.classification import load_classification_data
from research.long_tail import experiment
from research.long_tail.settings import Settings
from research.study.results import Results


def test_smoke_run_writes_results_report_and_rows(tmp_path):
  config = long_tail_digits.get_config("smoke")
  config.methods = ("dual", "dual_alternating", "ce")
  summary = experiment.train_and_evaluate(config, str(tmp_path))
  assert [r["metric"].split(" (")[0] for r in summary["rows"]] == [
    "few-shot accuracy, NCM",
    "overall accuracy, NCM",
  ]
  for row in summary["rows"]:
    assert 0.0 <= row["value"] <= 1.0 and 0.0 <= row["baseline_value"] <= 1.0
  stats = summary["metrics"]["rho10"]
  assert set(stats) == {"dual", "dual_alternating", "ce"} and "head_softmax" in stats["dual"]
  for rule in ("ncm", "ncm_pooled", "softmax"):  # every arm under every rule
    assert all(f"{rule}_few" in stats[m] for m in stats)
  assert json.loads((tmp_path / "summary.json").read_text())["experiment"] == "long_tail"
  results = Results.load(tmp_path)
  assert results.arms() == ["dual", "dual_alternating", "ce"] and results.seeds() == [0]
  assert len(results.values("ce", "softmax_class9_accuracy", condition="rho10")) == 1
  # The alternating arm runs the same steps with two updates each.
  assert results.values("dual_alternating", "steps", condition="rho10") == [3.0]
  assert results.values("dual_alternating", "updates", condition="rho10") == [6.0]
  assert results.values("dual", "updates", condition="rho10") == [3.0]
  text = (tmp_path / "report.md").read_text()
  assert "many / medium / few classes" in text and "4 / 4 / 2" in text
  assert "ties (fewer than 2 seeds)" in text
  assert (tmp_path / "plots" / "per_class_accuracy_rho10.png").exists()
  assert (tmp_path / "plots" / "embeddings_rho10.png").exists()
  (tmp_path / "report.md").unlink()
  assert experiments.rebuild_report(str(tmp_path))["rows"] == summary["rows"]
  assert (tmp_path / "report.md").read_text() == text


def test_cifar10_config_runs_end_to_end_on_mock_data(tmp_path):
  """The CIFAR data path, augmentation and ResNet config, on tfds mock data.

  The mock labels are random, so the long-tailed cut (which needs class 0 to be the largest)
  is replaced by the balanced set (ratio 1) and the head threshold by 0.
  """
  config = long_tail_cifar10.get_config("smoke")
  config.data.imbalance_ratios = (1.0,)
  config.head.threshold = 0
  config.methods = ("dual",)
  with tfds.testing.mock_data(num_examples=48, policy=tfds.testing.MockPolicy.USE_CODE):
    summary = experiment.train_and_evaluate(config, str(tmp_path))
  assert 0.0 <= summary["metrics"]["rho1"]["dual"]["ncm_overall"]["mean"] <= 1.0
  assert summary["rows"] == []  # no baseline to compare with


@pytest.mark.parametrize("module,num_classes", [(long_tail_cifar10, 10), (long_tail_cifar100, 100)])
def test_cifar_configs_data_path_on_mock_data(module, num_classes):
  for size in (None, "demo", "smoke"):
    Settings.from_config(module.get_config(size))
  config = module.get_config()
  assert tuple(config.model.stage_sizes) == (5, 5, 5) and tuple(config.model.widths) == (16, 32, 64)
  assert set(config.data.imbalance_ratios) == {100.0, 10.0} and config.data.augment
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
    data = load_classification_data(experiment.config_for_ratio(config, 1.0))
  assert data["num_classes"] == num_classes
  assert data["train"]["image"].shape == (24, 32, 32, 3)
  assert data["train"]["image"].dtype == np.uint8


@pytest.mark.parametrize(
  "num_classes,ratio,total",
  [(10, 100, 12406), (10, 10, 20431), (100, 100, 10847), (100, 10, 19573)],
)
def test_cifar_lt_sizes_match_cao_et_al(num_classes, ratio, total):
  """Training-set sizes of CIFAR-LT as published (Cao et al. 2019 code)."""
  labels = np.repeat(np.arange(num_classes), 50_000 // num_classes)
  counts = np.bincount(labels[catalogue.long_tailed_subset(labels, ratio)])
  assert counts.sum() == total
  assert counts[0] == 50_000 // num_classes and counts[-1] == 50_000 // num_classes // ratio


def test_digits_budget_and_ratios():
  config = long_tail_digits.get_config()
  settings = Settings.from_config(config)
  others = [m for m in config.methods if m != "triplet"]
  assert {settings.images_per_step(m) for m in others} == {64}
  assert settings.images_per_step("triplet") == settings.triplet.p * settings.triplet.k == 32
  for size in (None, "demo"):
    assert tuple(long_tail_digits.get_config(size).data.imbalance_ratios) == (10.0, 50.0, 100.0)
    assert long_tail_digits.get_config(size).num_seeds >= 3
