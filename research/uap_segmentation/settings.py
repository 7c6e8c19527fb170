"""Typed, validated settings of the M1 experiment, built once from the config.

Every check runs before any data is read: a wrong value fails at once with one sentence that
names the field, the value and what is allowed (`research.config_checks.ConfigError`).
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from research import config_checks
from research.data import catalogue, street_scenes
from research.supervised import segmentation
from research.training.settings import TrainSettings
from research.uap_segmentation import core

ABLATION_ATTACKS = ("eps_round", "correct_pixels")


@dataclasses.dataclass(frozen=True)
class UnifySettings:
  """How the per-dataset perturbations are made and unified (METHODS.md M1 steps 4-5).

  `gamma` and `eps_r` are chosen per seed on the validation split (the last
  `val_per_dataset` training images of each dataset, never trained on or attacked) from the
  grids below, by targeted success of the baseline under `R`; never on the headline splits.

  Attributes:
    images_per_dataset: the first this many training images of each dataset are attacked.
    weight_mode: sample weights `w_n` of `r_D` (`core.WEIGHT_MODES`).
    gamma_scales: grid of `gamma / xi` (the amplitude-limiting factor; 1 is METHODS.md's
      default `gamma = xi`).
    eps_rs: grid of the control factor of `R`'s random term (claims 3 and 7; > 0 keeps the term
      on, as METHODS.md asks; `R` without it is reported beside).
    val_per_dataset: validation images carved from the end of each training dataset.
    norm: normalisation of each `r_D` before the mean (`core.NORMS`).
  """

  images_per_dataset: int
  weight_mode: str
  gamma_scales: tuple[float, ...]
  eps_rs: tuple[float, ...]
  val_per_dataset: int
  norm: str


@dataclasses.dataclass(frozen=True)
class AdvTrainSettings:
  """Adversarial training and its clean fine-tune control (METHODS.md M1 steps 6-7).

  Attributes:
    steps: updates of each fine-tuning phase.
    ratio: fraction of each batch replaced by second samples `clip(x + R)`.
    learning_rate: peak learning rate of the fine-tuning schedule.
    checkpoint_every: steps between checkpoints (0: only at the end).
  """

  steps: int
  ratio: float
  learning_rate: float
  checkpoint_every: int


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything the M1 experiment reads from its config.

  Attributes:
    train: the baseline's `train` block.
    class_names: the K class names of the dataset.
    pair_names: the confusable `(src, tgt)` pairs by name.
    pairs: `[P, 2]` int32 class ids of `pair_names`.
    attack: the static per-sample attack (steps 1-3).
    unify: per-dataset and unified perturbations (steps 4-5).
    adv_train: adversarial training and its control (steps 6-7).
    overlay_images: images per split in the overlay figure.
    seeds: `seed .. seed + num_seeds - 1`; each seed runs the whole study (baseline, attacks,
      tuning, adversarial training, control).
    ablation_attacks: extra attacks on the baseline (`ABLATION_ATTACKS`): `eps_round` (claim 5's
      in-round term switched off) and `correct_pixels` (the other `correct_pixels` option).
  """

  train: TrainSettings
  class_names: tuple[str, ...]
  pair_names: tuple[tuple[str, str], ...]
  pairs: np.ndarray
  attack: core.AttackConfig
  unify: UnifySettings
  adv_train: AdvTrainSettings
  overlay_images: int
  seeds: tuple[int, ...]
  ablation_attacks: tuple[str, ...]

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> Settings:
    """Validates `config` and builds the settings; fails naming the first wrong field."""
    train = segmentation.validate(config)
    _check_data(config)
    names = (
      catalogue.CITYSCAPES_CLASS_NAMES
      if config.data.name == "cityscapes"
      else street_scenes.CLASS_NAMES
    )
    pair_names = tuple(tuple(p) for p in config_checks.get_field(config, "attack.pairs"))
    try:
      pairs = core.resolve_confusable_pairs(pair_names, names)
    except ValueError as e:
      raise config_checks.ConfigError(f"config.attack.pairs: {e}") from e
    unit = {
      f: config_checks.check_float(config, f"attack.{f}", 0.0, 1.0, exclusive_minimum=True)
      for f in ("xi", "alpha", "rho")
    }
    rounds = config_checks.check_int(config, "attack.rounds", 1)
    images = config_checks.check_int(config, "attack.images_per_dataset", 1)
    non_negative = {
      f: config_checks.check_float(config, f"attack.{f}", 0.0)
      for f in ("eps_r", "w_t", "w_c", "eps_round")
    }
    if non_negative["w_t"] == 0 and non_negative["w_c"] == 0:
      raise config_checks.ConfigError(
        "config.attack.w_t=0 and config.attack.w_c=0 is not allowed: one weight must be > 0"
      )
    unify = UnifySettings(
      images_per_dataset=images,
      weight_mode=config_checks.check_choice(config, "attack.weight_mode", core.WEIGHT_MODES),
      gamma_scales=_grid(config, "tune.gamma_scales", positive=True),
      eps_rs=_grid(config, "tune.eps_rs", positive=False),
      val_per_dataset=config_checks.check_int(config, "tune.val_per_dataset", 1),
      norm=config_checks.check_choice(config, "attack.norm", core.NORMS),
    )
    correct_pixels = config_checks.check_choice(
      config, "attack.correct_pixels", core.CORRECT_PIXELS
    )
    ablations = tuple(config_checks.get_field(config, "ablation_attacks"))
    if any(a not in ABLATION_ATTACKS for a in ablations) or len(set(ablations)) < len(ablations):
      raise config_checks.ConfigError(
        f"config.ablation_attacks={ablations} is not allowed: give distinct entries of "
        f"{ABLATION_ATTACKS}"
      )
    if "eps_round" in ablations and non_negative["eps_round"] == 0:
      raise config_checks.ConfigError(
        "config.ablation_attacks contains 'eps_round' but config.attack.eps_round=0 is not "
        "allowed with it: the ablation switches the in-round random term off, so it must be on"
      )
    seed = config_checks.check_int(config, "seed", 0)
    num_seeds = config_checks.check_int(config, "num_seeds", 1)
    adv_train = AdvTrainSettings(
      steps=config_checks.check_int(config, "adv_train.steps", 1),
      ratio=config_checks.check_float(config, "adv_train.ratio", 0.0, 1.0),
      learning_rate=config_checks.check_float(
        config, "adv_train.learning_rate", 0.0, exclusive_minimum=True
      ),
      checkpoint_every=config_checks.check_int(config, "adv_train.checkpoint_every", 0),
    )
    attack = core.AttackConfig(
      rounds=rounds,
      **unit,
      **non_negative,
      correct_pixels=correct_pixels,
      ignore_label=street_scenes.IGNORE_LABEL,
    )
    return cls(
      train=train,
      class_names=tuple(names),
      pair_names=pair_names,
      pairs=np.asarray(pairs, np.int32),
      attack=attack,
      unify=unify,
      adv_train=adv_train,
      overlay_images=config_checks.check_int(config, "report.overlay_images", 1),
      seeds=tuple(range(seed, seed + num_seeds)),
      ablation_attacks=ablations,
    )


def _grid(config: ml_collections.ConfigDict, field: str, *, positive: bool) -> tuple:
  """A non-empty tuple of distinct numbers, each > 0 (`positive`) or >= 0."""
  values = config_checks.get_field(config, field)
  values = tuple(values) if isinstance(values, tuple | list) else (values,)
  bound = "> 0" if positive else ">= 0"
  ok = all(
    isinstance(v, int | float) and not isinstance(v, bool) and (v > 0 if positive else v >= 0)
    for v in values
  )
  if not values or not ok or len(set(values)) < len(values):
    raise config_checks.ConfigError(
      f"config.{field}={values} is not allowed: give one or more distinct numbers {bound}"
    )
  return tuple(float(v) for v in values)


def _check_size_multiple(field: str, sizes: tuple, multiple: int) -> None:
  if len(sizes) != 2 or any(not isinstance(s, int) or s < 16 or s % multiple for s in sizes):
    raise config_checks.ConfigError(
      f"config.{field}={tuple(sizes)} is not allowed: give (height, width), each an integer "
      f">= 16 and a multiple of {multiple} (the segmenter's total stride)"
    )


def _check_data(config: ml_collections.ConfigDict) -> None:
  """The data checks of M1 beyond the baseline's: one image size, an unseen held-out domain."""
  multiple = 2 ** (len(config.model.stage_sizes) - 1)
  if config.data.name == "street_scenes":
    overlap = set(config.data.train_domains) & set(config.data.heldout_domains)
    if overlap:
      raise config_checks.ConfigError(
        f"config.data.heldout_domains={tuple(config.data.heldout_domains)} is not allowed: "
        f"{sorted(overlap)} are also training domains; a held-out domain must be unseen"
      )
    size = config.data.image_size
    _check_size_multiple("data.image_size", (size, size), multiple)
    return
  resize = tuple(config_checks.get_field(config, "data.resize"))
  if not resize:
    raise config_checks.ConfigError(
      "config.data.resize=() is not allowed: Cityscapes images (1024 x 2048) must be resized "
      "to one small (height, width), e.g. (64, 128)"
    )
  _check_size_multiple("data.resize", resize, multiple)
  config_checks.check_int(config, "data.num_datasets", 1)
  config_checks.check_int(config, "data.train_images", 0)
  config_checks.check_int(config, "data.heldout_images", 0)
  config_checks.check_float(config, "data.test_fraction", 0.0, 0.5, exclusive_minimum=True)
