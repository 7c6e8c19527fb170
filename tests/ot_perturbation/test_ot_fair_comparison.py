"""M5 comparison rules: one stopping rule, per-image draws, padding-free attacks, one step checked.

Street smoke data (32 px, a tiny detector); 8 fake CPU devices (tests/conftest.py).
"""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import ot_perturbation_street
from research import config_checks
from research.data import detection
from research.models import detector
from research.ot_perturbation import core, experiment, task
from research.ot_perturbation.settings import CONDITIONS, Settings
from research.training import fit, parallel, predict, state


@pytest.fixture(scope="module")
def street():
  config = ot_perturbation_street.get_config("smoke")
  settings = Settings.from_config(config)
  data = experiment.load_data(config, settings)
  model = task.build_task_model(config, "detection", data["num_classes"])
  spec = settings.spec(data["num_classes"], data["train"]["image"].shape[1:])
  params = fit.init_params(model, jax.random.key(0), data["train"]["image"][0])
  return config, settings, data, model, spec, params


def _batch(data, n=8):
  return {k: data["train"][k][:n] for k in task.train_batch_keys("detection")}


# --------------------------------------------------------------------------------------------
# Stopping rule (step 7): each arm's own target loss at the current parameters.


def test_ot_arm_is_judged_on_loss1_plus_loss2_and_clean_only_on_loss1(street):
  config, settings, data, model, spec, params = street
  mesh = parallel.data_mesh()
  check_batch = experiment.convergence_batch(data, settings, fit.Run("", mesh, None, 0.0))
  rng = jax.random.key(3)
  loss = {
    arm: jax.jit(functools.partial(task.target_loss, model=model, spec=spec, training=arm))
    for arm in ("clean", "ot")
  }
  ot = jax.device_get(loss["ot"](params, check_batch, rng))
  clean = jax.device_get(loss["clean"](params, check_batch, rng))
  np.testing.assert_allclose(ot["loss"], ot["loss1"] + ot["loss2"], rtol=1e-6)
  np.testing.assert_allclose(clean["loss"], ot["loss1"], rtol=1e-6)  # the same loss1
  threshold = float(ot["loss1"] + 0.5 * ot["loss2"])  # between loss1 and loss1 + loss2
  train_state = state.create_train_state(params, optax.sgd(0.1))
  hooks = {
    arm: experiment.ConvergenceCheck(
      core.ConvergenceRule(threshold, 100), lambda p, fn=fn: fn(p, check_batch, rng)
    )
    for arm, fn in loss.items()
  }
  # The interval's mean of batch losses plays no part: a logged 0.0 converges nothing.
  assert hooks["ot"](10, {"loss": 0.0}, train_state) is None
  np.testing.assert_allclose(hooks["ot"].loss, ot["loss"], rtol=1e-6)
  assert hooks["clean"](10, {"loss": 1e9}, train_state) == "converged"
  # Evaluated at the state's current parameters: other parameters, another value.
  shifted = train_state.replace(params=jax.tree.map(lambda p: 1.5 * p, params))
  hooks["ot"](20, {}, shifted)
  assert abs(hooks["ot"].loss - float(ot["loss"])) > 1e-4


def test_every_arm_reports_the_steps_it_used_under_one_rule(street, tmp_path):
  config, settings, data, model, spec, _ = street
  run = fit.start_run(str(tmp_path))
  check_batch = experiment.convergence_batch(data, settings, run)
  settings = dataclasses.replace(
    settings,
    train=dataclasses.replace(settings.train, steps=4, log_every=2, checkpoint_every=0),
    loss_threshold=1e9,  # every arm converges at its first log point
  )
  config.train.steps = 4
  for arm in ("clean", "ot"):
    compiled = experiment.compile_training(config, model, spec, arm, run)
    _, stop = experiment.train_model(settings, run, data, model, arm, 0, compiled, check_batch)
    assert stop["stop_reason"] == "converged" and stop["steps"] == 2 and np.isfinite(stop["loss"])


# --------------------------------------------------------------------------------------------
# Step 2's perturbed set: per image, drawn once ('fixed') or every step ('redraw').


def test_fixed_initial_set_is_drawn_once_per_image_and_redraw_every_step():
  rng = jax.random.key(5)
  index = jnp.array([3, 7, 11])
  x = jnp.full((3, 4, 4, 3), 0.5)
  starts = {}
  for mode in ("fixed", "redraw"):
    for step in (0, 9):
      keys = task.initial_keys(rng, jnp.int32(step), index, mode)
      starts[mode, step] = task.random_starts(keys, x, kind="uniform", eps=0.1)
  np.testing.assert_array_equal(starts["fixed", 0], starts["fixed", 9])
  assert np.abs(starts["redraw", 0] - starts["redraw", 9]).max() > 1e-3
  # An image's draw does not depend on its position in the batch.
  swapped = task.random_starts(
    task.initial_keys(rng, jnp.int32(0), index[::-1], "fixed"), x, kind="uniform", eps=0.1
  )
  np.testing.assert_array_equal(swapped[::-1], starts["fixed", 0])


# --------------------------------------------------------------------------------------------
# One 'ot' training step against a hand-assembled reference.


def _reference_ot_step(params, batch, rng, step, tx, opt_state, *, model, spec):
  """Steps 2-6 written out with the model, `core.feature_matching_distance` and optax only."""
  ot = spec.ot
  x = batch["image"].astype(np.float32) / 255.0
  fixed_key = jax.random.split(rng)[0]
  noise = np.stack(
    [
      np.asarray(
        jax.random.uniform(
          jax.random.fold_in(fixed_key, int(i)), (1,) + x.shape[1:], minval=-ot.eps, maxval=ot.eps
        )
      )[0]
      for i in batch["index"]
    ]
  )
  x_pert = np.clip(np.clip(x + noise, x - ot.eps, x + ot.eps), 0.0, 1.0)
  pooled = lambda p, images: model.apply({"params": p}, images)["pooled"]  # noqa: E731
  f_clean = pooled(params, x)
  distance = lambda xp: core.feature_matching_distance(f_clean, pooled(params, xp), ot.sinkhorn)[0]  # noqa: E731
  for _ in range(ot.ascent_steps):
    grad = jax.grad(distance)(jnp.asarray(x_pert))
    x_pert = np.clip(np.clip(x_pert + ot.alpha * np.sign(grad), x - ot.eps, x + ot.eps), 0, 1)
  targets = detection.centernet_targets(
    batch, num_classes=spec.num_classes, image_size=spec.image_size, stride=4
  )

  def loss(p):
    loss1 = detector.detection_loss(model.apply({"params": p}, x, train=True), targets)[0]
    loss2 = detector.detection_loss(model.apply({"params": p}, x_pert, train=True), targets)[0]
    return loss1 + loss2, (loss1, loss2)

  (total, (loss1, loss2)), grads = jax.value_and_grad(loss, has_aux=True)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, float(total), float(loss1), float(loss2)


def test_one_ot_training_step_matches_a_hand_assembled_reference(street):
  _, _, data, model, spec, params = street
  spec = dataclasses.replace(spec, ot=dataclasses.replace(spec.ot, ascent_steps=2))
  tx = optax.sgd(1e-3)  # linear in the gradient: Adam would magnify rounding
  batch = _batch(data)
  rng = jax.random.key(11)
  step = jax.jit(task.bound_train_step(model, tx, spec, "ot", "fixed"))
  train_state = state.create_train_state(jax.tree.map(jnp.copy, params), tx)
  ref_params, ref_opt = params, tx.init(params)
  for i in range(2):  # the second step's target set comes from the once-updated parameters
    train_state, metrics = step(train_state, batch, rng)
    ref_params, ref_opt, total, loss1, loss2 = _reference_ot_step(
      ref_params, batch, rng, i, tx, ref_opt, model=model, spec=spec
    )
    np.testing.assert_allclose(
      [metrics["loss"], metrics["loss1"], metrics["loss2"]], [total, loss1, loss2], rtol=2e-5
    )
    chex.assert_trees_all_close(train_state.params, ref_params, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("training", ["ot", "pgd"])
def test_one_and_eight_devices_give_the_same_m5_step(street, training):
  _, _, data, model, spec, params = street
  tx = optax.sgd(0.05)  # linear in the gradient: Adam would magnify rounding
  batch = _batch(data)
  rng = jax.random.key(2)
  out = {}
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = parallel.data_mesh(devices)
    step = parallel.compile_train_step(
      task.bound_train_step(model, tx, spec, training, "fixed"), mesh
    )
    s = parallel.replicate(state.create_train_state(jax.tree.map(jnp.copy, params), tx), mesh)
    for _ in range(2):
      s, metrics = step(s, parallel.shard_batch(batch, mesh), rng)
    out[len(devices)] = jax.device_get((s.params, metrics["loss"]))
  assert jax.device_count() == 8
  chex.assert_trees_all_close(out[1][0], out[8][0], atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(out[1][1], out[8][1], rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Evaluation: real images only, per-image draws, no dependence on the batch size.


def test_padding_rows_change_neither_attack_of_the_real_images(street):
  _, _, data, model, spec, params = street
  batch = _batch(data, 8)
  x = batch["image"].astype(np.float32) / 255.0
  real = 3
  # Rows 3..7 are padding (valid False). They hold other images, not copies, so that weighting
  # them like real rows would visibly change the real rows' transport problem.
  start = task.random_starts(
    task.image_keys(jax.random.key(1), jnp.arange(8)), x, kind="uniform", eps=spec.ot.eps
  )
  valid = jnp.arange(8) < real
  spec8 = dataclasses.replace(spec, ot=dataclasses.replace(spec.ot, group_size=8))
  spec3 = dataclasses.replace(spec, ot=dataclasses.replace(spec.ot, group_size=real))
  got, finite = task.ot_attack_images(params, x, start, valid, model=model, spec=spec8)
  alone, _ = task.ot_attack_images(
    params, x[:real], start[:real], valid[:real], model=model, spec=spec3
  )
  np.testing.assert_allclose(got[:real], alone, atol=1e-6)
  assert np.all(np.asarray(finite))
  kwargs = dict(model=model, spec=spec, steps_=2, alpha=0.02)
  pgd_pad = task.pgd_set(
    params, x, task.task_targets(batch, spec), start, weights=valid.astype(jnp.float32), **kwargs
  )
  first = {k: v[:real] for k, v in batch.items()}
  pgd_alone = task.pgd_set(params, x[:real], task.task_targets(first, spec), start[:real], **kwargs)
  np.testing.assert_allclose(pgd_pad[:real], pgd_alone, atol=1e-6)


def _eval_outputs(params, eval_steps, test, batch_size, spec):
  mesh = parallel.data_mesh()
  outs = {}
  for condition in CONDITIONS:
    fn = functools.partial(eval_steps[condition], key=experiment.condition_key(0, condition))
    outs[condition] = predict.predict(
      fn,
      params,
      test,
      batch_size=batch_size,
      mesh=mesh,
      keys=task.batch_keys("detection"),
      collect=("images", "scores", "boxes"),
    ).per_example
  return outs


def test_every_evaluation_figure_is_the_same_for_two_evaluation_batch_sizes(street):
  _, _, data, model, spec, params = street
  spec = dataclasses.replace(spec, ot=dataclasses.replace(spec.ot, group_size=4))
  # 10 images: batches of 8 leave 6 padding rows in the second batch, one batch of 16 leaves 6.
  test = {k: np.concatenate([data["test"][k], data["train"][k]])[:10] for k in data["test"]}
  eval_steps = experiment.compile_eval_steps(model, spec)
  run = fit.Run("", parallel.data_mesh(), None, 0.0)
  figures = {
    b: experiment.evaluate_model(params, eval_steps, test, spec, b, run, seed=0) for b in (8, 16)
  }
  assert figures[8] == figures[16]
  outs = {b: _eval_outputs(params, eval_steps, test, b, spec) for b in (8, 16)}
  for condition in CONDITIONS:
    for name in ("images", "scores", "boxes"):
      np.testing.assert_allclose(
        outs[8][condition][name], outs[16][condition][name], atol=1e-5, err_msg=condition
      )


# --------------------------------------------------------------------------------------------
# Bad input.


def test_convergence_batch_larger_than_the_training_set_raises():
  config = ot_perturbation_street.get_config("smoke")
  config.train.convergence_batch_size = 9  # the smoke training set has 8 images
  settings = Settings.from_config(config)
  with pytest.raises(config_checks.ConfigError, match="config.train.convergence_batch_size=9"):
    experiment.load_data(config, settings)


# The bad values of the comparison settings (ot.initial_set, attack.ot_group_size,
# train.convergence_batch_size, repeated arms) are among test_ot_perturbation_experiment.py's
# test_bad_config_values_raise.


def test_redraw_arm_needs_the_fixed_initial_set():
  config = ot_perturbation_street.get_config("smoke")
  config.ot.initial_set = "redraw"
  config.trainings = ("clean", "ot", "pgd")
  assert Settings.from_config(config).ot.initial_set == "redraw"
  config.trainings = ("ot", "ot_redraw")
  with pytest.raises(config_checks.ConfigError, match="'ot' already redraws"):
    Settings.from_config(config)


def test_non_finite_features_in_the_evaluation_attack_raise_one_clear_error(street):
  _, _, data, model, spec, params = street
  bad = jax.tree.map(lambda p: p * jnp.nan, params)
  x = data["test"]["image"][:8].astype(np.float32) / 255.0
  _, finite = task.ot_attack_images(bad, x, x, jnp.ones(8, bool), model=model, spec=spec)
  assert not np.any(np.asarray(finite))
  with pytest.raises(FloatingPointError, match="evaluation under ot_attack: the attack or"):
    task.check_finite(np.asarray(finite), "ot_attack")
  # The whole evaluation stops at its first condition with the same clear error.
  eval_steps = experiment.compile_eval_steps(model, spec)
  run = fit.Run("", parallel.data_mesh(), None, 0.0)
  with pytest.raises(FloatingPointError, match="evaluation under clean: .* 8 test images"):
    experiment.evaluate_model(bad, eval_steps, data["test"], spec, 8, run, seed=0)
