"""M5 end to end (smoke), the convergence rule, evaluation keys and the config checks."""

import json
import types

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ot_perturbation_cifar10, ot_perturbation_digits, ot_perturbation_street
from research import config_checks, experiments
from research.data import detection
from research.ot_perturbation import core, experiment, task
from research.ot_perturbation.settings import CONDITIONS, Settings
from research.study.results import Results
from research.training import fit, parallel, predict


def _setup(config):
  settings = Settings.from_config(config)
  data = experiment.load_data(config, settings)
  model = task.build_task_model(config, settings.task, data["num_classes"])
  spec = settings.spec(data["num_classes"], data["train"]["image"].shape[1:])
  return settings, data, model, spec


def test_street_smoke_end_to_end_and_the_report_rebuilds_from_results(tmp_path):
  config = ot_perturbation_street.get_config("smoke")
  config.trainings = ("ot",)  # clean-only training runs in the convergence test below
  config.train.loss_threshold = -1.0  # can never be reached: stops at the step limit
  summary = experiment.train_and_evaluate(config, str(tmp_path))
  assert set(summary["metrics"]) == {"ot"}
  for results in summary["metrics"].values():
    assert set(results) == set(CONDITIONS)
    for metrics in results.values():
      assert 0.0 <= metrics["map50"] <= 1.0 and 0.0 <= metrics["map"] <= metrics["map50"] + 1e-9
  (stop,) = summary["stops"]["ot"]
  assert stop["stop_reason"] == "step_limit" and stop["steps"] == config.train.steps
  assert np.isfinite(stop["loss"])
  assert json.loads((tmp_path / "summary.json").read_text())["rows"]
  for plot in ("detections.png", "transport_plan.png", "robustness.png"):
    assert (tmp_path / "plots" / plot).exists()
  report = (tmp_path / "report.md").read_text()
  assert "step_limit" in report
  results = Results.load(tmp_path)
  assert results.per_seed("ot", "steps", split="train") == {0: config.train.steps}
  (tmp_path / "report.md").unlink()
  assert experiments.rebuild_report(str(tmp_path))["rows"] == summary["rows"]
  assert (tmp_path / "report.md").read_text() == report


def test_reachable_threshold_stops_converged_and_stores_the_model(tmp_path):
  config = ot_perturbation_street.get_config("smoke")
  config.train.steps, config.train.log_every, config.train.checkpoint_every = 6, 2, 0
  config.train.loss_threshold = 1e9
  settings, data, model, spec = _setup(config)
  run = fit.start_run(str(tmp_path))
  check_batch = experiment.convergence_batch(data, settings, run)
  compiled = experiment.compile_training(config, model, spec, "clean", run)
  params, stop = experiment.train_model(
    settings, run, data, model, "clean", 0, compiled, check_batch
  )
  assert stop["stop_reason"] == "converged" and stop["steps"] == 2
  assert (tmp_path / "clean_seed0_train_checkpoints" / "2").exists()
  logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  (at_stop,) = [m for m in logged if m.get("phase") == "clean_seed0_train/convergence"]
  assert at_stop["step"] == 2 and stop["loss"] == at_stop["target_loss"]
  # A rerun finds the stored model, does not train again and still knows the loss.
  again, stop2 = experiment.train_model(
    settings, run, data, model, "clean", 0, compiled, check_batch
  )
  assert stop2 == stop
  jax.tree.map(np.testing.assert_array_equal, params, again)


def test_convergence_check_evaluates_the_target_loss_of_the_current_parameters():
  seen = []

  def target_loss(params):
    seen.append(params)
    return {"loss": params}

  hook = experiment.ConvergenceCheck(core.ConvergenceRule(0.5, 10), target_loss)
  state = lambda p: types.SimpleNamespace(params=p)  # noqa: E731
  assert hook(2, {"loss": 0.0}, state(0.6)) is None and hook.extras() == {"loss": 0.6}
  assert hook(4, {"loss": 9.0}, state(0.5)) == "converged"
  assert hook(10, {"loss": 0.0}, state(0.7)) is None  # the step limit is the loop's own
  assert seen == [0.6, 0.5, 0.7]


def test_two_seeds_report_mean_std_and_paired_verdicts(tmp_path, monkeypatch):
  traces = helpers.record_calls(monkeypatch, task, "perturbation_train_step", "training")
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
  clean_cost = [
    100 * (c["clean"]["accuracy"] - o["clean"]["accuracy"])
    for c, o in zip(*(summary["metrics_per_seed"][t] for t in ("clean", "ot")), strict=True)
  ]
  np.testing.assert_allclose(summary["bar"]["clean_cost"], np.mean(clean_cost))
  assert set(summary["bar"]["verdicts"].values()) <= {"wins", "ties", "loses"}


def test_evaluation_draws_are_keyed_by_each_image_not_by_its_batch(rng):
  config = ot_perturbation_digits.get_config("smoke")
  settings, data, model, spec = _setup(config)
  params = model.init(rng, jnp.zeros((1, 28, 28, 1)))["params"]
  test = {k: v[:12] for k, v in data["test"].items()}
  key = jax.random.key(7)
  fn = jax.jit(lambda p, b: task.eval_step(p, b, key, model=model, spec=spec, condition="noise"))
  mesh = parallel.data_mesh()
  out = predict.predict(
    fn, params, test, batch_size=8, mesh=mesh, keys=("image", "label"), collect=("images",)
  )
  x = test["image"] / np.float32(255)
  for i in range(12):
    want = core.perturbed_images(jax.random.fold_in(key, i), x[i : i + 1], eps=spec.ot.eps)
    np.testing.assert_allclose(out["images"][i], np.asarray(want)[0], atol=1e-6)


def test_evaluation_attacks_step_by_attack_alpha_not_the_training_alpha(rng):
  config = ot_perturbation_digits.get_config("smoke")
  config.ot.alpha, config.attack.alpha, config.attack.steps = 0.1, 1e-6, 1
  config.attack.ot_group_size = 4
  model = task.build_task_model(config, "classification", 10)
  images = np.random.default_rng(0).integers(0, 255, (4, 28, 28, 1), dtype=np.uint8)
  spec = Settings.from_config(config).spec(10, images.shape[1:])
  params = model.init(rng, jnp.zeros((1, 28, 28, 1)))["params"]
  index = np.arange(4, dtype=np.int32)
  batch = {"image": images, "label": np.arange(4), "valid": np.ones(4, bool), "index": index}
  key = jax.random.key(3)
  start = task.random_starts(
    task.image_keys(key, index), images / np.float32(255), kind="uniform", eps=spec.ot.eps
  )
  for condition in ("pgd", "ot_attack"):
    x, finite = task.perturbed_test_images(
      params, batch, key, model=model, spec=spec, condition=condition
    )
    np.testing.assert_allclose(x, start, atol=2e-6)  # one step of 1e-6 from the random start
    assert np.all(np.asarray(finite))


def test_thing_boxes_map_classes_5_to_8_onto_0_to_3():
  classes = np.array([[5, 8, 2, 7]])
  valid = np.array([[True, True, True, False]])
  got_classes, got_valid = detection.thing_boxes(classes, valid)
  np.testing.assert_array_equal(got_classes, [[0, 3, 0, 0]])
  np.testing.assert_array_equal(got_valid, [[True, True, False, False]])


def test_logit_vectors_of_the_detector_are_flattened_heatmaps(rng):
  config = ot_perturbation_street.get_config("smoke")
  config.ot.vectors = "logits"
  model = task.build_task_model(config, "detection", 4)
  spec = Settings.from_config(config).spec(4, (16, 16, 3))
  x = jnp.zeros((2, 16, 16, 3))
  params = model.init(rng, x)["params"]
  vectors = task.feature_vectors(params, x, model=model, spec=spec)
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
    ("data.domains", ("moon",), "config.data.domains"),
    ("attack.steps", 0, "config.attack.steps"),
    ("attack.alpha", 0.0, "config.attack.alpha"),
    ("num_seeds", 0, "config.num_seeds"),
    ("train.eval_batch_size", 0, "config.train.eval_batch_size"),
    ("trainings", ("clean", "ot", "adversarial"), "config.trainings"),
    # The comparison rules (test_ot_fair_comparison.py).
    ("ot.initial_set", "sometimes", "config.ot.initial_set='sometimes'"),
    ("attack.ot_group_size", 3, "config.attack.ot_group_size=3"),
    ("attack.ot_group_size", 0, "config.attack.ot_group_size=0"),
    ("train.convergence_batch_size", 0, "config.train.convergence_batch_size=0"),
    ("trainings", ("ot", "ot"), "each arm may appear once"),
  ],
)
def test_bad_config_values_raise(field, value, match):
  config = ot_perturbation_street.get_config("smoke")
  section, _, name = field.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(config_checks.ConfigError, match=match):
    Settings.from_config(config)


def test_classification_configs_validate():
  settings = Settings.from_config(ot_perturbation_digits.get_config("smoke"))
  assert settings.top_k == 1 and settings.seeds == (0,)
  config = ot_perturbation_cifar10.get_config("smoke")
  assert Settings.from_config(config).dataset == "cifar10" and config.task == "classification"
