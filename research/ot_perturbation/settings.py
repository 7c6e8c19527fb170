"""Typed, validated settings of the M5 experiment (METHODS.md M5).

`Settings.from_config(config)` reads and checks every field the experiment uses; a wrong value
fails at once with one sentence naming the field, the value and what is allowed. `Spec` is the
static part every jitted function of the method is specialised on (settings plus the data's
class count and image size).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from research import config_checks
from research.data import street_scenes
from research.ot_perturbation import core
from research.supervised import classification
from research.training.settings import TrainSettings

TASKS = ("detection", "classification")
# Arms: clean-only, this method (perturbed set of step 2 as `ot.initial_set` says), this method
# with the perturbed set redrawn every step (an ablation; needs `ot.initial_set='fixed'`), PGD-AT.
TRAININGS = ("clean", "ot", "ot_redraw", "pgd")
INITIAL_SETS = ("fixed", "redraw")
CONDITIONS = ("clean", "noise", "ot_attack", "pgd")
VECTORS = ("pooled", "logits")
TARGET_SETS = ("ascent", "candidates")
DETECTOR_STRIDE = 4  # Stride-1 stem + two stride-2 stages of the 3-stage ResNet.


@dataclasses.dataclass(frozen=True)
class Perturbation:
  """How target perturbed sets (steps 2-5) and the evaluation attacks are built.

  Attributes:
    eps: L-inf perturbation radius (image scale [0, 1]).
    alpha: ascent step size of the training target set (OT and PGD).
    ascent_steps: k, ascent steps of the training target set (OT and PGD).
    attack_steps: ascent steps of the evaluation attacks (OT and PGD).
    attack_alpha: step size of the evaluation attacks.
    kind: the random start of step 2 (one of `core.PERTURBATION_KINDS`).
    vectors: 'pooled' backbone features or 'logits' (step 3).
    target_set: 'ascent' (step 5 default) or 'candidates' (option).
    num_candidates: candidate sets for 'candidates'.
    perturbed_only: train on loss2 alone (Feature Scattering).
    sinkhorn: Sinkhorn settings of D (fixed iteration count).
    initial_set: 'fixed' (step 2's perturbed set drawn once per image, before the loop: the
      patent's order) or 'redraw' (drawn again every step).
    group_size: test images matched together by the evaluation OT attack (one transport
      problem per group; the evaluation batch is a whole number of groups).
  """

  eps: float
  alpha: float
  ascent_steps: int
  attack_steps: int
  attack_alpha: float
  kind: str
  vectors: str
  target_set: str
  num_candidates: int
  perturbed_only: bool
  sinkhorn: core.SinkhornConfig
  initial_set: str
  group_size: int


@dataclasses.dataclass(frozen=True)
class Spec:
  """The static settings every jitted function of the experiment is specialised on.

  Attributes:
    task: 'detection' or 'classification'.
    num_classes: K.
    image_size: (H, W) of the images (detection targets live on (H, W) / stride).
    ot: the perturbation settings.
    top_k: detections kept per image (1 for classification).
  """

  task: str
  num_classes: int
  image_size: tuple[int, int]
  ot: Perturbation
  top_k: int


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything the experiment reads from its config, validated.

  Attributes:
    task: one of `TASKS`.
    dataset: `data.name`.
    trainings: the arms, a subset of `TRAININGS` that contains 'ot'.
    seeds: `config.seed + i` for `i < num_seeds`.
    max_test_examples: the test split is cut to this many images.
    train: the shared `train` block.
    loss_threshold: step 7's preset threshold on each arm's own target loss, evaluated at
      the current parameters on the convergence batch at every log point.
    convergence_batch_size: the first this many training images are the convergence batch.
    ot: the perturbation settings.
    top_k: detections kept per image (1 for classification).
  """

  task: str
  dataset: str
  trainings: tuple[str, ...]
  seeds: tuple[int, ...]
  max_test_examples: int
  train: TrainSettings
  loss_threshold: float
  convergence_batch_size: int
  ot: Perturbation
  top_k: int

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> Settings:
    """Validates `config` and reads it; raises `config_checks.ConfigError` naming the field."""
    task = config_checks.check_choice(config, "task", TASKS)
    if task == "detection":
      _check_detection_data(config)
      top_k = config_checks.check_int(config, "eval.top_k", 1)
    else:
      config_checks.check_choice(config, "data.name", classification.DATASETS)
      top_k = 1
    trainings = tuple(config_checks.get_field(config, "trainings"))
    if "ot" not in trainings or any(t not in TRAININGS for t in trainings):
      raise config_checks.ConfigError(
        f"config.trainings={trainings} is not allowed: give 'ot' and any of {TRAININGS}"
      )
    if len(set(trainings)) != len(trainings):
      raise config_checks.ConfigError(
        f"config.trainings={trainings} is not allowed: each arm may appear once"
      )
    ot = _perturbation(config)
    if "ot_redraw" in trainings and ot.initial_set == "redraw":
      raise config_checks.ConfigError(
        f"config.trainings={trainings} is not allowed with config.ot.initial_set='redraw': "
        "'ot' already redraws; drop 'ot_redraw' or use initial_set='fixed'"
      )
    train = TrainSettings.from_config(config)
    if train.eval_batch_size % ot.group_size:
      raise config_checks.ConfigError(
        f"config.attack.ot_group_size={ot.group_size} is not allowed: it must divide "
        f"config.train.eval_batch_size={train.eval_batch_size}"
      )
    seed = config_checks.check_int(config, "seed")
    num_seeds = config_checks.check_int(config, "num_seeds", 1)
    return cls(
      task=task,
      dataset=config.data.name,
      trainings=trainings,
      seeds=tuple(seed + i for i in range(num_seeds)),
      max_test_examples=config_checks.check_int(config, "data.max_test_examples", 1),
      train=train,
      loss_threshold=config_checks.check_float(config, "train.loss_threshold"),
      convergence_batch_size=config_checks.check_int(config, "train.convergence_batch_size", 1),
      ot=ot,
      top_k=top_k,
    )

  def setup(self) -> dict:
    """The setup facts a report states (JSON)."""
    ot, train = self.ot, self.train
    return {
      "eps": ot.eps,
      "alpha": ot.alpha,
      "ascent_steps": ot.ascent_steps,
      "attack_steps": ot.attack_steps,
      "attack_alpha": ot.attack_alpha,
      "vectors": ot.vectors,
      "cost": ot.sinkhorn.cost,
      "sinkhorn_iterations": ot.sinkhorn.max_iterations,
      "perturbed_only": ot.perturbed_only,
      "initial_set": ot.initial_set,
      "ot_group_size": ot.group_size,
      "loss_threshold": self.loss_threshold,
      "convergence_batch_size": self.convergence_batch_size,
      "steps": train.steps,
      "batch_size": train.batch_size,
    }

  def check_convergence_batch(self, num_train: int) -> None:
    """Fails when the convergence batch asks for more images than the training set has."""
    if self.convergence_batch_size > num_train:
      raise config_checks.ConfigError(
        f"config.train.convergence_batch_size={self.convergence_batch_size} is not allowed: "
        f"the training set has {num_train} images; use at most {num_train}"
      )

  def spec(self, num_classes: int, image_shape: tuple[int, ...]) -> Spec:
    """The `Spec` for data with `num_classes` classes and images of `image_shape` [H, W, C]."""
    return Spec(self.task, num_classes, tuple(image_shape[:2]), self.ot, self.top_k)


def _check_detection_data(config: ml_collections.ConfigDict) -> None:
  config_checks.check_choice(config, "data.name", ("street_scenes",))
  domains = tuple(config_checks.get_field(config, "data.domains"))
  if not domains or any(d not in street_scenes.DOMAINS for d in domains):
    raise config_checks.ConfigError(
      f"config.data.domains={domains} is not allowed: give one or more of {street_scenes.DOMAINS}"
    )
  size = config_checks.check_int(config, "data.image_size", 16)
  if size % DETECTOR_STRIDE:
    raise config_checks.ConfigError(
      f"config.data.image_size={size} is not allowed: it must be a multiple of {DETECTOR_STRIDE}"
    )


def _perturbation(config: ml_collections.ConfigDict) -> Perturbation:
  """The `ot` and `attack` blocks; Sinkhorn runs a fixed iteration count."""
  iterations = config_checks.check_int(config, "ot.sinkhorn_iterations", 1)
  inner = min(10, iterations)
  return Perturbation(
    eps=config_checks.check_float(config, "ot.eps", 0.0, 1.0, exclusive_minimum=True),
    alpha=config_checks.check_float(config, "ot.alpha", 0.0, 1.0, exclusive_minimum=True),
    ascent_steps=config_checks.check_int(config, "ot.ascent_steps", 1),
    attack_steps=config_checks.check_int(config, "attack.steps", 1),
    attack_alpha=config_checks.check_float(
      config, "attack.alpha", 0.0, 1.0, exclusive_minimum=True
    ),
    kind=config_checks.check_choice(config, "ot.perturbation", core.PERTURBATION_KINDS),
    vectors=config_checks.check_choice(config, "ot.vectors", VECTORS),
    target_set=config_checks.check_choice(config, "ot.target_set", TARGET_SETS),
    num_candidates=config_checks.check_int(config, "ot.num_candidates", 1),
    perturbed_only=bool(config_checks.check_choice(config, "ot.perturbed_only", (True, False))),
    initial_set=config_checks.check_choice(config, "ot.initial_set", INITIAL_SETS),
    group_size=config_checks.check_int(config, "attack.ot_group_size", 1),
    sinkhorn=core.SinkhornConfig(
      epsilon=config_checks.check_float(config, "ot.sinkhorn_epsilon", 0.0, exclusive_minimum=True),
      cost=config_checks.check_choice(config, "ot.cost", core.COST_KINDS),
      max_iterations=iterations,
      min_iterations=iterations,
      inner_iterations=inner if iterations % inner == 0 else 1,
    ),
  )
