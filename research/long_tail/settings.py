"""Typed, validated settings of method M3 (METHODS.md M3), read once from the config.

`Settings.from_config` checks every field the experiment reads and fails at once with one
sentence naming the field, its value and what is allowed; the two checks that need the data
(P against the number of classes, a non-empty head set) are `Settings.check_p_fits` and
`Settings.head_mask`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from research import config_checks
from research.long_tail import core
from research.training.settings import TrainSettings

METHODS = (
  "dual",
  "dual_all_head",
  "dual_alternating",
  "ce",
  "ce_balanced",
  "logit_adjusted",
  "triplet",
)
DUAL_METHODS = ("dual", "dual_all_head", "dual_alternating")  # the dual loss, in some form
CE_METHODS = ("ce", "ce_balanced", "logit_adjusted")
DATASETS = ("digits", "cifar10", "cifar100")
HEAD_SAMPLING = ("random", "pk")
SCHEDULES = ("joint", "alternating")


@dataclasses.dataclass(frozen=True)
class HeadSettings:
  """The head set (METHODS.md M3 step 1) and how the head branch samples it (step 2).

  Attributes:
    mode: `threshold`, `ratio` or `count` (`core.HEAD_MODES`).
    threshold: head = classes with more training images than this (mode `threshold`).
    ratio: head = the top fraction of classes by count (mode `ratio`).
    top_n: head = the top `top_n` classes by count (mode `count`).
    sampling: `random` or `pk` batches from the head set.
    p: classes per head batch when `sampling == "pk"`.
    batch_size: images per head batch (`config.train.head_batch_size`).
  """

  mode: str
  threshold: int | None
  ratio: float | None
  top_n: int | None
  sampling: str
  p: int | None
  batch_size: int


@dataclasses.dataclass(frozen=True)
class TripletSettings:
  """The whole-set PK batch and its triplet loss (METHODS.md M3 step 3)."""

  p: int
  k: int
  mining: str
  margin: float


@dataclasses.dataclass(frozen=True)
class LossSettings:
  """The weights of the dual loss (METHODS.md M3 step 4) and of the logit-adjusted baseline.

  Attributes:
    lambda_ce: weight of the head cross-entropy.
    lambda_tri: weight of the triplet loss.
    logit_adjust_tau: temperature of the logit-adjusted CE baseline.
  """

  lambda_ce: float
  lambda_tri: float
  logit_adjust_tau: float


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything of the config that M3 and its baselines read, validated.

  Attributes:
    dataset: `digits`, `cifar10` or `cifar100`.
    imbalance_ratios: the ratios rho to run, each >= 1.
    augment: crop-and-flip augmentation in every loss.
    head: the head set and head batch.
    triplet: the PK batch and triplet loss.
    loss: the loss weights and the logit-adjustment temperature.
    few: classes with fewer training images than this are few-shot.
    many: classes with more training images than this are many-shot.
    methods: the arms, `dual` first among any of `METHODS`.
    seeds: the seeds, `seed .. seed + num_seeds - 1`.
    train: the shared `train` block.
    schedule: `config.train.schedule` of the `dual` and `dual_all_head` arms: `joint` (one
      update of `lambda_ce * CE + lambda_tri * triplet` per step, METHODS.md M3 step 4
      default) or `alternating` (per step one update on the head CE batch, then one on the
      triplet PK batch: the same images, twice the updates). The arm `dual_alternating` is
      always `alternating`. The patent (seed 002, s13): the head-set training and the whole-set
      training "do not conflict and can run at the same time" (互不冲突，可以同时进行), which
      allows either.
  """

  dataset: str
  imbalance_ratios: tuple[float, ...]
  augment: bool
  head: HeadSettings
  triplet: TripletSettings
  loss: LossSettings
  few: int
  many: int
  methods: tuple[str, ...]
  seeds: tuple[int, ...]
  train: TrainSettings
  schedule: str = "joint"

  @classmethod
  def from_config(cls, config: Any) -> Settings:
    """Reads and validates the config; a wrong value fails naming the field."""
    check = config_checks
    few = check.check_int(config, "eval.few", 0)
    settings = cls(
      dataset=check.check_choice(config, "data.name", DATASETS),
      imbalance_ratios=_imbalance_ratios(config),
      augment=bool(check.get_field(config, "data.augment")),
      head=_head_settings(config),
      triplet=TripletSettings(
        p=check.check_int(config, "triplet.p", 2),
        k=check.check_int(config, "triplet.k", 2),
        mining=check.check_choice(config, "triplet.mining", core.MINING_MODES),
        margin=check.check_float(config, "triplet.margin", 0.0),
      ),
      loss=_loss_settings(config),
      few=few,
      many=check.check_int(config, "eval.many", few),
      methods=_methods(config),
      seeds=_seeds(config),
      train=TrainSettings.from_config(config),
      schedule=check.check_choice(config, "train.schedule", SCHEDULES),
    )
    if settings.schedule == "alternating" and "dual_alternating" in settings.methods:
      raise check.ConfigError(
        "config.methods with 'dual_alternating' is not allowed when "
        "config.train.schedule='alternating': the arm 'dual' is then the same training; "
        "drop 'dual_alternating' or set config.train.schedule='joint'"
      )
    check.check_int(config, "model.embedding_dim", 2)
    return settings

  def arm_schedule(self, method: str) -> str:
    """`joint` or `alternating` for a dual-loss arm (`DUAL_METHODS`); None for the others."""
    if method == "dual_alternating":
      return "alternating"
    return self.schedule if method in DUAL_METHODS else None

  def updates_per_step(self, method: str) -> int:
    """Optimizer updates one training step of `method` makes (2 when alternating)."""
    return 2 if self.arm_schedule(method) == "alternating" else 1

  def images_per_step(self, method: str) -> int:
    """Training images one step of `method` sees (the compute budget per step).

    The dual arms see a head batch plus a P x K batch; triplet-only sees the same P x K batch
    as the dual arm's whole-set branch (so dual - triplet is the head branch alone); the CE
    baselines see `train.batch_size`.
    """
    pk = self.triplet.p * self.triplet.k
    if method in DUAL_METHODS:
      return self.head.batch_size + pk
    if method == "triplet":
      return pk
    return self.train.batch_size

  def head_mask(self, counts: np.ndarray, method: str = "dual") -> np.ndarray:
    """The head set of METHODS.md M3 step 1 from the `[C]` training counts (`[C]` bool).

    For the ablation arm `dual_all_head` every class is in the head set (the dual loss with
    the head split switched off); every other arm uses the configured rule.
    """
    if method == "dual_all_head":
      return np.ones(len(counts), bool)
    h = self.head
    return core.head_classes(counts, h.mode, threshold=h.threshold, ratio=h.ratio, top_n=h.top_n)

  def check_p_fits(self, num_classes: int, num_head: int) -> None:
    """P of the PK samplers must not exceed the classes it draws from (whole set, head set)."""
    if self.triplet.p > num_classes:
      raise config_checks.ConfigError(
        f"config.triplet.p={self.triplet.p} is not allowed: it must be <= the number of classes "
        f"({num_classes})"
      )
    if self.head.sampling == "pk" and self.head.p > num_head:
      raise config_checks.ConfigError(
        f"config.head.p={self.head.p} is not allowed: it must be <= the number of head classes "
        f"({num_head})"
      )


def _imbalance_ratios(config: Any) -> tuple[float, ...]:
  ratios = config_checks.get_field(config, "data.imbalance_ratios")
  if not isinstance(ratios, tuple | list) or not ratios:
    raise config_checks.ConfigError(
      f"config.data.imbalance_ratios={ratios!r} is not allowed: give a non-empty tuple of ratios"
    )
  for r in ratios:
    if isinstance(r, bool) or not isinstance(r, int | float) or r < 1:
      raise config_checks.ConfigError(
        f"config.data.imbalance_ratios={tuple(ratios)!r} is not allowed: every ratio must be a "
        "number >= 1"
      )
  return tuple(float(r) for r in ratios)


def _loss_settings(config: Any) -> LossSettings:
  lambda_ce = config_checks.check_float(config, "loss.lambda_ce", 0.0)
  lambda_tri = config_checks.check_float(config, "loss.lambda_tri", 0.0)
  if lambda_ce == 0 and lambda_tri == 0:
    raise config_checks.ConfigError(
      "config.loss.lambda_ce=0 and config.loss.lambda_tri=0 is not allowed: one must be > 0"
    )
  return LossSettings(
    lambda_ce, lambda_tri, config_checks.check_float(config, "loss.logit_adjust_tau", 0.0)
  )


def _methods(config: Any) -> tuple[str, ...]:
  methods = config_checks.get_field(config, "methods")
  allowed = isinstance(methods, tuple | list) and "dual" in methods
  if not allowed or set(methods) - set(METHODS):
    raise config_checks.ConfigError(
      f"config.methods={methods!r} is not allowed: give 'dual' and any of {METHODS}"
    )
  return tuple(methods)


def _seeds(config: Any) -> tuple[int, ...]:
  num_seeds = config_checks.check_int(config, "num_seeds", 1)
  seed = config_checks.check_int(config, "seed", 0)
  return tuple(range(seed, seed + num_seeds))


def _head_settings(config: Any) -> HeadSettings:
  check = config_checks
  mode = check.check_choice(config, "head.mode", core.HEAD_MODES)
  threshold = ratio = top_n = None
  if mode == "threshold":
    threshold = check.check_int(config, "head.threshold", 0)
  elif mode == "ratio":
    ratio = check.check_float(config, "head.ratio", 0.0, 1.0, exclusive_minimum=True)
  else:
    top_n = check.check_int(config, "head.top_n", 1)
  sampling = check.check_choice(config, "head.sampling", HEAD_SAMPLING)
  batch_size = check.check_int(config, "train.head_batch_size", 1)
  head_p = None
  if sampling == "pk":
    head_p = check.check_int(config, "head.p", 1)
    if batch_size % head_p:
      raise check.ConfigError(
        f"config.head.p={head_p} is not allowed: it must divide "
        f"config.train.head_batch_size={batch_size}"
      )
  return HeadSettings(mode, threshold, ratio, top_n, sampling, head_p, batch_size)
