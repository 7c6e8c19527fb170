r"""Runs one experiment: `python -m launch.main --config=configs/X.py[:smoke] --workdir=DIR`.

Overrides: `--config.train.steps=100`. Multi-host: `--distributed` calls
`jax.distributed.initialize()` first. A run started again with the same command resumes from
its newest checkpoint in DIR.
"""

import json

from absl import app, flags, logging
from ml_collections import config_flags

from research import experiments
from research.training import parallel, progress

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
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  """Runs the configured experiment."""
  del argv
  parallel.initialize_distributed(_DISTRIBUTED.value)
  progress.quiet_library_logs()
  config = _CONFIG.value
  train_and_evaluate = experiments.get_train_and_evaluate(config.experiment)
  summary = train_and_evaluate(config, _WORKDIR.value)
  logging.info("summary: %s", json.dumps(summary.get("rows", []), default=float))


if __name__ == "__main__":
  app.run(main)
