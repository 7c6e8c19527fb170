"""Typed, validated settings of M4 (class-incremental panoptic fine-tuning).

`Settings.from_config(config)` checks every field the experiment uses and fails at once with
one sentence naming the field, the value and what is allowed. The step-1 variants are data
(`VARIANTS`); each training's loss is fixed by a `LossSpec` (pseudo-label rule, weighting,
distillation weight), which is bound into its compiled step as Python constants.
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from research import config_checks
from research.data import street_scenes
from research.incremental_panoptic import core
from research.training import fit


@dataclasses.dataclass(frozen=True)
class Variant:
  """One step-1 training, all from the step-0 parameters with the same images and steps.

  Attributes:
    title: its name in the report.
    labels: `new` (the new-class labels only) or `all` (every label of the step-1 images).
    pseudo: adds old-class pseudo labels of the historical model (M4 step 3).
    distill: adds the distillation loss (M4 step 5).
    weighting: distillation weighting (`core.WEIGHTINGS`); None: `config.method.weighting`.
    overlap_rule: pseudo-label overlap rule (`core.OVERLAP_RULES`); None:
      `config.method.overlap_rule`.
  """

  title: str
  labels: str = "new"
  pseudo: bool = False
  distill: bool = False
  weighting: str | None = None
  overlap_rule: str | None = None


VARIANTS = {
  "naive": Variant("naive fine-tuning"),
  "method": Variant(
    "this method (pseudo labels + weighted distillation)", pseudo=True, distill=True
  ),
  "joint": Variant("joint: all labels (ceiling)", labels="all"),
  "no_pseudo": Variant("without pseudo labels", distill=True),
  "no_distill": Variant("without distillation", pseudo=True),
  "no_weighting": Variant("without weighting (w = 1)", pseudo=True, distill=True, weighting="none"),
  "comformer": Variant(
    "CoMFormer overlap rule, w = (1 - p_no-object)^2",
    pseudo=True,
    distill=True,
    weighting="squared",
    overlap_rule="remove_true_pixels",
  ),
  "true_wins": Variant(
    "matched masks dropped and true pixels removed from the rest",
    pseudo=True,
    distill=True,
    overlap_rule="drop_matched_true_wins",
  ),
}


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """The static choices of one training's loss; each distinct spec compiles its own step.

  Attributes:
    historical: the frozen historical model runs (pseudo labels or distillation need it).
    pseudo: old-class pseudo labels join the true labels.
    overlap_rule: the pseudo-label overlap rule (`core.OVERLAP_RULES`).
    weighting: the distillation weighting (`core.WEIGHTINGS`).
    kd_weight: lambda_kd; the distillation loss is computed whenever `historical`.
  """

  historical: bool
  pseudo: bool
  overlap_rule: str
  weighting: str
  kd_weight: float


@dataclasses.dataclass(frozen=True)
class PhaseSettings:
  """One training phase (`step0` or `step1`): linear warm-up, then cosine decay to 0."""

  steps: int
  learning_rate: float
  warmup_steps: int


@dataclasses.dataclass(frozen=True)
class ModelSettings:
  """The Mask2Former-style model of `config.model`."""

  widths: tuple[int, ...]
  stem_stride: int
  hidden_dim: int
  num_queries: int
  num_decoder_layers: int
  num_heads: int
  ffn_dim: int


@dataclasses.dataclass(frozen=True)
class PseudoLabelSettings:
  """Thresholds of `core.old_class_pseudo_labels` (M4 step 3); the overlap rule is per spec."""

  match_iou: float
  noise_threshold: float
  max_owners: int
  min_area_ratio: float
  query_score_threshold: float


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything M4 reads from its config besides the data source (see `load_panoptic_data`).

  Attributes:
    seed: seeds the initial parameters, the step-0/step-1 image split and the batch order.
    num_classes: `C` real classes.
    thing_classes: the classes with instances.
    old_classes: classes labelled in step 0 (known to the historical model).
    new_classes: classes labelled in step 1.
    image_size: side `S` of the square images.
    max_segments: `T` target slots (and segment-table length).
    step0_fraction: share of the training images used in step 0.
    model: the model.
    criterion: `set_criterion_loss` weights (`w_class`, `w_bce`, `w_dice`, `no_object_weight`).
    pseudo: pseudo-label thresholds.
    overlap_rule: the method's pseudo-label overlap rule.
    weighting: the method's distillation weighting.
    kd_weight: lambda_kd of the variants with distillation.
    temperature: distillation temperature.
    inference: `panoptic_inference` thresholds (`object_mask_threshold`, `overlap_threshold`).
    variants: the step-1 variants to train, keys of `VARIANTS`.
    step0: the base training.
    step1: every fine-tuning.
    weight_decay: AdamW decay (kernels only).
    batch_size: images per update.
    eval_batch_size: images per evaluation batch.
    log_every: steps between metric lines.
    checkpoint_every: steps between checkpoints (0: only at the end of a phase).
    num_overlays: test images drawn in the overlay figure.
  """

  seed: int
  num_classes: int
  thing_classes: tuple[int, ...]
  old_classes: tuple[int, ...]
  new_classes: tuple[int, ...]
  image_size: int
  max_segments: int
  step0_fraction: float
  model: ModelSettings
  criterion: dict
  pseudo: PseudoLabelSettings
  overlap_rule: str
  weighting: str
  kd_weight: float
  temperature: float
  inference: dict
  variants: tuple[str, ...]
  step0: PhaseSettings
  step1: PhaseSettings
  weight_decay: float
  batch_size: int
  eval_batch_size: int
  log_every: int
  checkpoint_every: int
  num_overlays: int

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> Settings:
    """Reads and validates `config`; a wrong value raises `config_checks.ConfigError`."""
    _check_data(config)
    num_classes = config_checks.check_int(config, "data.num_classes", 2)
    model = _model(config)
    size = config_checks.check_int(config, "data.image_size", 8)
    if size % (model.stem_stride * 2 ** len(model.widths)):
      raise config_checks.ConfigError(
        f"config.data.image_size={size} is not allowed: it must be a multiple of "
        f"{model.stem_stride * 2 ** len(model.widths)} (stem_stride * 2**len(model.widths))"
      )
    things = tuple(config_checks.get_field(config, "data.thing_classes"))
    if any(not 0 <= c < num_classes for c in things):
      raise config_checks.ConfigError(
        f"config.data.thing_classes={things} is not allowed: ids must be in [0, {num_classes})"
      )
    old = tuple(config_checks.get_field(config, "data.old_classes"))
    new = tuple(config_checks.get_field(config, "data.new_classes"))
    try:
      core.check_class_split(list(old), list(new), num_classes)
    except ValueError as e:
      raise config_checks.ConfigError(f"config.data: {e}") from e
    max_segments = config_checks.check_int(config, "data.max_segments", 1)
    if max_segments > model.num_queries:
      raise config_checks.ConfigError(
        f"config.data.max_segments={max_segments} is not allowed: it must be <= "
        f"model.num_queries={model.num_queries} (every target needs its own query)"
      )
    variants = tuple(config_checks.get_field(config, "variants"))
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or "naive" not in variants or "method" not in variants:
      raise config_checks.ConfigError(
        f"config.variants={variants} is not allowed: give 'naive', 'method' and any of "
        f"{tuple(VARIANTS)}"
      )
    return cls(
      seed=config_checks.check_int(config, "seed"),
      num_classes=num_classes,
      thing_classes=things,
      old_classes=old,
      new_classes=new,
      image_size=size,
      max_segments=max_segments,
      step0_fraction=config_checks.check_float(
        config, "data.step0_fraction", 0.0, 1.0, exclusive_minimum=True
      ),
      model=model,
      criterion={
        **{k: config_checks.check_float(config, f"loss.{k}", 0.0) for k in _TASK_WEIGHTS},
        "no_object_weight": config_checks.check_float(
          config, "loss.no_object_weight", 0.0, exclusive_minimum=True
        ),
      },
      pseudo=_pseudo(config),
      overlap_rule=config_checks.check_choice(config, "method.overlap_rule", core.OVERLAP_RULES),
      weighting=config_checks.check_choice(config, "method.weighting", core.WEIGHTINGS),
      kd_weight=config_checks.check_float(config, "method.kd_weight", 0.0),
      temperature=config_checks.check_float(
        config, "method.temperature", 0.0, exclusive_minimum=True
      ),
      inference={
        k: config_checks.check_float(config, f"inference.{k}", 0.0, 1.0)
        for k in ("object_mask_threshold", "overlap_threshold")
      },
      variants=variants,
      step0=_phase(config, "step0"),
      step1=_phase(config, "step1"),
      weight_decay=config_checks.check_float(config, "optim.weight_decay", 0.0),
      batch_size=config_checks.check_int(config, "train.batch_size", 1),
      eval_batch_size=config_checks.check_int(config, "train.eval_batch_size", 1),
      log_every=config_checks.check_int(config, "train.log_every", 1),
      checkpoint_every=config_checks.check_int(config, "train.checkpoint_every", 0),
      num_overlays=config_checks.check_int(config, "num_overlays", 0),
    )

  @property
  def old_class_mask(self) -> np.ndarray:
    """Old-class mask, bool `[C]`."""
    return core.check_class_split(list(self.old_classes), list(self.new_classes), self.num_classes)

  @property
  def thing_mask(self) -> np.ndarray:
    """Thing-class mask, bool `[C]`."""
    return np.isin(np.arange(self.num_classes), self.thing_classes)

  @property
  def mask_shape(self) -> tuple[int, int]:
    """`(h, w)` of the mask logits: the image size over the finest backbone stride."""
    side = self.image_size // (2 * self.model.stem_stride)
    return side, side

  def loss_spec(self, variant: str | None) -> LossSpec:
    """The loss of step 0 (`variant=None`: true labels only) or of a step-1 variant."""
    v = VARIANTS[variant] if variant else Variant("step 0")
    kd_weight = self.kd_weight if v.distill else 0.0
    return LossSpec(
      historical=v.pseudo or kd_weight > 0,
      pseudo=v.pseudo,
      overlap_rule=v.overlap_rule or self.overlap_rule,
      weighting=v.weighting or self.weighting,
      kd_weight=kd_weight,
    )

  def phase(self, name: str, which: str) -> fit.Phase:
    """The `fit.Phase` named `name` with the length of `which` (`step0` or `step1`)."""
    steps = getattr(self, which).steps
    return fit.Phase(name, steps, self.log_every, self.checkpoint_every, self.batch_size)


_TASK_WEIGHTS = ("w_class", "w_bce", "w_dice")


def _check_data(config: ml_collections.ConfigDict) -> None:
  name = config_checks.check_choice(config, "data.name", ("street_scenes", "coco_panoptic"))
  if name == "street_scenes":
    domains = config_checks.get_field(config, "data.domains")
    bad = [d for d in domains if d not in street_scenes.DOMAINS]
    if bad or not domains:
      raise config_checks.ConfigError(
        f"config.data.domains={tuple(domains)} is not allowed: give one or more of "
        f"{street_scenes.DOMAINS}"
      )
  else:
    config_checks.check_int(config, "data.num_train", 2)
    config_checks.check_int(config, "data.num_test", 1)


def _model(config: ml_collections.ConfigDict) -> ModelSettings:
  return ModelSettings(
    widths=tuple(config_checks.get_field(config, "model.widths")),
    stem_stride=config_checks.check_choice(config, "model.stem_stride", (1, 2)),
    hidden_dim=config_checks.check_int(config, "model.hidden_dim", 1),
    num_queries=config_checks.check_int(config, "model.num_queries", 1),
    num_decoder_layers=config_checks.check_int(config, "model.num_decoder_layers", 1),
    num_heads=config_checks.check_int(config, "model.num_heads", 1),
    ffn_dim=config_checks.check_int(config, "model.ffn_dim", 1),
  )


def _pseudo(config: ml_collections.ConfigDict) -> PseudoLabelSettings:
  m = config.method
  settings = PseudoLabelSettings(
    m.match_iou, m.noise_threshold, m.max_owners, m.min_area_ratio, m.query_score_threshold
  )
  try:
    core.check_pseudo_label_config(
      **dataclasses.asdict(settings),
      overlap_rule=config_checks.get_field(config, "method.overlap_rule"),
    )
  except ValueError as e:
    raise config_checks.ConfigError(f"config.method: {e}") from e
  return settings


def _phase(config: ml_collections.ConfigDict, phase: str) -> PhaseSettings:
  return PhaseSettings(
    steps=config_checks.check_int(config, f"{phase}.steps", 1),
    learning_rate=config_checks.check_float(
      config, f"{phase}.learning_rate", 0.0, exclusive_minimum=True
    ),
    warmup_steps=config_checks.check_int(config, f"{phase}.warmup_steps", 0),
  )
