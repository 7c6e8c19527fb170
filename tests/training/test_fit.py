"""`fit` (one phase with resume and a stop hook) and `predict` (padding rows masked)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from research.data import samplers
from research.training import fit, loop, parallel, predict, steps
from research.training.checkpoint import Checkpointer

X = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
Y = X @ np.array([1.0, -2.0, 0.5], np.float32) + 0.1


def _loss(params, batch, rng):
  del rng
  pred = batch["x"] @ params["w"] + params["b"]
  return jnp.mean((pred - batch["y"]) ** 2), {}


def _fit(workdir, num_steps=12, should_stop=None):
  run = fit.start_run(str(workdir))
  tx = optax.adam(0.05)
  step = parallel.compile_train_step(
    functools.partial(steps.train_step, loss_fn=_loss, tx=tx), run.mesh
  )
  sampler = samplers.RandomSampler(64, 8, seed=3)
  ran = []

  def batch_fn(i):
    ran.append(i)
    return fit.sampled_batch_fn({"x": X, "y": Y}, sampler, run.mesh, ("x", "y"))(i)

  result = fit.fit(
    run,
    fit.Phase("phase", num_steps, log_every=2, checkpoint_every=4, examples_per_step=8),
    params={"w": jnp.zeros(3), "b": jnp.zeros(())},
    tx=tx,
    step_fn=step,
    batch_fn=batch_fn,
    rng=jax.random.key(1),
    should_stop=should_stop,
  )
  return result, ran


def test_fit_runs_the_phase_and_a_rerun_trains_nothing(tmp_path):
  result, ran = _fit(tmp_path)
  assert result.stop_reason == loop.STEP_LIMIT and result.steps == 12 and ran == list(range(12))
  again, ran_again = _fit(tmp_path)
  assert ran_again == [] and again.steps == 12
  np.testing.assert_array_equal(
    jax.device_get(again.params["w"]), jax.device_get(result.params["w"])
  )


def test_stop_hook_ends_the_phase_and_the_reason_survives_a_restart(tmp_path):
  seen = []

  def below_threshold(step, metrics, state):
    seen.append((step, int(jax.device_get(state.step))))
    return "converged" if metrics["loss"] < 1.0 else None

  reference, _ = _fit(tmp_path / "ref", num_steps=40)
  result, ran = _fit(tmp_path / "run", num_steps=40, should_stop=below_threshold)
  stop_step = result.steps
  assert result.stop_reason == "converged" and stop_step % 2 == 0 and stop_step < 40
  assert ran == list(range(stop_step))
  assert all(step == state_step for step, state_step in seen)  # the hook sees the new state
  assert stop_step in Checkpointer(str(tmp_path / "run" / "phase_checkpoints")).all_steps()
  # A rerun sees the stop in the checkpoint and does not train further.
  again, ran_again = _fit(tmp_path / "run", num_steps=40, should_stop=below_threshold)
  assert ran_again == [] and again.stop_reason == "converged" and again.steps == stop_step
  # Without the hook the same phase trains to the end: the stop was the hook's.
  assert reference.steps == 40


def _eval_fn(params, batch):
  """Per-example squared error, and a summed count that must ignore padding rows."""
  err = (batch["x"] @ params["w"] - batch["y"]) ** 2
  return {
    "err": err,
    "index": batch["index"],
    "real_rows": jnp.sum(batch["valid"].astype(jnp.int32)),
    "all_rows": jnp.asarray(batch["valid"].shape[0], jnp.int32),
  }


@pytest.mark.parametrize("batch_size", [8, 16, 40])
def test_predict_drops_padding_rows_and_does_not_depend_on_the_batch_size(batch_size):
  mesh = parallel.data_mesh()
  n = 37  # not a multiple of any batch size: the last batch is padded
  arrays = {"x": X[:n], "y": Y[:n]}
  params = parallel.replicate({"w": jnp.asarray([1.0, -2.0, 0.5])}, mesh)
  out = predict.predict(
    jax.jit(_eval_fn),
    params,
    arrays,
    batch_size=batch_size,
    mesh=mesh,
    keys=("x", "y"),
    collect=("err", "index"),
    sum_over_batches=("real_rows", "all_rows"),
  )
  expected = (X[:n] @ np.array([1.0, -2.0, 0.5], np.float32) - Y[:n]) ** 2
  np.testing.assert_allclose(out["err"], expected, rtol=1e-6)
  np.testing.assert_array_equal(out["index"], np.arange(n))
  assert out.num_examples == n and out.num_padding == -(-n // batch_size) * batch_size - n
  assert int(out["real_rows"]) == n
  assert int(out["all_rows"]) == n + out.num_padding
