"""Settings every experiment shares: the `train` block of a config, typed and validated."""

from __future__ import annotations

import dataclasses
from typing import Any

from research import config_checks


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """The `train` block: length, batch sizes, logging and checkpointing.

  Attributes:
    steps: updates per training phase.
    batch_size: images per update (global, over all devices).
    eval_batch_size: images per evaluation batch.
    log_every: steps between metric lines.
    checkpoint_every: steps between checkpoints (0: only at the end).
  """

  steps: int
  batch_size: int
  eval_batch_size: int
  log_every: int
  checkpoint_every: int

  @classmethod
  def from_config(cls, config: Any) -> TrainSettings:
    """Reads and validates `config.train`; a wrong value fails naming the field."""
    return cls(
      steps=config_checks.check_int(config, "train.steps", 1),
      batch_size=config_checks.check_int(config, "train.batch_size", 1),
      eval_batch_size=config_checks.check_int(config, "train.eval_batch_size", 1),
      log_every=config_checks.check_int(config, "train.log_every", 1),
      checkpoint_every=config_checks.check_int(config, "train.checkpoint_every", 0),
    )
