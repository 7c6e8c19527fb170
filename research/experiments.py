"""Registry of experiments: `config.experiment` names the module with `train_and_evaluate`.

Each experiment also names the module whose `write_report(results, workdir) -> summary`
builds `report.md`, the plots and `summary.json` from saved `Results` alone, so a report can be
rebuilt without training (`python -m launch.report --workdir=DIR`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from research.study.results import Results

# name -> (module with train_and_evaluate, module with write_report)
EXPERIMENTS = {
  "supervised_classification": (
    "research.supervised.classification",
    "research.supervised.classification",
  ),
  "supervised_segmentation": (
    "research.supervised.segmentation",
    "research.supervised.segmentation",
  ),
  "uap_segmentation": ("research.uap_segmentation.experiment", "research.uap_segmentation.report"),
  "norm_selection": ("research.norm_selection.experiment", "research.norm_selection.report"),
  "long_tail": ("research.long_tail.experiment", "research.long_tail.report"),
  "incremental_panoptic": (
    "research.incremental_panoptic.experiment",
    "research.incremental_panoptic.report",
  ),
  "ot_perturbation": ("research.ot_perturbation.experiment", "research.ot_perturbation.report"),
}


def _modules(name: str) -> tuple[str, str]:
  if name not in EXPERIMENTS:
    raise ValueError(
      f"config.experiment={name!r} is not known: allowed experiments are {sorted(EXPERIMENTS)}"
    )
  return EXPERIMENTS[name]


def get_train_and_evaluate(name: str) -> Callable:
  """The `train_and_evaluate(config, workdir)` function of experiment `name`."""
  return importlib.import_module(_modules(name)[0]).train_and_evaluate


def get_write_report(name: str) -> Callable:
  """The `write_report(results, workdir) -> summary` function of experiment `name`."""
  return importlib.import_module(_modules(name)[1]).write_report


def rebuild_report(workdir: str) -> dict:
  """Writes the report of `workdir` again from its `results.json`; returns the summary."""
  results = Results.load(workdir)
  return get_write_report(results.experiment)(results, workdir)
