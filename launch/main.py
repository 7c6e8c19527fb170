r"""Runs one experiment: `python -m launch.main --config=configs/X.py[:smoke] --workdir=DIR`.

Overrides: `--config.train.steps=100`. Multi-host: `--distributed` calls
`jax.distributed.initialize()` first. A run started again with the same command resumes from
its newest checkpoint in DIR; `--restart` deletes DIR's checkpoints first and starts from step
0 (needed after a config change, which makes the old checkpoints another run's). One run at a
time holds DIR: a second one fails at once, naming the holder's pid. TensorBoard event files
go to DIR/tb/ (`tensorboard --logdir DIR`); `--tensorboard=false` turns them off.

DIR may be any `etils.epath` location, e.g. `gs://bucket/runs/x` on a TPU VM: every file of the
run is written through `etils.epath`; such a DIR is locked on the machine that runs only
(`research.training.workdir_lock`).
"""

import json

import jax
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from research import experiments
from research.training import checkpoint, parallel, progress, tensorboard, workdir_lock

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Experiment config file (configs/*.py), optionally `:smoke` or `:demo`.",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and report.")
_DISTRIBUTED = flags.DEFINE_bool(
  "distributed", False, "Call jax.distributed.initialize() (multi-host TPU VMs / GPU clusters)."
)
_RESTART = flags.DEFINE_bool(
  "restart", False, "Delete the workdir's checkpoints and train from step 0 instead of resuming."
)
_TENSORBOARD = flags.DEFINE_bool(
  "tensorboard", True, "Write TensorBoard event files to <workdir>/tb/ (tensorboard --logdir)."
)
flags.mark_flags_as_required(["config", "workdir"])


def restart(workdir: str) -> None:
  """Deletes `workdir`'s checkpoints (on the first host; the others wait for it)."""
  if jax.process_index() == 0:
    removed = checkpoint.clear_checkpoints(workdir)
    logging.info("--restart: deleted %d checkpoint folder(s): %s", len(removed), removed)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("launch.main --restart")


def main(argv):
  """Runs the configured experiment."""
  del argv
  parallel.initialize_distributed(_DISTRIBUTED.value)
  progress.quiet_library_logs()
  progress.set_tensorboard_default(_TENSORBOARD.value)
  config = _CONFIG.value
  train_and_evaluate = experiments.get_train_and_evaluate(config.experiment)
  with workdir_lock.hold(_WORKDIR.value):
    try:
      if _RESTART.value:
        restart(_WORKDIR.value)
      summary = train_and_evaluate(config, _WORKDIR.value)
    finally:
      tensorboard.flush_all()  # a workdir that is not local: metrics and events not yet written
  logging.info("summary: %s", json.dumps(summary.get("rows", []), default=float))


if __name__ == "__main__":
  app.run(main)
