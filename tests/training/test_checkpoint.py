"""Checkpointer: another run's checkpoint vs corrupted files, quarantine, failed saves, restart."""

import errno
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from etils import epath

from research.training import checkpoint, loop, parallel, state, steps
from research.training.checkpoint import Checkpointer

FINGERPRINT = {"config_hash": "9f2c", "experiment": "toy", "phase": "train"}


def _state(width=3, tx=None):
  return state.create_train_state(
    {"w": jnp.arange(width, dtype=jnp.float32)}, tx or optax.adam(0.1)
  )


def _save(directory, steps_to_save, fingerprint=FINGERPRINT, train_state=None):
  ckpt = Checkpointer(str(directory), fingerprint=fingerprint)
  for step in steps_to_save:
    ckpt.save(step, (train_state or _state()).replace(step=jnp.int32(step)), {"at": step})
  ckpt.close()


def test_restores_newest_checkpoint_of_the_same_run(tmp_path):
  _save(tmp_path, [2, 4])
  restored, extras, step = Checkpointer(str(tmp_path), fingerprint=FINGERPRINT).restore_latest(
    _state()
  )
  assert (step, extras, int(restored.step)) == (4, {"at": 4}, 4)
  np.testing.assert_array_equal(restored.params["w"], [0.0, 1.0, 2.0])


@pytest.mark.parametrize(
  "change,fingerprint,template,expected",
  [
    (
      "config",
      {**FINGERPRINT, "config_hash": "77aa"},
      _state,
      "fingerprint config_hash was '9f2c' and is now '77aa'",
    ),
    ("model", FINGERPRINT, lambda: _state(width=5), "['w'] was float32[3] and is now float32[5]"),
    (
      "optimizer",
      FINGERPRINT,
      lambda: _state(tx=optax.sgd(0.1, momentum=0.9)),
      ".opt_state[0].count is in the checkpoint but not in this run",
    ),
  ],
)
def test_another_runs_checkpoint_is_one_clear_error(
  tmp_path, change, fingerprint, template, expected
):
  _save(tmp_path, [2, 4])
  ckpt = Checkpointer(str(tmp_path), fingerprint=fingerprint)
  with pytest.raises(checkpoint.CheckpointMismatchError) as err:
    ckpt.restore_latest(template())
  message = str(err.value)
  assert expected in message, (change, message)
  assert "step 4" in message and "--restart" in message and "new workdir" in message
  assert ckpt.all_steps() == [2, 4]  # nothing was skipped, moved or deleted


def _corrupt(step_dir):
  for f in step_dir.rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")


def test_corrupted_checkpoint_is_quarantined_and_frees_its_slot(tmp_path):
  _save(tmp_path, [2, 4, 6])
  _corrupt(tmp_path / "6")
  ckpt = Checkpointer(str(tmp_path), fingerprint=FINGERPRINT)
  _, extras, step = ckpt.restore_latest(_state())
  assert (step, extras) == (4, {"at": 4})
  assert (tmp_path / "quarantine" / "6").is_dir() and not (tmp_path / "6").exists()
  for s in (6, 8, 10):  # the resumed run passes the bad step; three complete steps are kept
    ckpt.save(s, _state(), {"at": s})
  ckpt.close()
  assert Checkpointer(str(tmp_path)).all_steps() == [6, 8, 10]


def test_fingerprint_must_be_flat_json_scalars(tmp_path):
  with pytest.raises(ValueError, match=r"fingerprint\['sizes'\]=\(1, 2\) is not allowed"):
    Checkpointer(str(tmp_path), fingerprint={"sizes": (1, 2)})


X = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)


def _linear_loss(params, batch, rng):
  del rng
  return jnp.mean((batch["x"] @ params["w"] - 1.0) ** 2), {}


def _train(directory, num_steps):
  """A linear model trained with SGD and checkpoints every 2 steps."""
  tx = optax.sgd(0.1)
  mesh = parallel.data_mesh(jax.devices()[:1])
  train_state = parallel.replicate(_state(tx=tx), mesh)
  ckpt = Checkpointer(str(directory))
  try:
    train_state, _ = loop.restore_or_init(ckpt, train_state)
    step = parallel.compile_train_step(
      functools.partial(steps.train_step, loss_fn=_linear_loss, tx=tx), mesh
    )
    loop.train_loop(
      train_state,
      step,
      lambda i: parallel.shard_batch({"x": X}, mesh),
      jax.random.key(0),
      num_steps=num_steps,
      checkpointer=ckpt,
      checkpoint_every=2,
      log_every=2,
    )
  finally:
    ckpt.close()


# Orbax's failed background write leaves an asyncio callback that fires after its loop closed.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_failed_save_stops_the_run_loudly_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
  _train(tmp_path / "reference", 2)
  write_text = epath.Path.write_text

  def disk_full_at_step_4(path, *args, **kwargs):
    if "4.orbax-checkpoint-tmp" in str(path):
      raise OSError(errno.ENOSPC, "No space left on device")
    return write_text(path, *args, **kwargs)

  monkeypatch.setattr(epath.Path, "write_text", disk_full_at_step_4)
  with pytest.raises(checkpoint.CheckpointSaveError) as err:
    _train(tmp_path / "run", 8)
  monkeypatch.undo()
  assert "checkpoint of step 4" in str(err.value) and "No space left on device" in str(err.value)
  assert "step 2, is intact" in str(err.value)
  ckpt = Checkpointer(str(tmp_path / "run"))
  assert ckpt.all_steps() == [2]
  restored, _, step = ckpt.restore_latest(_state(tx=optax.sgd(0.1)))
  reference, _, _ = Checkpointer(str(tmp_path / "reference")).restore_latest(
    _state(tx=optax.sgd(0.1))
  )
  assert step == 2
  np.testing.assert_array_equal(restored.params["w"], reference.params["w"])


def test_clear_checkpoints_deletes_only_checkpoint_folders(tmp_path):
  _save(tmp_path / "train_checkpoints", [2])
  _save(tmp_path / "seed_1" / "finetune_checkpoints", [2])
  (tmp_path / "metrics.jsonl").write_text("{}\n")
  (tmp_path / "plots").mkdir()
  removed = checkpoint.clear_checkpoints(str(tmp_path))
  assert removed == [
    str(tmp_path / "seed_1" / "finetune_checkpoints"),
    str(tmp_path / "train_checkpoints"),
  ]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "plots", "seed_1"]


def test_orbax_directory_keeps_a_bucket_path_and_makes_a_local_one_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert str(checkpoint.orbax_directory("gs://bucket/run/phase")) == "gs://bucket/run/phase"
  assert checkpoint.orbax_directory("run/phase") == tmp_path / "run" / "phase"
