"""M5 experiment: training on clean plus OT-matched perturbed images (METHODS.md M5, seed 004).

Three models are trained with the same data, budget and convergence rule:

- ``clean``: clean-only training (task loss on the clean set);
- ``ot``: this method, loss1 (clean) + loss2 on the target perturbed set found by k signed
  ascent steps on the feature matching distance ``D`` (steps 2-6), regenerated every step;
  ``ot.perturbed_only`` trains on loss2 alone with logits as vectors (Feature Scattering);
- ``pgd``: PGD adversarial training, loss1 + the task loss on PGD images of the same eps and
  the same number of ascent steps.

Each is evaluated on clean test images, under uniform noise of the same eps, under the OT
attack of step 5 and under PGD on the task loss: mAP@0.5 and mAP@[.5:.95] for detection
(CenterNet-style detector on the embedded street scenes), accuracy for classification (digits
or a catalogue dataset such as CIFAR-10). Training stops at the step limit or, checked on the
host at every log interval, when the mean ``loss1 + loss2`` is at or below the threshold
(step 7); the converged model is stored as a checkpoint and the stop reason is reported.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from research import config_checks, losses
from research.data import embedded, samplers, street_scenes
from research.metrics import detection as det_metrics
from research.metrics import seeds
from research.models import detector
from research.models.resnet import ResNet
from research.ot_perturbation import core
from research.supervised import classification
from research.training import harness, loop, parallel, report, state, steps

TASKS = ("detection", "classification")
TRAININGS = ("clean", "ot", "pgd")
CONDITIONS = ("clean", "noise", "ot_attack", "pgd")
VECTORS = ("pooled", "logits")
TARGET_SETS = ("ascent", "candidates")
DETECTION_CLASS_NAMES = tuple(street_scenes.CLASS_NAMES[c] for c in street_scenes.THING_CLASSES)
DETECTOR_STRIDE = 4  # Stride-1 stem + two stride-2 stages of the 3-stage ResNet.


# --------------------------------------------------------------------------------------------
# Configuration.


def validate(config: ml_collections.ConfigDict) -> None:
  """Fails at once, naming the field, on any value the experiment cannot use."""
  task = config_checks.check_choice(config, "task", TASKS)
  if task == "detection":
    config_checks.check_choice(config, "data.name", ("street_scenes",))
    domains = config_checks.get_field(config, "data.domains")
    bad = [d for d in domains if d not in street_scenes.DOMAINS]
    if bad or not domains:
      raise config_checks.ConfigError(
        f"config.data.domains={tuple(domains)} is not allowed: give one or more of "
        f"{street_scenes.DOMAINS}"
      )
    size = config_checks.check_int(config, "data.image_size", 16)
    if size % DETECTOR_STRIDE:
      raise config_checks.ConfigError(
        f"config.data.image_size={size} is not allowed: it must be a multiple of {DETECTOR_STRIDE}"
      )
    config_checks.check_int(config, "eval.top_k", 1)
  else:
    config_checks.check_choice(config, "data.name", classification.DATASETS)
  config_checks.check_int(config, "data.max_test_examples", 1)
  config_checks.check_int(config, "num_seeds", 1)
  for field in ("train.steps", "train.batch_size", "train.eval_batch_size", "train.log_every"):
    config_checks.check_int(config, field, 1)
  config_checks.check_int(config, "train.checkpoint_every", 0)
  config_checks.check_float(config, "train.loss_threshold")
  config_checks.check_float(config, "ot.eps", 0.0, 1.0, exclusive_minimum=True)
  config_checks.check_float(config, "ot.alpha", 0.0, 1.0, exclusive_minimum=True)
  config_checks.check_int(config, "ot.ascent_steps", 1)
  config_checks.check_choice(config, "ot.perturbation", core.PERTURBATION_KINDS)
  config_checks.check_choice(config, "ot.vectors", VECTORS)
  config_checks.check_choice(config, "ot.target_set", TARGET_SETS)
  config_checks.check_int(config, "ot.num_candidates", 1)
  config_checks.check_choice(config, "ot.perturbed_only", (True, False))
  config_checks.check_choice(config, "ot.cost", core.COST_KINDS)
  config_checks.check_float(config, "ot.sinkhorn_epsilon", 0.0, exclusive_minimum=True)
  config_checks.check_int(config, "ot.sinkhorn_iterations", 1)
  config_checks.check_int(config, "attack.steps", 1)
  config_checks.check_float(config, "attack.alpha", 0.0, 1.0, exclusive_minimum=True)
  trainings = config_checks.get_field(config, "trainings")
  if "ot" not in trainings or any(t not in TRAININGS for t in trainings):
    raise config_checks.ConfigError(
      f"config.trainings={tuple(trainings)} is not allowed: give 'ot' and any of {TRAININGS}"
    )


@dataclasses.dataclass(frozen=True)
class Spec:
  """The static settings every jitted function of the experiment is specialised on.

  Attributes:
    task: 'detection' or 'classification'.
    num_classes: K.
    image_size: (H, W) of the images (detection targets live on (H, W) / stride).
    eps: L-inf perturbation radius (image scale [0, 1]).
    alpha: ascent step size of the training target set (OT and PGD).
    ascent_steps: k, ascent steps of the training target set (OT and PGD).
    attack_steps: ascent steps of the evaluation attacks (OT and PGD).
    attack_alpha: step size of the evaluation attacks.
    perturbation: the random start kind (step 2).
    vectors: 'pooled' backbone features or 'logits' (step 3).
    target_set: 'ascent' (step 5 default) or 'candidates' (option).
    num_candidates: candidate sets for 'candidates'.
    perturbed_only: train on loss2 alone (Feature Scattering).
    sinkhorn: Sinkhorn settings of D (fixed iteration count).
    top_k: detections kept per image.
  """

  task: str
  num_classes: int
  image_size: tuple[int, int]
  eps: float
  alpha: float
  ascent_steps: int
  attack_steps: int
  attack_alpha: float
  perturbation: str
  vectors: str
  target_set: str
  num_candidates: int
  perturbed_only: bool
  sinkhorn: core.SinkhornConfig
  top_k: int = 100


def make_spec(config: ml_collections.ConfigDict, num_classes: int, image_shape: tuple) -> Spec:
  """The :class:`Spec` of a validated config; Sinkhorn runs a fixed iteration count."""
  o = config.ot
  iterations = o.sinkhorn_iterations
  return Spec(
    task=config.task,
    num_classes=num_classes,
    image_size=tuple(image_shape[:2]),
    eps=float(o.eps),
    alpha=float(o.alpha),
    ascent_steps=o.ascent_steps,
    attack_steps=config.attack.steps,
    attack_alpha=float(config.attack.alpha),
    perturbation=o.perturbation,
    vectors=o.vectors,
    target_set=o.target_set,
    num_candidates=o.num_candidates,
    perturbed_only=bool(o.perturbed_only),
    sinkhorn=core.SinkhornConfig(
      epsilon=float(o.sinkhorn_epsilon),
      cost=o.cost,
      max_iterations=iterations,
      min_iterations=iterations,
      inner_iterations=min(10, iterations) if iterations % min(10, iterations) == 0 else 1,
    ),
    top_k=config.eval.top_k if config.task == "detection" else 1,
  )


# --------------------------------------------------------------------------------------------
# Data and models.


def thing_boxes(box_classes: np.ndarray, box_valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Street-scene thing classes 5..8 (car, truck, person, bicycle) -> detector classes 0..3.

  Args:
    box_classes: ``[N, MAX_BOXES]`` int semantic class ids.
    box_valid: ``[N, MAX_BOXES]`` bool.

  Returns:
    ``(classes [N, MAX_BOXES] int32 in [0, 4), valid [N, MAX_BOXES] bool)``; rows with a
    non-thing class become invalid.
  """
  first = street_scenes.THING_CLASSES[0]
  classes = np.asarray(box_classes, np.int32) - first
  valid = np.asarray(box_valid, bool) & (classes >= 0) & (classes < len(DETECTION_CLASS_NAMES))
  return np.where(valid, classes, 0).astype(np.int32), valid


def load_detection_data(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Street-scene train/test arrays with thing boxes mapped to classes 0..3."""
  d = config.data
  kwargs = dict(
    image_size=d.image_size,
    train_per_domain=d.train_per_domain,
    test_per_domain=d.test_per_domain,
    data_dir=d.data_dir or None,
  )
  out = {}
  for split in ("train", "test"):
    arrays = embedded.street_arrays(tuple(d.domains), split, **kwargs)
    classes, valid = thing_boxes(arrays["box_classes"], arrays["box_valid"])
    out[split] = {
      "image": arrays["image"],
      "boxes": arrays["boxes"].astype(np.float32),
      "box_classes": classes,
      "box_valid": valid,
    }
  return {**out, "num_classes": len(DETECTION_CLASS_NAMES), "class_names": DETECTION_CLASS_NAMES}


def load_data(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The task's data; the test split is cut to `data.max_test_examples`."""
  if config.task == "detection":
    data = load_detection_data(config)
  else:
    data = classification.load_classification_data(config)
  n = config.data.max_test_examples
  data["test"] = {k: v[:n] for k, v in data["test"].items()}
  return data


def batch_keys(task: str) -> tuple[str, ...]:
  """The batch features of a task."""
  return (
    ("image", "boxes", "box_classes", "box_valid") if task == "detection" else ("image", "label")
  )


def build_task_model(config: ml_collections.ConfigDict, num_classes: int) -> Any:
  """Detector on a 3-stage ResNet backbone (stride 4), or the classification ResNet."""
  if config.task == "classification":
    return classification.build_model(config, num_classes)
  m = config.model
  backbone = ResNet(0, tuple(m.stage_sizes), tuple(m.widths), m.embedding_dim, 1)
  return detector.Detector(backbone, num_classes, DETECTOR_STRIDE, m.head_channels)


# --------------------------------------------------------------------------------------------
# Pure task functions (jit-compatible).


def task_targets(batch: dict, spec: Spec) -> Any:
  """Detection: CenterNet targets from the padded boxes; classification: the labels."""
  if spec.task == "classification":
    return batch["label"]
  h, w = spec.image_size
  return detector.encode_batch_targets(
    batch["boxes"],
    batch["box_classes"],
    batch["box_valid"],
    num_classes=spec.num_classes,
    output_size=(h // DETECTOR_STRIDE, w // DETECTOR_STRIDE),
    stride=DETECTOR_STRIDE,
  )


def task_loss(
  params: Any, images: jax.Array, targets: Any, *, model: Any, spec: Spec
) -> tuple[jax.Array, dict]:
  """The task loss of METHODS.md M5 step 6: CenterNet detection loss or cross-entropy."""
  out = model.apply({"params": params}, images, train=True)
  if spec.task == "detection":
    return detector.detection_loss(out, targets)
  ce = losses.softmax_cross_entropy(out["logits"], targets)
  return ce, {"ce": ce, "accuracy": jnp.mean(jnp.argmax(out["logits"], -1) == targets)}


def feature_vectors(params: Any, images: jax.Array, *, model: Any, spec: Spec) -> jax.Array:
  """Standard / perturbed vector sets of step 3: pooled features or logits, ``[B, D]``.

  Detection "logits" are the flattened heatmap logits ``[B, h * w * K]``.
  """
  out = model.apply({"params": params}, images)
  if spec.vectors == "pooled":
    return out["pooled"]
  logits = out["heatmap"] if spec.task == "detection" else out["logits"]
  return logits.reshape(logits.shape[0], -1)


def ot_target_set(
  params: Any, x: jax.Array, rng: jax.Array, *, model: Any, spec: Spec, steps_: int, alpha: float
) -> tuple[jax.Array, dict]:
  """Steps 2-5: random start, then the target perturbed set maximising ``D`` (step `alpha`)."""
  features_fn = functools.partial(feature_vectors, params, model=model, spec=spec)
  if spec.target_set == "candidates":
    cands = core.candidate_perturbations(
      rng, x, spec.num_candidates, kind=spec.perturbation, eps=spec.eps
    )
    x_t, aux = core.best_of_candidates(features_fn, x, cands, sinkhorn_config=spec.sinkhorn)
    return x_t, {"distance": jnp.max(aux["distances"]), "ot_finite": aux["finite"]}
  x_init = core.perturbed_images(rng, x, kind=spec.perturbation, eps=spec.eps)
  x_t, aux = core.ot_attack(
    features_fn,
    x,
    x_init,
    eps=spec.eps,
    alpha=alpha,
    steps=steps_,
    sinkhorn_config=spec.sinkhorn,
  )
  return x_t, {
    "distance_start": aux["distances"][0],
    "distance": aux["distances"][-1],
    "ot_finite": aux["finite"],
    "sinkhorn_converged": aux["converged"].astype(jnp.float32),
    "sinkhorn_iterations": aux["n_iters"].astype(jnp.float32),
  }


def pgd_set(
  params: Any,
  x: jax.Array,
  targets: Any,
  rng: jax.Array,
  *,
  model: Any,
  spec: Spec,
  steps_: int,
  alpha: float,
) -> jax.Array:
  """PGD images on the task loss with the true targets (uniform random start, step `alpha`)."""
  x_init = core.perturbed_images(rng, x, kind="uniform", eps=spec.eps)
  loss_fn = lambda images: task_loss(params, images, targets, model=model, spec=spec)[0]  # noqa: E731
  return core.pgd_attack(loss_fn, x, x_init, eps=spec.eps, alpha=alpha, steps=steps_)


def perturbation_train_step(
  train_state: state.TrainState,
  batch: dict,
  rng: jax.Array,
  *,
  model: Any,
  tx: optax.GradientTransformation,
  spec: Spec,
  training: str,
) -> tuple[state.TrainState, dict]:
  """One update of clean-only, OT (METHODS.md M5 steps 2-6) or PGD adversarial training.

  The target set is regenerated from the current parameters every step (step 7's "go back to
  step 6"); for 'ot' and 'pgd' the loss is ``loss1 + loss2`` (``loss2`` alone with
  ``spec.perturbed_only`` for 'ot').

  Args:
    train_state: the replicated state.
    batch: task batch (``image`` uint8 ``[B, H, W, C]`` plus boxes or labels).
    rng: base key; the step is folded in.
    model: detector or classifier.
    tx: optimizer.
    spec: static settings.
    training: one of ``TRAININGS``.

  Returns:
    (new state, metrics including ``loss`` (the target loss of step 7), ``loss1``, ``loss2``).
  """
  step_rng = jax.random.fold_in(rng, train_state.step)
  x = steps.images_to_float(batch["image"])
  targets = task_targets(batch, spec)
  loss_fn = functools.partial(task_loss, model=model, spec=spec)
  extra: dict = {}
  k, alpha = spec.ascent_steps, spec.alpha
  if training == "ot":
    x_t, extra = ot_target_set(
      train_state.params, x, step_rng, model=model, spec=spec, steps_=k, alpha=alpha
    )
  elif training == "pgd":
    x_t = pgd_set(
      train_state.params, x, targets, step_rng, model=model, spec=spec, steps_=k, alpha=alpha
    )

  def objective(params):
    if training == "clean":
      loss1, m = loss_fn(params, x, targets)
      return loss1, {"loss1": loss1, **{f"clean/{k}": v for k, v in m.items()}}
    return core.combined_loss(
      loss_fn,
      params,
      x,
      x_t,
      targets,
      perturbed_only=spec.perturbed_only and training == "ot",
    )

  (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(train_state.params)
  updates, opt_state = tx.update(grads, train_state.opt_state, train_state.params)
  first_bad = (train_state.nonfinite_step < 0) & ~jnp.isfinite(loss)
  new_state = state.TrainState(
    step=train_state.step + 1,
    params=optax.apply_updates(train_state.params, updates),
    opt_state=opt_state,
    nonfinite_step=jnp.where(first_bad, train_state.step, train_state.nonfinite_step),
  )
  metrics = {**metrics, **{k: v.astype(jnp.float32) for k, v in extra.items()}}
  return new_state, {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads)}


def perturbed_test_images(
  params: Any, batch: dict, rng: jax.Array, *, model: Any, spec: Spec, condition: str
) -> jax.Array:
  """The test images of an evaluation condition (clean, uniform noise, OT attack, PGD)."""
  x = steps.images_to_float(batch["image"])
  if condition == "clean":
    return x
  if condition == "noise":
    return core.perturbed_images(rng, x, kind="uniform", eps=spec.eps)
  k, alpha = spec.attack_steps, spec.attack_alpha
  if condition == "ot_attack":
    return ot_target_set(params, x, rng, model=model, spec=spec, steps_=k, alpha=alpha)[0]
  targets = task_targets(batch, spec)
  return pgd_set(params, x, targets, rng, model=model, spec=spec, steps_=k, alpha=alpha)


def eval_step(
  params: Any, batch: dict, rng: jax.Array, *, model: Any, spec: Spec, condition: str
) -> dict:
  """Predictions on one (padded) test batch under `condition`.

  Returns:
    detection: ``boxes [B, top_k, 4]``, ``scores``, ``classes``; classification:
    ``predictions [B]``; plus ``images [B, H, W, C]`` (the evaluated inputs).
  """
  x = perturbed_test_images(params, batch, rng, model=model, spec=spec, condition=condition)
  out = model.apply({"params": params}, x)
  if spec.task == "classification":
    return {"predictions": jnp.argmax(out["logits"], -1), "images": x}
  dets = detector.decode_detections(out, stride=DETECTOR_STRIDE, top_k=spec.top_k)
  return {**dets, "images": x}


# --------------------------------------------------------------------------------------------
# Training with the convergence rule (host side).


class _Converged(Exception):  # noqa: N818 - a control-flow signal, not an error.
  """Raised from `on_step_end` when the target loss reached the threshold."""

  def __init__(self, step: int, loss: float):
    super().__init__(f"converged at step {step} (loss {loss:.4g})")
    self.step = step
    self.loss = loss


def _stop_path(run: harness.Run, name: str) -> str:
  return os.path.join(run.workdir, f"{name}_stop.json")


def compile_training(
  config: ml_collections.ConfigDict, model: Any, spec: Spec, training: str, run: harness.Run
) -> tuple[optax.GradientTransformation, Callable]:
  """(optimizer, jitted `perturbation_train_step`) of a training, shared by its seeds."""
  tx = state.make_optimizer(config.optim, config.train.steps)
  step = parallel.compile_train_step(
    functools.partial(perturbation_train_step, model=model, tx=tx, spec=spec, training=training),
    run.mesh,
  )
  return tx, step


def train_model(
  config: ml_collections.ConfigDict,
  run: harness.Run,
  data: dict,
  model: Any,
  spec: Spec,
  training: str,
  seed: int,
  compiled: tuple[optax.GradientTransformation, Callable] | None = None,
) -> tuple[Any, dict]:
  """Trains one model with the step-7 rule; resumes from `<workdir>/<name>_checkpoints`.

  ``name`` is ``<training>_seed<seed>``; the seed sets the initial parameters, the batch order
  and the random starts. The mean target loss over each log interval is compared with
  `train.loss_threshold` on the host; at or below it the run stops, the model is stored
  (checkpoint + `<name>_train_stop.json`) and a rerun does not train further. Otherwise
  training ends at `train.steps`.

  Args:
    config: the experiment config.
    run: the run context.
    data: :func:`load_data`'s output.
    model: detector or classifier.
    spec: static settings.
    training: one of ``TRAININGS``.
    seed: the run's seed.
    compiled: :func:`compile_training`'s output for `training` (compiled here when None).

  Returns:
    (params, {"stop_reason": 'converged' | 'step_limit', "steps": int, "loss": float}).
  """
  name = f"{training}_seed{seed}_train"
  parallel.check_batch_divisible(config.train.batch_size, run.mesh, "train.batch_size")
  rule = core.ConvergenceRule(float(config.train.loss_threshold), config.train.steps)
  rng = jax.random.key(seed)
  params = harness.init_params(model, rng, data["train"]["image"][0])
  tx, compiled_step = compiled or compile_training(config, model, spec, training, run)
  train_state = parallel.replicate(state.create_train_state(params, tx), run.mesh)
  checkpointer = run.checkpointer(f"{training}_seed{seed}_checkpoints")
  train_state, _ = loop.restore_or_init(checkpointer, train_state)
  stop_file = _stop_path(run, name)
  if os.path.exists(stop_file):
    with open(stop_file) as f:
      stop = json.load(f)
    if stop["stop_reason"] == "converged":
      checkpointer.close()
      return train_state.params, stop
  latest: dict = {"losses": []}

  def step_fn(s, batch, key):
    new_state, metrics = compiled_step(s, batch, key)
    latest["state"] = new_state
    latest["losses"].append(metrics["loss"])
    return new_state, metrics

  def on_step_end(done: int) -> None:
    if done % config.train.log_every and done != rule.max_steps:
      return
    mean_loss = float(np.mean(jax.device_get(latest["losses"])))
    latest["losses"] = []
    latest["loss"] = mean_loss
    if core.stop_reason(mean_loss, done, rule) == "converged":
      raise _Converged(done, mean_loss)

  batch_fn = harness.sampled_batch_fn(
    data["train"],
    samplers.RandomSampler(len(data["train"]["image"]), config.train.batch_size, seed),
    run.mesh,
    batch_keys(config.task),
  )
  try:
    train_state = loop.train_loop(
      train_state,
      step_fn,
      batch_fn,
      jax.random.fold_in(rng, 1),
      num_steps=config.train.steps,
      checkpointer=checkpointer,
      checkpoint_every=config.train.checkpoint_every,
      log_every=config.train.log_every,
      writer=run.writer,
      examples_per_step=config.train.batch_size,
      name=name,
      on_step_end=on_step_end,
    )
    done = int(jax.device_get(train_state.step))
    stop = {"stop_reason": "step_limit", "steps": done, "loss": latest.get("loss", float("nan"))}
  except _Converged as signal:
    train_state = latest["state"]
    checkpointer.wait_until_finished()
    if signal.step not in checkpointer.all_steps():
      checkpointer.save(signal.step, train_state, {"stop_reason": "converged"})
      checkpointer.wait_until_finished()
    stop = {"stop_reason": "converged", "steps": signal.step, "loss": signal.loss}
  checkpointer.close()
  with open(stop_file, "w") as f:
    json.dump(stop, f)
  run.writer.write(
    stop["steps"], {"converged": float(stop["stop_reason"] == "converged")}, phase=name
  )
  return train_state.params, stop


# --------------------------------------------------------------------------------------------
# Evaluation.


def _ground_truths(arrays: dict) -> list[tuple[np.ndarray, np.ndarray]]:
  return [
    (b[v], c[v])
    for b, c, v in zip(arrays["boxes"], arrays["box_classes"], arrays["box_valid"], strict=True)
  ]


def compile_eval_steps(model: Any, spec: Spec) -> dict[str, Callable]:
  """`{condition: jitted eval_step(params, batch, rng)}`, shared by the trained models."""
  return {
    c: jax.jit(functools.partial(eval_step, model=model, spec=spec, condition=c))
    for c in CONDITIONS
  }


def evaluate_model(
  params: Any,
  eval_steps: dict[str, Callable],
  data: dict,
  spec: Spec,
  config: ml_collections.ConfigDict,
  run: harness.Run,
  seed: int,
) -> tuple[dict[str, dict[str, float]], dict[str, dict]]:
  """Metrics of one model under every condition, and the first batch's outputs per condition.

  The random starts of the noise and attack conditions come from `seed`.

  Returns:
    ({condition: {"map50", "map"} or {"accuracy"}}, {condition: first-batch outputs}).
  """
  batch_size = config.train.eval_batch_size
  parallel.check_batch_divisible(batch_size, run.mesh, "train.eval_batch_size")
  test = data["test"]
  keys = batch_keys(spec.task)
  results, examples = {}, {}
  for c_index, condition in enumerate(CONDITIONS):
    fn = eval_steps[condition]
    gathered: dict[str, list] = {}
    for b_index, batch in enumerate(harness.padded_batches(test, batch_size, keys)):
      valid = batch.pop("valid")
      rng = jax.random.fold_in(jax.random.key(seed + 1000 * c_index), b_index)
      out = jax.device_get(fn(params, parallel.shard_batch(batch, run.mesh), rng))
      if b_index == 0:
        examples[condition] = out
      for k, v in out.items():
        if k != "images":
          gathered.setdefault(k, []).append(np.asarray(v)[valid])
    out = {k: np.concatenate(v) for k, v in gathered.items()}
    if spec.task == "classification":
      results[condition] = {"accuracy": float(np.mean(out["predictions"] == test["label"]))}
      continue
    dets = list(zip(out["boxes"], out["scores"], out["classes"], strict=True))
    dets = [(np.clip(b, 0, None), s, c) for b, s, c in dets]
    gts = _ground_truths(test)
    results[condition] = {
      "map50": det_metrics.mean_average_precision(dets, gts, spec.num_classes)["map"],
      "map": det_metrics.mean_average_precision(
        dets, gts, spec.num_classes, det_metrics.COCO_IOU_THRESHOLDS
      )["map"],
    }
  return results, examples


# --------------------------------------------------------------------------------------------
# Plots.


def plot_detections(
  examples: dict[str, dict], test: dict, class_names: tuple, path: str, score: float = 0.3
) -> str:
  """Detections (score >= `score`) on clean vs OT-attacked vs PGD images, ground truth dashed."""
  import matplotlib.pyplot as plt  # noqa: PLC0415 - report.py set the Agg backend.

  conditions = [c for c in ("clean", "ot_attack", "pgd") if c in examples]
  n = min(4, len(examples["clean"]["images"]))
  colours = report.class_palette(len(class_names))
  fig, axes = plt.subplots(len(conditions), n, figsize=(2.2 * n, 2.3 * len(conditions)))
  axes = np.asarray(axes).reshape(len(conditions), n)
  for r, condition in enumerate(conditions):
    ex = examples[condition]
    for i in range(n):
      ax = axes[r, i]
      ax.imshow(np.clip(ex["images"][i], 0, 1))
      ax.axis("off")
      for box, cls, ok in zip(
        test["boxes"][i], test["box_classes"][i], test["box_valid"][i], strict=True
      ):
        if ok:
          ax.add_patch(_rect(box, colours[cls], "--"))
      for box, s, cls in zip(ex["boxes"][i], ex["scores"][i], ex["classes"][i], strict=True):
        if s >= score:
          ax.add_patch(_rect(box, colours[cls], "-"))
      if i == 0:
        ax.set_title(condition, fontsize=8, loc="left")
  fig.suptitle("detections (solid) and ground truth (dashed)", fontsize=8)
  return report._save(fig, path)  # noqa: SLF001 - the shared PNG writer.


def _rect(box, colour, style):
  import matplotlib.patches as patches  # noqa: PLC0415

  x0, y0, x1, y1 = box
  return patches.Rectangle(
    (x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linestyle=style, linewidth=1
  )


def plot_transport_plan(plan: np.ndarray, cost: np.ndarray, path: str) -> str:
  """The OT plan P* and the cost matrix C between clean and perturbed vector sets."""
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), gridspec_kw={"wspace": 0.45})
  for ax, (title, m) in zip(axes, (("plan P*", plan), ("cost C", cost)), strict=True):
    im = ax.imshow(m, cmap="viridis")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("perturbed j")
    ax.set_ylabel("clean i")
    fig.colorbar(im, ax=ax, fraction=0.046)
  return report._save(fig, path)  # noqa: SLF001


def transport_plan(params: Any, model: Any, spec: Spec, x: np.ndarray, x_pert: np.ndarray):
  """(plan, cost) of D between the clean and perturbed vector sets of a batch (host arrays)."""
  fn = jax.jit(
    lambda p, a, b: core.feature_matching_distance(
      feature_vectors(p, a, model=model, spec=spec),
      feature_vectors(p, b, model=model, spec=spec),
      spec.sinkhorn,
    )[1]
  )
  aux = jax.device_get(fn(params, jnp.asarray(x), jnp.asarray(x_pert)))
  return np.asarray(aux["plan"]), np.asarray(aux["cost_matrix"])


# --------------------------------------------------------------------------------------------
# The experiment.


def _over_seeds(per_seed: list[dict[str, dict[str, float]]]) -> tuple[dict, dict]:
  """Mean and sample std over seeds of ``{condition: {metric: value}}`` results."""
  mean, std = {}, {}
  for condition, metrics in per_seed[0].items():
    stats = {m: seeds.mean_std([r[condition][m] for r in per_seed]) for m in metrics}
    mean[condition] = {m: v[0] for m, v in stats.items()}
    std[condition] = {m: v[1] for m, v in stats.items()}
  return mean, std


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains clean-only, OT-perturbation and PGD models per seed; evaluates and reports them.

  Every training runs for `num_seeds` seeds (``config.seed + i``); the metrics are the mean
  over seeds with their sample std, and the bar's gains carry paired per-seed verdicts.
  Plots show the first seed's models.

  Returns:
    the run summary (also written to `<workdir>/summary.json`).
  """
  validate(config)
  run = harness.start_run(workdir)
  data = load_data(config)
  model = build_task_model(config, data["num_classes"])
  spec = make_spec(config, data["num_classes"], data["train"]["image"].shape[1:])
  eval_steps = compile_eval_steps(model, spec)
  trainings = list(config.trainings)
  seed_list = [config.seed + i for i in range(config.num_seeds)]
  per_seed = {t: [] for t in trainings}
  stops = {t: [] for t in trainings}
  examples, params_of = {}, {}
  compiled = {t: compile_training(config, model, spec, t, run) for t in trainings}
  for seed in seed_list:
    for training in trainings:
      params, stop = train_model(config, run, data, model, spec, training, seed, compiled[training])
      seed_results, batch_outputs = evaluate_model(
        params, eval_steps, data, spec, config, run, seed
      )
      per_seed[training].append(seed_results)
      stops[training].append(stop)
      for condition, metrics in seed_results.items():
        run.writer.write(stop["steps"], metrics, phase=f"test/{training}/seed{seed}/{condition}")
      if seed == seed_list[0]:
        examples[training], params_of[training] = batch_outputs, params
  stats = {t: _over_seeds(per_seed[t]) for t in trainings}
  results = {t: stats[t][0] for t in trainings}
  spreads = {t: stats[t][1] for t in trainings}

  metric = "map50" if spec.task == "detection" else "accuracy"
  names = {"clean": "clean-only", "ot": "OT perturbation (this method)", "pgd": "PGD adv. training"}
  report.plot_bars(
    {names[t]: [results[t][c][metric] for c in CONDITIONS] for t in trainings},
    CONDITIONS,
    "mAP@0.5" if metric == "map50" else "accuracy",
    run.plot_path("robustness.png"),
  )
  ot_ex = examples["ot"]
  plan, cost = transport_plan(
    params_of["ot"], model, spec, ot_ex["clean"]["images"], ot_ex["ot_attack"]["images"]
  )
  plot_transport_plan(plan, cost, run.plot_path("transport_plan.png"))
  plots = "![robustness](plots/robustness.png)\n\n![plan](plots/transport_plan.png)"
  if spec.task == "detection":
    n = len(ot_ex["clean"]["images"])
    test_head = {k: v[:n] for k, v in data["test"].items()}
    plot_detections(ot_ex, test_head, data["class_names"], run.plot_path("detections.png"))
    plots += "\n\n![detections](plots/detections.png)"

  metric_names = list(results[trainings[0]][CONDITIONS[0]])
  header = ["training", "stops", "steps"] + [f"{c} {m}" for c in CONDITIONS for m in metric_names]
  rows = [
    [
      names[t],
      ", ".join(s["stop_reason"] for s in stops[t]),
      ", ".join(str(s["steps"]) for s in stops[t]),
    ]
    + [f"{results[t][c][m]:.4f} ± {spreads[t][c][m]:.4f}" for c in CONDITIONS for m in metric_names]
    for t in trainings
  ]
  bar = _bar(per_seed, metric)
  report.write_report(
    run.workdir,
    f"M5 OT-matched perturbation training ({spec.task}, {config.data.name})",
    [
      (
        "Setup",
        f"eps={spec.eps:.4g}, alpha={spec.alpha:.4g}, k={spec.ascent_steps} training ascent "
        f"steps; {spec.attack_steps} attack steps of {spec.attack_alpha:.4g}; vectors="
        f"{spec.vectors}, cost={spec.sinkhorn.cost}, Sinkhorn "
        f"{spec.sinkhorn.max_iterations} fixed iterations, perturbed_only="
        f"{spec.perturbed_only}; loss threshold {config.train.loss_threshold}, step limit "
        f"{config.train.steps}; seeds {seed_list}; {len(data['test']['image'])} test images.",
      ),
      ("Results (mean ± sample std over seeds)", report.markdown_table(header, rows)),
      ("Bar (robust metric above clean-only at <= 3 points clean cost)", bar["text"]),
      ("Plots", plots),
    ],
  )
  label = "mAP@0.5" if metric == "map50" else "accuracy"
  base = "clean" if "clean" in results else "ot"
  base_name = "clean-only" if base == "clean" else "not run (this method)"
  out = {
    "experiment": "ot_perturbation",
    "task": spec.task,
    "dataset": config.data.name,
    "time_s": run.elapsed(),
    "seeds": seed_list,
    "metrics": results,
    "metrics_std": spreads,
    "metrics_per_seed": per_seed,
    "stops": stops,
    "bar": {k: v for k, v in bar.items() if k != "text"},
    "rows": [
      harness.summary_row(
        f"{label} under {condition}",
        results["ot"][condition][metric],
        base_name,
        results[base][condition][metric],
      )
      for condition in ("ot_attack", "pgd", "clean")
    ],
  }
  harness.write_summary(run.workdir, out)
  return out


def _bar(per_seed: dict[str, list[dict]], metric: str) -> dict:
  """Whether the issue's bar is met against clean-only training (in metric points x100).

  The bar uses the mean over seeds; each gain also gets a paired verdict over the seeds
  (:func:`research.metrics.seeds.verdict`, tie band 0.5 points).
  """
  if "clean" not in per_seed:
    return {"met": None, "text": "clean-only training was not run."}

  def differences(condition: str) -> np.ndarray:
    return 100 * np.array(
      [
        o[condition][metric] - c[condition][metric]
        for o, c in zip(per_seed["ot"], per_seed["clean"], strict=True)
      ]
    )

  gain_ot, gain_pgd = differences("ot_attack"), differences("pgd")
  cost = -differences("clean")
  met = bool(gain_ot.mean() > 0 and gain_pgd.mean() > 0 and cost.mean() <= 3.0)
  verdicts = {
    "ot_attack": seeds.verdict(gain_ot, tie_band=0.5),
    "pgd": seeds.verdict(gain_pgd, tie_band=0.5),
  }
  text = (
    f"robust gain under OT attack {gain_ot.mean():+.2f} points ({verdicts['ot_attack']}; per "
    f"seed {np.round(gain_ot, 2).tolist()}), under PGD {gain_pgd.mean():+.2f} points "
    f"({verdicts['pgd']}; per seed {np.round(gain_pgd, 2).tolist()}), clean cost "
    f"{cost.mean():+.2f} points (per seed {np.round(cost, 2).tolist()}): bar "
    f"{'met' if met else 'NOT met'} on the mean over {len(gain_ot)} seed(s)."
  )
  return {
    "met": met,
    "gain_ot_attack": float(gain_ot.mean()),
    "gain_pgd": float(gain_pgd.mean()),
    "clean_cost": float(cost.mean()),
    "verdicts": verdicts,
    "text": text,
  }
