"""End-to-end smoke run, resume, config errors and the report's statistics of experiment M2."""

import json
import shutil

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import norm_selection_cifar10, norm_selection_digits
from research import config_checks
from research.norm_selection import core, experiment, report, rounds
from research.norm_selection.settings import BASELINES, FULL, METHOD, RANDOM_DRAW, Settings
from research.study.results import Results


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
  results = Results.load(workdir)
  assert results.arms() == [METHOD, RANDOM_DRAW, *BASELINES, FULL]

  # m = 4 per class of 10 classes, 2 rounds: 40 labels, then at most 40 more (fewer when a
  # class's pool ran short after removing the correctly classified); every baseline follows.
  def budgets(arm):
    n = report.num_rounds(results, arm, 0)
    return [results.per_seed(arm, "num_labels", "pool", f"round{r}")[0] for r in range(1, n + 1)]

  method_budgets = budgets(METHOD)
  assert method_budgets[0] == 40.0 and 40.0 < method_budgets[1] <= 80.0
  for name in BASELINES:
    assert budgets(name) == method_budgets
  assert budgets(FULL) == [1297.0]
  # The random-draw loop is the same loop: 4 per class drawn, then the pool tested.
  assert budgets(RANDOM_DRAW)[0] == 40.0
  assert results.per_seed(RANDOM_DRAW, "label_reads", "pool", "round1")[0] == 1297 - 40

  # Pool labels read: the loops read the whole remaining pool every round, baselines never.
  def last(arm, metric):
    return results.per_seed(arm, metric, "pool", f"round{report.num_rounds(results, arm, 0)}")[0]

  tested = sum(
    results.per_seed(METHOD, "num_tested", "pool", f"round{r}")[0]
    for r in range(1, report.num_rounds(results, METHOD, 0) + 1)
  )
  assert last(METHOD, "label_reads") == tested > 1297 - 40
  for name in BASELINES:
    assert last(name, "label_reads") == 0 and last(name, "labels_seen") == last(name, "num_labels")
  # The full-data ceiling trains as many steps as the longest loop (3 steps per round).
  longest = max(report.num_rounds(results, arm, 0) for arm in (METHOD, RANDOM_DRAW))
  assert last(FULL, "train_steps") == 3 * longest == last(METHOD, "train_steps")
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  full_phases = [line for line in lines if line["phase"].startswith(f"seed0/{FULL}/")]
  assert [line["step"] for line in full_phases] == [3] * longest  # one 3-step phase per round
  for row in summary["rows"]:
    assert 0.0 <= row["value"] <= 1.0 and 0.0 <= row["baseline_value"] <= 1.0


def test_killed_run_resumes_at_the_same_round(smoke_run):
  workdir, first = smoke_run
  before = Results.load(workdir)
  metric_lines = (workdir / "metrics.jsonl").read_text().splitlines()
  # Lose the norm loop's last round (as if killed during it) and the summary.
  shutil.rmtree(workdir / "seed0" / METHOD / "round2_checkpoints")
  (workdir / "summary.json").unlink()
  second = experiment.train_and_evaluate(smoke_config(), str(workdir))
  # Only the lost round is trained again (one new metrics line); the rest is restored.
  new_lines = (workdir / "metrics.jsonl").read_text().splitlines()[len(metric_lines) :]
  assert [json.loads(line)["phase"] for line in new_lines] == [f"seed0/{METHOD}/round2"]
  assert json.loads(new_lines[0]) == json.loads(metric_lines[1])
  after = Results.load(workdir)
  assert after.records == before.records
  assert second["rows"] == first["rows"]


def test_rerun_with_another_draw_fails_on_the_checkpoint_extras(smoke_run):
  workdir, _ = smoke_run
  config = smoke_config()
  config.selection.m = 3
  with pytest.raises(ValueError, match="trained on other samples"):
    experiment.train_and_evaluate(config, str(workdir))


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("selection.m", 0, "selection.m=0"),
    ("selection.a", 5, "selection.a=5 is not allowed: it must be <= 4"),
    ("selection.norm_order", "3", "selection.norm_order='3'"),
    ("selection.grouping", "kmeans", "num_clusters=None is not allowed"),
    ("selection.max_rounds", 0, "selection.max_rounds=0"),
    ("selection.mean_over", "all", "selection.mean_over='all'"),
    ("loop.draw_rules", ("random",), r"loop.draw_rules=\['random'\] is not allowed: it must hold"),
    ("loop.draw_rules", ("norm", "norm"), r"loop.draw_rules=\['norm', 'norm'\]"),
    ("loop.draw_rules", ("norm", "greedy"), r"loop.draw_rules=\['norm', 'greedy'\]"),
    ("data.name", "imagenet", "data.name='imagenet'"),
    ("train.steps_per_round", 0, "train.steps_per_round=0"),
  ],
)
def test_bad_config_fails_with_one_clear_error(field, value, message):
  config = norm_selection_digits.get_config("smoke")
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(config_checks.ConfigError, match=message):
    Settings.from_config(config)


def test_unknown_baseline_and_missing_stop_condition_fail():
  config = norm_selection_digits.get_config("smoke")
  config.baselines = ("random", "coreset_k_center")
  with pytest.raises(config_checks.ConfigError, match="coreset_k_center"):
    Settings.from_config(config)
  config = norm_selection_digits.get_config("smoke")
  config.selection.max_remaining_per_class = None
  config.selection.max_rounds = None
  with pytest.raises(config_checks.ConfigError, match="no stop condition"):
    Settings.from_config(config)


def test_uint8_norm_values_match_numpy_reference():
  images = np.random.default_rng(0).integers(0, 256, (7, 4, 4, 3), dtype=np.uint8)
  v = (images / 255.0) @ np.array([0.299, 0.587, 0.114])
  np.testing.assert_allclose(
    core.uint8_norm_values(images, chunk=3), np.sqrt((v.reshape(7, -1) ** 2).sum(1)), rtol=1e-5
  )
  np.testing.assert_allclose(
    core.uint8_norm_values(images, p="inf"), np.abs(v).reshape(7, -1).max(1), rtol=1e-5
  )


def test_kmeans_grouping_gives_dense_groups():
  config = norm_selection_digits.get_config("smoke")
  config.selection.grouping = "kmeans"
  config.selection.num_clusters = 6
  settings = Settings.from_config(config)
  data = experiment.load_data(config, settings)
  sel = settings.selection
  groups, num_groups = rounds.group_pool(
    data["train"]["label"], data["train"]["image"], "kmeans", sel.num_clusters, jax.random.key(0)
  )
  assert groups.shape == data["train"]["label"].shape and num_groups <= 6
  assert set(np.unique(groups).tolist()) == set(range(num_groups))
  rounds.initial_state(data["train"]["label"], groups=groups, num_groups=num_groups)


def test_cifar10_config_reads_tfds_data_dir():
  config = norm_selection_cifar10.get_config("smoke")
  config.data.max_train_examples = 12
  settings = Settings.from_config(config)
  with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
    data = experiment.load_data(config, settings)
  assert data["train"]["image"].shape == (12, 32, 32, 3)
  assert data["train"]["image"].dtype == np.uint8
  assert data["test"]["image"].shape == (20, 32, 32, 3)
  assert data["num_classes"] == 10 and data["train"]["label"].max() < 10
  norms = core.uint8_norm_values(data["train"]["image"], p=settings.selection.p)
  assert norms.shape == (12,) and np.all(np.isfinite(norms))
