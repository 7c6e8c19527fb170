"""Registry of experiments: `config.experiment` names the module with `train_and_evaluate`."""

from __future__ import annotations

import importlib
from collections.abc import Callable

EXPERIMENTS = {
  "supervised_classification": "research.supervised.classification",
  "supervised_segmentation": "research.supervised.segmentation",
  "uap_segmentation": "research.uap_segmentation.experiment",
  "norm_selection": "research.norm_selection.experiment",
  "long_tail": "research.long_tail.experiment",
  "incremental_panoptic": "research.incremental_panoptic.experiment",
  "ot_perturbation": "research.ot_perturbation.experiment",
}


def get_train_and_evaluate(name: str) -> Callable:
  """The `train_and_evaluate(config, workdir)` function of experiment `name`."""
  if name not in EXPERIMENTS:
    raise ValueError(
      f"config.experiment={name!r} is not known: allowed experiments are {sorted(EXPERIMENTS)}"
    )
  return importlib.import_module(EXPERIMENTS[name]).train_and_evaluate
