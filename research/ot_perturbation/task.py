"""The M5 method on a task model: losses, vector sets, target sets, train and eval steps.

Pure, jit-compatible functions specialised on a `settings.Spec` (bound with
`functools.partial`): the detection (CenterNet) or classification task loss, the standard and
perturbed vector sets of step 3, the target perturbed set of steps 2-5, the training update of
step 6 for the three arms, and the evaluation step that attacks and predicts one test batch.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from research import losses
from research.data import detection
from research.models import detector
from research.models.resnet import ResNet
from research.ot_perturbation import core
from research.ot_perturbation.settings import DETECTOR_STRIDE, Spec
from research.supervised import classification
from research.training import state, steps


def batch_keys(task: str) -> tuple[str, ...]:
  """The batch features of a task."""
  return detection.BATCH_KEYS if task == "detection" else ("image", "label")


def build_task_model(config: ml_collections.ConfigDict, task: str, num_classes: int) -> Any:
  """Detector on a 3-stage ResNet backbone (stride 4), or the classification ResNet."""
  if task == "classification":
    return classification.build_model(config, num_classes)
  m = config.model
  backbone = ResNet(0, tuple(m.stage_sizes), tuple(m.widths), m.embedding_dim, 1)
  return detector.Detector(backbone, num_classes, DETECTOR_STRIDE, m.head_channels)


def task_targets(batch: dict, spec: Spec) -> Any:
  """Detection: CenterNet targets from the padded boxes; classification: the labels."""
  if spec.task == "classification":
    return batch["label"]
  return detection.centernet_targets(
    batch, num_classes=spec.num_classes, image_size=spec.image_size, stride=DETECTOR_STRIDE
  )


def task_loss(
  params: Any, images: jax.Array, targets: Any, *, model: Any, spec: Spec
) -> tuple[jax.Array, dict]:
  """The task loss of METHODS.md M5 step 6: CenterNet detection loss or cross-entropy.

  Args:
    params: model parameters.
    images: `[B, H, W, C]` float in [0, 1].
    targets: `task_targets`' output for the batch.
    model: detector or classifier.
    spec: static settings.

  Returns:
    (scalar loss, metrics).
  """
  out = model.apply({"params": params}, images, train=True)
  if spec.task == "detection":
    return detector.detection_loss(out, targets)
  ce = losses.softmax_cross_entropy(out["logits"], targets)
  return ce, {"ce": ce, "accuracy": jnp.mean(jnp.argmax(out["logits"], -1) == targets)}


def feature_vectors(params: Any, images: jax.Array, *, model: Any, spec: Spec) -> jax.Array:
  """Standard / perturbed vector sets of step 3: pooled features or logits, `[B, D]`.

  Detection "logits" are the flattened heatmap logits `[B, h * w * K]`.
  """
  out = model.apply({"params": params}, images)
  if spec.ot.vectors == "pooled":
    return out["pooled"]
  logits = out["heatmap"] if spec.task == "detection" else out["logits"]
  return logits.reshape(logits.shape[0], -1)


def ot_target_set(
  params: Any, x: jax.Array, rng: jax.Array, *, model: Any, spec: Spec, steps_: int, alpha: float
) -> tuple[jax.Array, dict]:
  """Steps 2-5: random start, then the target perturbed set maximising `D` (step `alpha`).

  Args:
    params: model parameters.
    x: clean images `[B, H, W, C]` in [0, 1].
    rng: key of the random start.
    model: detector or classifier.
    spec: static settings.
    steps_: ascent steps.
    alpha: ascent step size.

  Returns:
    (target set `[B, H, W, C]`, scalar diagnostics: distances, finiteness, Sinkhorn state).
  """
  ot = spec.ot
  features_fn = functools.partial(feature_vectors, params, model=model, spec=spec)
  if ot.target_set == "candidates":
    cands = core.candidate_perturbations(rng, x, ot.num_candidates, kind=ot.kind, eps=ot.eps)
    x_t, aux = core.best_of_candidates(features_fn, x, cands, sinkhorn_config=ot.sinkhorn)
    return x_t, {"distance": jnp.max(aux["distances"]), "ot_finite": aux["finite"]}
  x_init = core.perturbed_images(rng, x, kind=ot.kind, eps=ot.eps)
  x_t, aux = core.ot_attack(
    features_fn, x, x_init, eps=ot.eps, alpha=alpha, steps=steps_, sinkhorn_config=ot.sinkhorn
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
  """PGD images `[B, H, W, C]` on the task loss with the true targets (uniform random start)."""
  x_init = core.perturbed_images(rng, x, kind="uniform", eps=spec.ot.eps)
  loss_fn = lambda images: task_loss(params, images, targets, model=model, spec=spec)[0]  # noqa: E731
  return core.pgd_attack(loss_fn, x, x_init, eps=spec.ot.eps, alpha=alpha, steps=steps_)


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
  step 6"); for 'ot' and 'pgd' the loss is `loss1 + loss2` (`loss2` alone with
  `spec.ot.perturbed_only` for 'ot'). A step whose loss, gradients or new parameters are not
  all finite is recorded in `nonfinite_step`, as `training.steps.train_step` does.

  Args:
    train_state: the replicated state.
    batch: task batch (`image` uint8 `[B, H, W, C]` plus boxes or labels).
    rng: base key; the step is folded in.
    model: detector or classifier.
    tx: optimizer.
    spec: static settings.
    training: one of `settings.TRAININGS`.

  Returns:
    (new state, metrics including `loss` (the target loss of step 7), `loss1`, `loss2`).
  """
  step_rng = jax.random.fold_in(rng, train_state.step)
  x = steps.images_to_float(batch["image"])
  targets = task_targets(batch, spec)
  loss_fn = functools.partial(task_loss, model=model, spec=spec)
  extra: dict = {}
  k, alpha = spec.ot.ascent_steps, spec.ot.alpha
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
      perturbed_only=spec.ot.perturbed_only and training == "ot",
    )

  (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(train_state.params)
  updates, opt_state = tx.update(grads, train_state.opt_state, train_state.params)
  params = optax.apply_updates(train_state.params, updates)
  finite = jnp.isfinite(loss) & steps.all_finite(grads) & steps.all_finite(params)
  first_bad = (train_state.nonfinite_step < 0) & ~finite
  new_state = state.TrainState(
    step=train_state.step + 1,
    params=params,
    opt_state=opt_state,
    nonfinite_step=jnp.where(first_bad, train_state.step, train_state.nonfinite_step),
  )
  metrics = {**metrics, **{k: v.astype(jnp.float32) for k, v in extra.items()}}
  return new_state, {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads)}


def perturbed_test_images(
  params: Any, batch: dict, rng: jax.Array, *, model: Any, spec: Spec, condition: str
) -> jax.Array:
  """The test images `[B, H, W, C]` of a condition (clean, uniform noise, OT attack, PGD)."""
  x = steps.images_to_float(batch["image"])
  if condition == "clean":
    return x
  if condition == "noise":
    return core.perturbed_images(rng, x, kind="uniform", eps=spec.ot.eps)
  k, alpha = spec.ot.attack_steps, spec.ot.attack_alpha
  if condition == "ot_attack":
    return ot_target_set(params, x, rng, model=model, spec=spec, steps_=k, alpha=alpha)[0]
  targets = task_targets(batch, spec)
  return pgd_set(params, x, targets, rng, model=model, spec=spec, steps_=k, alpha=alpha)


def eval_step(
  params: Any, batch: dict, key: jax.Array, *, model: Any, spec: Spec, condition: str
) -> dict:
  """Predictions on one padded test batch under `condition`.

  The batch's random start is `fold_in(key, b)` for the batch's position `b` in the split
  (`index[0] // B`); the attacks see the whole batch, padding rows included.

  Args:
    params: model parameters.
    batch: `predict`'s batch: the task features `[B, ...]`, `valid [B]` and `index [B]`.
    key: the condition's key.
    model: detector or classifier.
    spec: static settings.
    condition: one of `settings.CONDITIONS`.

  Returns:
    detection: `boxes [B, top_k, 4]`, `scores`, `classes`; classification: `predictions [B]`;
    plus `images [B, H, W, C]` (the evaluated inputs).
  """
  index = batch["index"]
  rng = jax.random.fold_in(key, index[0] // index.shape[0])
  x = perturbed_test_images(params, batch, rng, model=model, spec=spec, condition=condition)
  out = model.apply({"params": params}, x)
  if spec.task == "classification":
    return {"predictions": jnp.argmax(out["logits"], -1), "images": x}
  dets = detector.decode_detections(out, stride=DETECTOR_STRIDE, top_k=spec.top_k)
  return {**dets, "images": x}


def transport_plan(params: Any, x: jax.Array, x_pert: jax.Array, *, model: Any, spec: Spec):
  """(plan P* `[B, B]`, cost C `[B, B]`) of D between a batch's clean and perturbed vectors."""
  _, aux = core.feature_matching_distance(
    feature_vectors(params, x, model=model, spec=spec),
    feature_vectors(params, x_pert, model=model, spec=spec),
    spec.ot.sinkhorn,
  )
  return aux["plan"], aux["cost_matrix"]
