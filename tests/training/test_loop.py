import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from research.data import samplers
from research.training import loop, parallel, state, steps
from research.training.checkpoint import Checkpointer

X = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
Y = X @ np.array([1.0, -2.0, 0.5], np.float32) + 0.1


def _loss(params, batch, rng):
  noise = 0.01 * jax.random.normal(rng, batch["y"].shape)  # uses the per-step key
  pred = batch["x"] @ params["w"] + params["b"]
  return jnp.mean((pred - batch["y"] - noise) ** 2), {}


class _Killed(RuntimeError):
  pass


def _run(workdir, num_steps=12, kill_at=None, loss_fn=_loss, poison_from=None):
  mesh = parallel.data_mesh(jax.devices()[:1])
  tx = optax.adam(0.05)
  init = state.create_train_state({"w": jnp.zeros(3), "b": jnp.zeros(())}, tx)
  ckpt = Checkpointer(os.path.join(workdir, "ckpt"))
  s, _ = loop.restore_or_init(ckpt, parallel.replicate(init, mesh))
  step = parallel.compile_train_step(
    functools.partial(steps.train_step, loss_fn=loss_fn, tx=tx), mesh
  )
  sampler = samplers.RandomSampler(64, 8, seed=3)

  def batch_fn(i):
    idx = sampler.indices(i)
    x = X[idx] * (1e4 if poison_from is not None and i >= poison_from else 1.0)
    return parallel.shard_batch({"x": x, "y": Y[idx]}, mesh)

  def kill(done):
    if kill_at is not None and done == kill_at:
      raise _Killed()

  try:
    s = loop.train_loop(
      s,
      step,
      batch_fn,
      jax.random.key(1),
      num_steps=num_steps,
      checkpointer=ckpt,
      checkpoint_every=4,
      log_every=4,
      on_step_end=kill,
    ).state
  finally:
    ckpt.close()
  return jax.device_get(s.params), ckpt


@pytest.mark.parametrize("kill_at", [3, 6, 9])
def test_killed_run_resumes_to_the_same_parameters(tmp_path, kill_at):
  reference, _ = _run(str(tmp_path / "ref"))
  with pytest.raises(_Killed):
    _run(str(tmp_path / "run"), kill_at=kill_at)
  resumed, ckpt = _run(str(tmp_path / "run"))
  np.testing.assert_array_equal(resumed["w"], reference["w"])
  np.testing.assert_array_equal(resumed["b"], reference["b"])
  assert ckpt.all_steps()[-1] == 12


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  def bad_loss(params, batch, rng):
    loss, aux = _loss(params, batch, rng)
    return jnp.where(jnp.max(batch["x"]) > 1e3, jnp.nan, loss), aux

  with pytest.raises(loop.NonFiniteLossError, match="non-finite at step 6;") as err:
    _run(str(tmp_path), num_steps=20, loss_fn=bad_loss, poison_from=6)
  assert Checkpointer(str(tmp_path / "ckpt")).all_steps() == [4]
  assert "last good checkpoint is step 4" in str(err.value)


def test_corrupted_latest_checkpoint_falls_back_to_previous(tmp_path):
  _run(str(tmp_path), num_steps=8)
  ckpt_dir = tmp_path / "ckpt"
  latest = ckpt_dir / "8" / "state"
  for f in latest.rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  shutil.rmtree(ckpt_dir / "8" / "state" / "d", ignore_errors=True)
  tx = optax.adam(0.05)
  template = state.create_train_state({"w": jnp.zeros(3), "b": jnp.zeros(())}, tx)
  restored = Checkpointer(str(ckpt_dir)).restore_latest(template)
  assert restored is not None and restored[2] == 4
  assert int(restored[0].step) == 4
