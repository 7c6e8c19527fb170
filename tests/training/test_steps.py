import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from research.models.resnet import ResNet
from research.training import loop, parallel, state, steps
from research.training.checkpoint import Checkpointer


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


@jax.custom_vjp
def _nan_gradient_if(x, poison):
  """Identity whose gradient is NaN where `poison` > 0: a finite loss with a NaN gradient."""
  del poison
  return x


def _nan_gradient_fwd(x, poison):
  return x, poison


def _nan_gradient_bwd(poison, g):
  return jnp.where(poison > 0, jnp.nan, g), jnp.zeros_like(poison)


_nan_gradient_if.defvjp(_nan_gradient_fwd, _nan_gradient_bwd)


def _poisonable_loss(params, batch, rng):
  del rng
  w = _nan_gradient_if(params["w"], jnp.max(batch["poison"]))
  return jnp.mean((batch["x"] @ w - 1.0) ** 2), {}


def _poison_batch(poison):
  return {"x": np.ones((4, 2), np.float32), "poison": np.full(4, poison, np.float32)}


def test_finite_loss_with_nan_gradient_records_the_step(rng):
  tx = optax.sgd(0.1)
  step = jax.jit(functools.partial(steps.train_step, loss_fn=_poisonable_loss, tx=tx))
  s = state.create_train_state({"w": jnp.zeros(2)}, tx)
  losses = []
  for poison in (0, 0, 1, 0):
    s, metrics = step(s, _poison_batch(poison), rng)
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses[:3]))  # the bad step's loss is finite, its gradient is not
  assert int(s.nonfinite_step) == 2


def test_nan_gradient_just_before_a_checkpoint_keeps_the_last_good_one(tmp_path):
  tx = optax.sgd(0.1)
  mesh = parallel.data_mesh(jax.devices()[:1])
  step = parallel.compile_train_step(
    functools.partial(steps.train_step, loss_fn=_poisonable_loss, tx=tx), mesh
  )
  s = parallel.replicate(state.create_train_state({"w": jnp.zeros(2)}, tx), mesh)
  ckpt = Checkpointer(str(tmp_path))
  with pytest.raises(loop.NonFiniteLossError, match="non-finite at step 7;") as err:
    loop.train_loop(
      s,
      step,
      lambda i: parallel.shard_batch(_poison_batch(i == 7), mesh),  # step 8 is checkpointed
      jax.random.key(0),
      num_steps=12,
      checkpointer=ckpt,
      checkpoint_every=4,
      log_every=4,
    )
  ckpt.close()
  assert "last good checkpoint is step 4" in str(err.value)
  assert Checkpointer(str(tmp_path)).all_steps() == [4]


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
