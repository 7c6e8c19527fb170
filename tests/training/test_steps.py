import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from research.models.resnet import ResNet
from research.training import parallel, state, steps


def _setup(rng, num_classes=3):
  model = ResNet(num_classes, stage_sizes=(1,), widths=(8,), embedding_dim=4)
  y = np.arange(16) % num_classes
  noise = np.asarray(jax.random.uniform(rng, (16, 8, 8, 1))) * 60
  x = (noise + 90 * y[:, None, None, None]).astype(np.uint8)  # brightness tells the class
  params = model.init(rng, jnp.zeros((1, 8, 8, 1)))["params"]
  return model, params, {"image": x, "label": y}


def test_train_step_compiles_once_and_learns(rng):
  model, params, batch = _setup(rng)
  tx = optax.adam(1e-2)
  loss_fn = functools.partial(steps.classification_loss, model=model)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(s, batch, rng):
    return steps.train_step(s, batch, rng, loss_fn=loss_fn, tx=tx)

  s = state.create_train_state(params, tx)
  losses = []
  for _ in range(25):
    s, metrics = step(s, batch, rng)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.7 * losses[0]
  assert int(s.step) == 25 and int(s.nonfinite_step) == -1


def test_nonfinite_loss_records_first_bad_step(rng):
  tx = optax.sgd(0.1)

  def loss_fn(params, batch, rng):
    del rng
    return jnp.sum(params["w"] * batch["x"]) / batch["scale"], {}

  step = jax.jit(functools.partial(steps.train_step, loss_fn=loss_fn, tx=tx))
  s = state.create_train_state({"w": jnp.ones(2)}, tx)
  for scale in (1.0, 1.0, 0.0, 1.0):
    s, _ = step(s, {"x": jnp.ones(2), "scale": jnp.asarray(scale)}, rng)
  assert int(s.nonfinite_step) == 2


def test_confusion_counts_against_numpy(rng):
  labels = jax.random.randint(rng, (50,), 0, 4)
  preds = jax.random.randint(jax.random.fold_in(rng, 1), (50,), 0, 4)
  valid = jnp.arange(50) < 40
  got = steps.confusion_counts(labels, preds, valid, 4)
  expected = np.zeros((4, 4), int)
  for t, p, v in zip(np.asarray(labels), np.asarray(preds), np.asarray(valid)):
    if v:
      expected[t, p] += 1
  np.testing.assert_array_equal(np.asarray(got), expected)


def _run_on_devices(devices, model, params, batch, rng, n_steps=3):
  mesh = parallel.data_mesh(devices)
  tx = optax.sgd(0.05, momentum=0.9)
  step = parallel.compile_train_step(
    functools.partial(
      steps.train_step, loss_fn=functools.partial(steps.classification_loss, model=model), tx=tx
    ),
    mesh,
  )
  params = jax.tree.map(jnp.copy, params)  # the step donates its state
  s = parallel.replicate(state.create_train_state(params, tx), mesh)
  for _ in range(n_steps):
    s, metrics = step(s, parallel.shard_batch(batch, mesh), rng)
  return jax.device_get(s.params), float(metrics["loss"])


def test_one_and_eight_devices_give_the_same_parameters(rng):
  assert jax.device_count() == 8
  model, params, batch = _setup(rng)
  p1, l1 = _run_on_devices(jax.devices()[:1], model, params, batch, rng)
  p8, l8 = _run_on_devices(jax.devices(), model, params, batch, rng)
  chex.assert_trees_all_close(p1, p8, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(l1, l8, rtol=1e-5)
