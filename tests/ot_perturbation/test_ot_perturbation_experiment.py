"""End-to-end smoke run, convergence rule and config checks of the M5 experiment."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ot_perturbation_cifar10, ot_perturbation_digits, ot_perturbation_street
from research import config_checks
from research.ot_perturbation import core, experiment
from research.training import harness


def test_street_smoke_end_to_end(tmp_path):
  config = ot_perturbation_street.get_config("smoke")
  config.trainings = ("ot",)  # clean-only training runs in the convergence test below
  config.train.loss_threshold = -1.0  # can never be reached: stops at the step limit
  summary = experiment.train_and_evaluate(config, str(tmp_path))
  assert set(summary["metrics"]) == {"ot"}
  for results in summary["metrics"].values():
    assert set(results) == set(experiment.CONDITIONS)
    for metrics in results.values():
      assert 0.0 <= metrics["map50"] <= 1.0 and 0.0 <= metrics["map"] <= metrics["map50"] + 1e-9
  assert summary["stops"]["ot"] == [
    {
      "stop_reason": "step_limit",
      "steps": config.train.steps,
      "loss": summary["stops"]["ot"][0]["loss"],
    }
  ]
  assert json.loads((tmp_path / "summary.json").read_text())["rows"]
  for plot in ("detections.png", "transport_plan.png", "robustness.png"):
    assert (tmp_path / "plots" / plot).exists()
  assert "step_limit" in (tmp_path / "report.md").read_text()


def test_reachable_threshold_stops_converged_and_stores_the_model(tmp_path):
  config = ot_perturbation_street.get_config("smoke")
  config.train.steps, config.train.log_every, config.train.checkpoint_every = 6, 2, 0
  config.train.loss_threshold = 1e9
  data = experiment.load_data(config)
  model = experiment.build_task_model(config, data["num_classes"])
  spec = experiment.make_spec(config, data["num_classes"], data["train"]["image"].shape[1:])
  run = harness.start_run(str(tmp_path))
  params, stop = experiment.train_model(config, run, data, model, spec, "clean", seed=0)
  assert stop["stop_reason"] == "converged" and stop["steps"] == 2
  assert (tmp_path / "clean_seed0_checkpoints" / "2").exists()
  # A rerun finds the stored model and does not train again.
  again, stop2 = experiment.train_model(config, run, data, model, spec, "clean", seed=0)
  assert stop2 == json.loads((tmp_path / "clean_seed0_train_stop.json").read_text())
  jax.tree.map(np.testing.assert_array_equal, params, again)


def test_two_seeds_report_mean_std_and_paired_verdicts(tmp_path, monkeypatch):
  traces = []
  step = experiment.perturbation_train_step

  def counted(*args, **kwargs):
    traces.append(kwargs["training"])
    return step(*args, **kwargs)

  monkeypatch.setattr(experiment, "perturbation_train_step", counted)
  config = ot_perturbation_digits.get_config("smoke")
  config.trainings = ("clean", "ot")
  config.num_seeds = 2
  summary = experiment.train_and_evaluate(config, str(tmp_path))
  assert sorted(traces) == ["clean", "ot"]  # one compiled step per training, shared by the seeds
  assert summary["seeds"] == [0, 1]
  for training in ("clean", "ot"):
    accuracies = [r["clean"]["accuracy"] for r in summary["metrics_per_seed"][training]]
    mean = summary["metrics"][training]["clean"]["accuracy"]
    std = summary["metrics_std"][training]["clean"]["accuracy"]
    np.testing.assert_allclose([mean, std], [np.mean(accuracies), np.std(accuracies, ddof=1)])
    assert len(summary["stops"][training]) == 2
    for seed in (0, 1):
      assert (tmp_path / f"{training}_seed{seed}_train_stop.json").exists()
  clean_cost = [
    100 * (c["clean"]["accuracy"] - o["clean"]["accuracy"])
    for c, o in zip(*(summary["metrics_per_seed"][t] for t in ("clean", "ot")), strict=True)
  ]
  np.testing.assert_allclose(summary["bar"]["clean_cost"], np.mean(clean_cost))
  assert set(summary["bar"]["verdicts"].values()) <= {"wins", "ties", "loses"}


def test_evaluation_attacks_step_by_attack_alpha_not_the_training_alpha(rng):
  config = ot_perturbation_digits.get_config("smoke")
  config.ot.alpha, config.attack.alpha, config.attack.steps = 0.1, 1e-6, 1
  model = experiment.build_task_model(config, 10)
  images = np.random.default_rng(0).integers(0, 255, (4, 28, 28, 1), dtype=np.uint8)
  spec = experiment.make_spec(config, 10, images.shape[1:])
  params = model.init(rng, jnp.zeros((1, 28, 28, 1)))["params"]
  batch = {"image": images, "label": np.arange(4)}
  key = jax.random.key(3)
  start = core.perturbed_images(key, images / np.float32(255), kind="uniform", eps=spec.eps)
  for condition in ("pgd", "ot_attack"):
    x = experiment.perturbed_test_images(
      params, batch, key, model=model, spec=spec, condition=condition
    )
    np.testing.assert_allclose(x, start, atol=2e-6)  # one step of 1e-6 from the random start


def test_thing_boxes_map_classes_5_to_8_onto_0_to_3():
  classes = np.array([[5, 8, 2, 7]])
  valid = np.array([[True, True, True, False]])
  got_classes, got_valid = experiment.thing_boxes(classes, valid)
  np.testing.assert_array_equal(got_classes, [[0, 3, 0, 0]])
  np.testing.assert_array_equal(got_valid, [[True, True, False, False]])


def test_logit_vectors_of_the_detector_are_flattened_heatmaps(rng):
  config = ot_perturbation_street.get_config("smoke")
  config.ot.vectors = "logits"
  model = experiment.build_task_model(config, 4)
  spec = experiment.make_spec(config, 4, (16, 16, 3))
  x = jnp.zeros((2, 16, 16, 3))
  params = model.init(rng, x)["params"]
  vectors = experiment.feature_vectors(params, x, model=model, spec=spec)
  assert vectors.shape == (2, 4 * 4 * 4)
  heatmap = model.apply({"params": params}, x)["heatmap"]
  np.testing.assert_allclose(vectors, np.asarray(heatmap).reshape(2, -1))


@pytest.mark.parametrize(
  "field, value, match",
  [
    ("task", "segmentation", "config.task"),
    ("ot.eps", 0.0, "config.ot.eps"),
    ("ot.vectors", "pixels", "config.ot.vectors"),
    ("trainings", ("clean", "pgd"), "config.trainings"),
    ("data.image_size", 30, "config.data.image_size"),
    ("attack.steps", 0, "config.attack.steps"),
    ("attack.alpha", 0.0, "config.attack.alpha"),
    ("num_seeds", 0, "config.num_seeds"),
  ],
)
def test_bad_config_values_raise(field, value, match):
  config = ot_perturbation_street.get_config("smoke")
  section, _, name = field.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(config_checks.ConfigError, match=match):
    experiment.validate(config)


def test_classification_configs_validate():
  experiment.validate(ot_perturbation_digits.get_config("smoke"))
  config = ot_perturbation_cifar10.get_config("smoke")
  experiment.validate(config)
  assert config.data.name == "cifar10" and config.task == "classification"
