"""End-to-end smoke run, resume, config errors and the report's statistics of experiment M2."""

import json
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import norm_selection_cifar10, norm_selection_digits
from research import config_checks
from research.norm_selection import experiment, loop


def smoke_config():
  config = norm_selection_digits.get_config("smoke")
  # A smaller network than the smoke default: the test is dominated by compilation.
  config.model.stage_sizes = (1, 1)
  config.model.widths = (8, 16)
  config.model.embedding_dim = 8
  return config


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("norm_selection")
  return workdir, experiment.train_and_evaluate(smoke_config(), str(workdir))


def test_smoke_report_and_equal_budgets(smoke_run):
  workdir, summary = smoke_run
  assert json.loads((workdir / "summary.json").read_text())["experiment"] == "norm_selection"
  assert (workdir / "report.md").exists()
  assert (workdir / "plots" / "accuracy_vs_labels.png").exists()
  assert summary["train_step_compilations"] == 1  # every round and strategy shares one step
  strategies = summary["aggregate"]["strategies"]
  assert set(strategies) == {experiment.METHOD, experiment.FULL, *experiment.BASELINES}
  # m = 4 per class of 10 classes, 2 rounds: 40 labels, then at most 40 more (fewer when a
  # class's pool ran short after removing the correctly classified); every baseline follows.
  method_budgets = [row["num_labels"][0] for row in strategies[experiment.METHOD]]
  assert method_budgets[0] == 40.0 and 40.0 < method_budgets[1] <= 80.0
  for name in experiment.BASELINES:
    assert [row["num_labels"][0] for row in strategies[name]] == method_budgets
  assert strategies[experiment.FULL][0]["num_labels"][0] == 1297
  for row in summary["rows"]:
    assert 0.0 <= row["value"] <= 1.0 and 0.0 <= row["baseline_value"] <= 1.0


def test_killed_run_resumes_at_the_same_round(smoke_run, monkeypatch):
  workdir, first = smoke_run
  # Lose the norm loop's last round (as if killed during it) and the summary.
  norm_dir = workdir / "checkpoints" / f"seed0_{experiment.METHOD}"
  steps = sorted(int(p.name) for p in norm_dir.iterdir() if p.name.isdigit())
  assert len(steps) == 2
  shutil.rmtree(norm_dir / str(steps[-1]))
  (workdir / "summary.json").unlink()
  calls = []
  original = experiment._Trainer.train

  def counting_train(self, indices, params, **kwargs):
    calls.append((len(indices), kwargs["name"], kwargs["start"]))
    return original(self, indices, params, **kwargs)

  monkeypatch.setattr(experiment._Trainer, "train", counting_train)
  second = experiment.train_and_evaluate(smoke_config(), str(workdir))
  # Only the lost round is trained again, from its own start step; the rest is restored.
  labels_used = first["aggregate"]["strategies"][experiment.METHOD][-1]["num_labels"][0]
  assert calls == [(labels_used, f"seed0/{experiment.METHOD}", steps[0])]
  a = first["aggregate"]["strategies"][experiment.METHOD]
  b = second["aggregate"]["strategies"][experiment.METHOD]
  for row_a, row_b in zip(a, b, strict=True):
    np.testing.assert_allclose(row_a["accuracy"], row_b["accuracy"], atol=1e-6)
    assert row_a["num_labels"] == row_b["num_labels"]


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("selection.m", 0, "selection.m=0"),
    ("selection.a", 5, "selection.a=5 is not allowed: it must be <= 4"),
    ("selection.norm_order", "3", "selection.norm_order='3'"),
    ("selection.grouping", "kmeans", "num_clusters=None is not allowed"),
    ("selection.max_rounds", 0, "selection.max_rounds=0"),
    ("data.name", "imagenet", "data.name='imagenet'"),
    ("train.steps_per_round", 0, "train.steps_per_round=0"),
  ],
)
def test_bad_config_fails_with_one_clear_error(field, value, message):
  config = norm_selection_digits.get_config("smoke")
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(config_checks.ConfigError, match=message):
    experiment.validate(config)


def test_unknown_baseline_and_missing_stop_condition_fail():
  config = norm_selection_digits.get_config("smoke")
  config.baselines = ("random", "coreset_k_center")
  with pytest.raises(config_checks.ConfigError, match="coreset_k_center"):
    experiment.validate(config)
  config = norm_selection_digits.get_config("smoke")
  config.selection.max_remaining_per_class = None
  config.selection.max_rounds = None
  with pytest.raises(config_checks.ConfigError, match="no stop condition"):
    experiment.validate(config)


def test_sample_norms_match_numpy_reference():
  config = norm_selection_digits.get_config("smoke")
  images = np.random.default_rng(0).integers(0, 256, (7, 4, 4, 3), dtype=np.uint8)
  v = (images / 255.0) @ np.array([0.299, 0.587, 0.114])
  np.testing.assert_allclose(
    experiment.sample_norms(images, config, chunk=3),
    np.sqrt((v.reshape(7, -1) ** 2).sum(1)),
    rtol=1e-5,
  )
  config.selection.norm_order = "inf"
  np.testing.assert_allclose(
    experiment.sample_norms(images, config), np.abs(v).reshape(7, -1).max(1), rtol=1e-5
  )


def test_kmeans_grouping_gives_dense_groups():
  config = norm_selection_digits.get_config("smoke")
  config.selection.grouping = "kmeans"
  config.selection.num_clusters = 6
  experiment.validate(config)
  data = experiment.load_data(config)
  groups, num_groups = experiment._groups(config, data, seed=0)
  assert groups.shape == data["train"]["label"].shape and num_groups <= 6
  assert set(np.unique(groups).tolist()) == set(range(num_groups))
  loop.initial_state(data["train"]["label"], groups=groups, num_groups=num_groups)


def test_cifar10_config_reads_tfds_data_dir():
  config = norm_selection_cifar10.get_config("smoke")
  experiment.validate(config)
  config.data.max_train_examples = 12
  with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
    data = experiment.load_data(config)
  assert data["train"]["image"].shape == (12, 32, 32, 3)
  assert data["train"]["image"].dtype == np.uint8
  assert data["test"]["image"].shape == (20, 32, 32, 3)
  assert data["num_classes"] == 10 and data["train"]["label"].max() < 10
  norms = experiment.sample_norms(data["train"]["image"], config)
  assert norms.shape == (12,) and np.all(np.isfinite(norms))
