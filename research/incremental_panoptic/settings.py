"""Typed, validated settings of M4 (class-incremental panoptic fine-tuning, several steps).

`Settings.from_config(config)` checks every field the experiment uses and fails at once with
one sentence naming the field, the value and what is allowed. The arms are data (`VARIANTS`);
each training's loss is fixed by a `LossSpec` (pseudo-label rule and noise removal,
distillation form, weighting and weight), bound into its compiled step as Python constants.
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from research import config_checks
from research.data import street_scenes
from research.incremental_panoptic import core
from research.models import resnet
from research.training import fit


@dataclasses.dataclass(frozen=True)
class Variant:
  """One arm of an incremental step; each arm continues from its own model of the step before.

  Attributes:
    title: its name in the report.
    labels: `new` (the step's new classes only) or `seen` (every class learnt so far).
    images: `step` (the step's own images) or `seen` (the images of every step so far).
    pseudo: adds old-class pseudo labels of the historical model (M4 step 3).
    distill: adds the distillation loss (M4 step 5).
    weighting: distillation weighting (`core.WEIGHTINGS`); None: `config.method.weighting`.
    overlap_rule: pseudo-label overlap rule (`core.OVERLAP_RULES`); None:
      `config.method.overlap_rule`.
    kd: `patent` (the method's distillation: `config.method.kd_form`, `kd_reduction`, final
      layer) or `comformer` (CoMFormer's: student log-softmax over all classes, weights
      `(1 - p_no-object)^2` normalised by their sum over the batch, every decoder layer).
    noise_removal: False switches the pseudo-label noise removal off (threshold 0.5 = the
      binarisation, no minimum component area).
    steps_factor: the step's training length is this many times `step1.steps`.
    role: `main` (headline table), `extension` (not in the patent, labelled as such),
      `ablation` or `diagnostic` (the joint-ceiling investigation).
  """

  title: str
  labels: str = "new"
  images: str = "step"
  pseudo: bool = False
  distill: bool = False
  weighting: str | None = None
  overlap_rule: str | None = None
  kd: str = "patent"
  noise_removal: bool = True
  steps_factor: int = 1
  role: str = "main"


VARIANTS = {
  "naive": Variant("naive fine-tuning"),
  "method": Variant("this method (patent: drop matched masks)", pseudo=True, distill=True),
  "comformer": Variant(
    "CoMFormer (true pixels removed, its distillation)",
    pseudo=True,
    distill=True,
    weighting="squared",
    overlap_rule="remove_true_pixels",
    kd="comformer",
  ),
  "joint": Variant("joint: all labels of all images so far", labels="seen", images="seen"),
  "true_wins": Variant(
    "extension: matched masks dropped and true pixels removed from the rest",
    pseudo=True,
    distill=True,
    overlap_rule="drop_matched_true_wins",
    role="extension",
  ),
  "no_noise_removal": Variant(
    "method without noise removal",
    pseudo=True,
    distill=True,
    noise_removal=False,
    role="ablation",
  ),
  "no_pseudo": Variant("method without pseudo labels", distill=True, role="ablation"),
  "no_distill": Variant("method without distillation", pseudo=True, role="ablation"),
  "no_weighting": Variant(
    "method without weighting (w = 1)",
    pseudo=True,
    distill=True,
    weighting="none",
    role="ablation",
  ),
  "joint_3x": Variant(
    "joint: all labels of all images so far, 3x steps",
    labels="seen",
    images="seen",
    steps_factor=3,
    role="diagnostic",
  ),
  "joint_step_images": Variant(
    "joint on the step's images only (the old 'ceiling')", labels="seen", role="diagnostic"
  ),
  "joint_step_images_3x": Variant(
    "joint on the step's images only, 3x steps",
    labels="seen",
    steps_factor=3,
    role="diagnostic",
  ),
}


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """The static choices of one training's loss; each distinct spec compiles its own step.

  The class split (old-class mask) and the learning-rate schedule are traced inputs of the
  compiled step, so every incremental step and seed shares it.

  Attributes:
    historical: the frozen historical model runs (pseudo labels or distillation need it).
    pseudo: old-class pseudo labels join the true labels.
    overlap_rule: the pseudo-label overlap rule (`core.OVERLAP_RULES`).
    weighting: the distillation weighting (`core.WEIGHTINGS`).
    kd_weight: lambda_kd; the distillation loss is computed whenever `historical`.
    kd_form: the student's distribution (`core.KD_FORMS`).
    kd_reduction: `core.REDUCTIONS`.
    kd_all_layers: distillation on every decoder layer (summed, as the task loss), not only
      the final one.
    noise_threshold: pseudo-label noise threshold.
    min_component_area: pseudo-label minimal component area.
  """

  historical: bool
  pseudo: bool
  overlap_rule: str
  weighting: str
  kd_weight: float
  kd_form: str = "fold_new_into_no_object"
  kd_reduction: str = "mean"
  kd_all_layers: bool = False
  noise_threshold: float = 0.5
  min_component_area: int = 0


@dataclasses.dataclass(frozen=True)
class PhaseSettings:
  """One training phase (`step0` or `step1`): linear warm-up, then cosine decay to 0."""

  steps: int
  learning_rate: float
  warmup_steps: int


@dataclasses.dataclass(frozen=True)
class ModelSettings:
  """The Mask2Former-style model of `config.model`.

  `backbone` 'small' is `TinyMultiScaleBackbone(widths, stem_stride)`; 'resnet18' and
  'resnet50' are the named ResNets of `research.models.resnet` (strides 4-32; `widths` and
  `stem_stride` unused). `dtype` is the backbone's compute dtype ('float32' or 'bfloat16').
  """

  widths: tuple[int, ...]
  stem_stride: int
  hidden_dim: int
  num_queries: int
  num_decoder_layers: int
  num_heads: int
  ffn_dim: int
  backbone: str = "small"
  dtype: str = "float32"

  @property
  def output_stride(self) -> int:
    """Stride of the backbone's coarsest feature map (image sizes must be multiples of it)."""
    if self.backbone == "small":
      return self.stem_stride * 2 ** len(self.widths)
    return resnet.NAMED_STRIDES[-1]


@dataclasses.dataclass(frozen=True)
class PseudoLabelSettings:
  """Thresholds of `core.old_class_pseudo_labels` (M4 step 3); the overlap rule is per spec."""

  match_iou: float
  noise_threshold: float
  max_owners: int
  min_area_ratio: float
  query_score_threshold: float
  min_component_area: int


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything M4 reads from its config besides the data source (see `load_panoptic_data`).

  Attributes:
    seed: the first seed; seed `s` seeds the initial parameters, the image split over steps
      and the batch order of its trainings.
    num_seeds: seeds `seed, seed + 1, ...` trained in one process.
    num_classes: `C` real classes.
    thing_classes: the classes with instances.
    class_steps: the classes learnt in each step, step 0 first (`data.class_steps`: a tuple
      of tuples, or a task name `"B-K"`: the first `B` classes, then `K` more per step).
    image_size: side `S` of the square images.
    max_segments: `T` target slots (and segment-table length; an image with more segments
      keeps its largest `T`, the rest are counted).
    step0_fraction: share of the training images used in step 0; the rest is split evenly
      over the incremental steps.
    model: the model.
    criterion: `set_criterion_loss` weights (`w_class`, `w_bce`, `w_dice`, `no_object_weight`).
    pseudo: pseudo-label thresholds.
    overlap_rule: the method's pseudo-label overlap rule.
    weighting: the method's distillation weighting.
    kd_form: the method's student distribution (`core.KD_FORMS`).
    kd_reduction: the method's reduction over queries (`core.REDUCTIONS`).
    kd_weight: lambda_kd of the arms with distillation.
    temperature: distillation temperature.
    inference: `panoptic_inference` thresholds (`object_mask_threshold`, `overlap_threshold`).
    variants: the arms trained at every incremental step, keys of `VARIANTS`.
    step1_only: arms trained at the first incremental step only (ablations, diagnostics).
    sensitivity: `(noise_threshold, min_component_area)` settings whose pseudo labels are
      measured (no training) at the first incremental step.
    step0: the base training.
    step1: every incremental training (`steps_factor` times its steps for some arms).
    weight_decay: AdamW decay (kernels only).
    batch_size: images per update.
    eval_batch_size: images per evaluation batch.
    log_every: steps between metric lines.
    checkpoint_every: steps between checkpoints (0: only at the end of a phase).
    num_overlays: test images drawn in the overlay figure.
  """

  seed: int
  num_seeds: int
  num_classes: int
  thing_classes: tuple[int, ...]
  class_steps: tuple[tuple[int, ...], ...]
  image_size: int
  max_segments: int
  step0_fraction: float
  model: ModelSettings
  criterion: dict
  pseudo: PseudoLabelSettings
  overlap_rule: str
  weighting: str
  kd_form: str
  kd_reduction: str
  kd_weight: float
  temperature: float
  inference: dict
  variants: tuple[str, ...]
  step1_only: tuple[str, ...]
  sensitivity: tuple[tuple[float, int], ...]
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
    if model.backbone != "small" and size % model.output_stride:
      raise config_checks.ConfigError(
        f"config.data.image_size={size} is not allowed: it must be a multiple of "
        f"{model.output_stride} (the output stride of model.backbone={model.backbone!r})"
      )
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
    steps_field = config_checks.get_field(config, "data.class_steps")
    class_steps = parse_class_steps(steps_field, num_classes)
    max_segments = config_checks.check_int(config, "data.max_segments", 1)
    if max_segments > model.num_queries:
      raise config_checks.ConfigError(
        f"config.data.max_segments={max_segments} is not allowed: it must be <= "
        f"model.num_queries={model.num_queries} (every target needs its own query)"
      )
    variants = _variant_list(config, "variants")
    if "naive" not in variants or "method" not in variants:
      raise config_checks.ConfigError(
        f"config.variants={variants} is not allowed: give 'naive', 'method' and any of "
        f"{tuple(VARIANTS)}"
      )
    step1_only = _variant_list(config, "step1_only")
    both = sorted(set(variants) & set(step1_only))
    if both:
      raise config_checks.ConfigError(
        f"config.step1_only={step1_only} is not allowed: {both} are also in config.variants"
      )
    return cls(
      seed=config_checks.check_int(config, "seed"),
      num_seeds=config_checks.check_int(config, "num_seeds", 1),
      num_classes=num_classes,
      thing_classes=things,
      class_steps=class_steps,
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
      kd_form=config_checks.check_choice(config, "method.kd_form", core.KD_FORMS),
      kd_reduction=config_checks.check_choice(config, "method.kd_reduction", core.REDUCTIONS),
      kd_weight=config_checks.check_float(config, "method.kd_weight", 0.0),
      temperature=config_checks.check_float(
        config, "method.temperature", 0.0, exclusive_minimum=True
      ),
      inference={
        k: config_checks.check_float(config, f"inference.{k}", 0.0, 1.0)
        for k in ("object_mask_threshold", "overlap_threshold")
      },
      variants=variants,
      step1_only=step1_only,
      sensitivity=_sensitivity(config),
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
  def seeds(self) -> tuple[int, ...]:
    """The seeds trained, in order."""
    return tuple(range(self.seed, self.seed + self.num_seeds))

  @property
  def num_steps(self) -> int:
    """Number of incremental steps after step 0."""
    return len(self.class_steps) - 1

  def old_classes(self, step: int) -> tuple[int, ...]:
    """Classes learnt before `step` (the historical model's classes)."""
    return tuple(c for s in self.class_steps[:step] for c in s)

  def new_classes(self, step: int) -> tuple[int, ...]:
    """Classes learnt in `step`."""
    return tuple(self.class_steps[step])

  def seen_classes(self, step: int) -> tuple[int, ...]:
    """Classes learnt up to and including `step`."""
    return self.old_classes(step + 1)

  def old_class_mask(self, step: int) -> np.ndarray:
    """Bool `[C]`, True for the classes learnt before `step`."""
    return np.isin(np.arange(self.num_classes), self.old_classes(step))

  def arms(self, step: int) -> tuple[str, ...]:
    """The arms trained at incremental step `step` (>= 1)."""
    return self.variants + (self.step1_only if step == 1 else ())

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
    """The loss of step 0 (`variant=None`: true labels only) or of an incremental arm."""
    v = VARIANTS[variant] if variant else Variant("step 0")
    kd_weight = self.kd_weight if v.distill else 0.0
    comformer = v.kd == "comformer"
    noise = v.noise_removal and v.pseudo
    return LossSpec(
      historical=v.pseudo or kd_weight > 0,
      pseudo=v.pseudo,
      overlap_rule=v.overlap_rule or self.overlap_rule,
      weighting=v.weighting or self.weighting,
      kd_weight=kd_weight,
      kd_form="log_softmax_all" if comformer else self.kd_form,
      kd_reduction="weighted_mean" if comformer else self.kd_reduction,
      kd_all_layers=comformer,
      noise_threshold=self.pseudo.noise_threshold if noise else core.BINARIZE_THRESHOLD,
      min_component_area=self.pseudo.min_component_area if noise else 0,
    )

  def pseudo_kwargs(self, spec: LossSpec) -> dict:
    """Keyword arguments of `core.old_class_pseudo_labels` for `spec`."""
    return dataclasses.asdict(self.pseudo) | {
      "noise_threshold": spec.noise_threshold,
      "min_component_area": spec.min_component_area,
      "overlap_rule": spec.overlap_rule,
    }

  def phase(self, name: str, steps: int) -> fit.Phase:
    """The `fit.Phase` named `name` with `steps` updates."""
    return fit.Phase(name, steps, self.log_every, self.checkpoint_every, self.batch_size)


def parse_class_steps(value, num_classes: int) -> tuple[tuple[int, ...], ...]:
  """`data.class_steps` as a tuple of tuples, validated.

  A task name `"B-K"` (e.g. COCO `"100-10"`) is the first `B` classes, then `K` more per step
  (the last step takes what is left).

  Raises:
    config_checks.ConfigError: on a malformed task name, overlapping steps, a class left out
      or unknown, or a step with no class (`core.check_class_steps`).
  """
  if isinstance(value, str):
    try:
      base, inc = (int(x) for x in value.split("-"))
      if base < 1 or inc < 1 or base >= num_classes:
        raise ValueError
    except ValueError as e:
      raise config_checks.ConfigError(
        f"config.data.class_steps={value!r} is not allowed: a task name is 'B-K' with "
        f"1 <= B < num_classes={num_classes} and K >= 1 (e.g. '100-10'), or give the steps"
      ) from e
    value = [range(base)] + [
      range(start, min(start + inc, num_classes)) for start in range(base, num_classes, inc)
    ]
  steps = tuple(tuple(int(c) if isinstance(c, (int, np.integer)) else c for c in s) for s in value)
  try:
    core.check_class_steps(steps, num_classes)
  except ValueError as e:
    raise config_checks.ConfigError(f"config.data.{e}") from e
  return steps


def _variant_list(config: ml_collections.ConfigDict, field: str) -> tuple[str, ...]:
  names = tuple(config_checks.get_field(config, field))
  unknown = [v for v in names if v not in VARIANTS]
  if unknown or len(set(names)) != len(names):
    raise config_checks.ConfigError(
      f"config.{field}={names} is not allowed: give distinct names from {tuple(VARIANTS)}"
    )
  return names


def _sensitivity(config: ml_collections.ConfigDict) -> tuple[tuple[float, int], ...]:
  pairs = tuple(tuple(p) for p in config_checks.get_field(config, "method.sensitivity"))
  for p in pairs:
    if (
      len(p) != 2
      or not isinstance(p[0], (int, float))
      or not 0.0 <= p[0] <= 1.0
      or not isinstance(p[1], int)
      or p[1] < 0
    ):
      raise config_checks.ConfigError(
        f"config.method.sensitivity={pairs} is not allowed: give (noise_threshold in [0, 1], "
        f"min_component_area int >= 0) pairs"
      )
  return tuple((float(t), int(a)) for t, a in pairs)


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
  backbone = resnet.backbone_from_config(config)
  dtype = config.model.get("dtype", "float32")
  if resnet.dtype_from_config(config) is not None and backbone == "small":
    raise config_checks.ConfigError(
      f"config.model.dtype={dtype!r} is not allowed with model.backbone='small': the tiny "
      "backbone computes in float32; use 'float32' or a named backbone"
    )
  return ModelSettings(
    widths=tuple(config_checks.get_field(config, "model.widths")),
    stem_stride=config_checks.check_choice(config, "model.stem_stride", (1, 2)),
    hidden_dim=config_checks.check_int(config, "model.hidden_dim", 1),
    num_queries=config_checks.check_int(config, "model.num_queries", 1),
    num_decoder_layers=config_checks.check_int(config, "model.num_decoder_layers", 1),
    num_heads=config_checks.check_int(config, "model.num_heads", 1),
    ffn_dim=config_checks.check_int(config, "model.ffn_dim", 1),
    backbone=resnet.backbone_from_config(config),
    dtype=dtype,
  )


def _pseudo(config: ml_collections.ConfigDict) -> PseudoLabelSettings:
  m = config.method
  settings = PseudoLabelSettings(
    m.match_iou,
    m.noise_threshold,
    m.max_owners,
    m.min_area_ratio,
    m.query_score_threshold,
    config_checks.check_int(config, "method.min_component_area", 0),
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
