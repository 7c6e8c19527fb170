"""Pure step functions: `step(state, batch, rng) -> (state, metrics)`.

Configuration (the model, the optimizer, loss weights) is bound with `functools.partial`; the
result is compiled once with `parallel.compile_train_step`. Per-step randomness comes from
`jax.random.fold_in(rng, state.step)`, so a resumed run draws the same keys.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from research import losses
from research.training.state import TrainState

LossFn = Callable[[Any, dict, jax.Array], tuple[jnp.ndarray, dict]]


def images_to_float(images: jnp.ndarray) -> jnp.ndarray:
  """uint8 [B, H, W, C] images to float32 in [0, 1] (float inputs pass through)."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def all_finite(tree: Any) -> jnp.ndarray:
  """Bool scalar: every element of every array in `tree` is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def next_state(
  state: TrainState, loss: jax.Array, grads: Any, params: Any, opt_state: Any
) -> TrainState:
  """The state after one update, with a non-finite update recorded (see `train_step`).

  Args:
    state: the state before the update.
    loss: the update's scalar loss.
    grads: the update's gradients (any pytree).
    params: the updated parameters.
    opt_state: the updated optimizer state.

  Returns:
    `state` one step on, holding `params` and `opt_state`; `nonfinite_step` is set to this step
    when it is the first whose loss, gradients or updated parameters are not all finite.
  """
  finite = jnp.isfinite(loss) & all_finite(grads) & all_finite(params)
  first_bad = (state.nonfinite_step < 0) & ~finite
  return TrainState(
    step=state.step + 1,
    params=params,
    opt_state=opt_state,
    nonfinite_step=jnp.where(first_bad, state.step, state.nonfinite_step),
  )


def train_step(
  state: TrainState,
  batch: dict,
  rng: jax.Array,
  *,
  loss_fn: LossFn,
  tx: optax.GradientTransformation,
) -> tuple[TrainState, dict]:
  """One gradient update of `loss_fn(params, batch, rng) -> (loss, metrics)`.

  A step whose loss, gradients or updated parameters are not all finite (NaN or infinite) is
  recorded in `state.nonfinite_step` (first bad step), which the host reads at log and
  checkpoint time; the loop then stops and keeps the last good checkpoint. Checking the
  gradients and parameters too (as big_vision does) catches a finite loss with a NaN gradient,
  which would otherwise write NaN parameters into the next checkpoint.

  Returns:
    (new state, metrics dict of scalars including `loss` and `grad_norm`).
  """
  step_rng = jax.random.fold_in(rng, state.step)
  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, step_rng)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = next_state(state, loss, grads, params, opt_state)
  return new_state, {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads)}


def classification_loss(
  params: Any, batch: dict, rng: jax.Array, *, model: nn.Module, weight_decay: float = 0.0
) -> tuple[jnp.ndarray, dict]:
  """Softmax cross-entropy of `model(image)["logits"]` against `batch["label"]`.

  Args:
    params: model parameters.
    batch: {"image": [B, H, W, C] uint8 or float, "label": [B] int}.
    rng: unused (deterministic model); part of the loss-function interface.
    model: a module returning a dict with `logits` [B, K].
    weight_decay: coefficient of an L2 penalty on kernels (0 to rely on the optimizer).

  Returns:
    (loss, {"ce", "accuracy"}).
  """
  del rng
  logits = model.apply({"params": params}, images_to_float(batch["image"]), train=True)["logits"]
  ce = losses.softmax_cross_entropy(logits, batch["label"])
  loss = ce + weight_decay * losses.l2_weight_penalty(params)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
  return loss, {"ce": ce, "accuracy": accuracy}


def segmentation_loss(
  params: Any,
  batch: dict,
  rng: jax.Array,
  *,
  model: nn.Module,
  ignore_label: int = 255,
  weight_decay: float = 0.0,
) -> tuple[jnp.ndarray, dict]:
  """Per-pixel cross-entropy of `model(image)["logits"]` against `batch["semantic"]`.

  Args:
    params: model parameters.
    batch: {"image": [B, H, W, 3], "semantic": [B, H, W] int}.
    rng: unused; part of the loss-function interface.
    model: a module returning `logits` [B, H, W, K].
    ignore_label: label excluded from the loss.
    weight_decay: coefficient of an L2 penalty on kernels.

  Returns:
    (loss, {"ce", "pixel_accuracy"}).
  """
  del rng
  logits = model.apply({"params": params}, images_to_float(batch["image"]), train=True)["logits"]
  labels = batch["semantic"].astype(jnp.int32)
  ce = losses.pixel_cross_entropy(logits, labels, ignore_label)
  valid = labels != ignore_label
  correct = (jnp.argmax(logits, -1) == labels) & valid
  loss = ce + weight_decay * losses.l2_weight_penalty(params)
  return loss, {"ce": ce, "pixel_accuracy": jnp.sum(correct) / jnp.maximum(jnp.sum(valid), 1)}


def confusion_counts(
  labels: jnp.ndarray, predictions: jnp.ndarray, valid: jnp.ndarray, num_classes: int
) -> jnp.ndarray:
  """[K, K] int32 confusion counts on device (rows true, columns predicted) of valid entries."""
  labels = labels.astype(jnp.int32).ravel()
  valid = valid.ravel() & (labels >= 0) & (labels < num_classes)
  flat = jnp.where(valid, labels * num_classes + predictions.astype(jnp.int32).ravel(), 0)
  counts = jnp.bincount(flat, weights=valid.astype(jnp.int32), length=num_classes * num_classes)
  return counts.reshape(num_classes, num_classes).astype(jnp.int32)


def classification_eval_step(
  params: Any, batch: dict, *, model: nn.Module, num_classes: int
) -> dict:
  """Predictions and confusion counts of a (padded) batch.

  Args:
    params: model parameters.
    batch: {"image", "label": [B], "valid": [B] bool (False on padding)}.
    model: the classifier.
    num_classes: K.

  Returns:
    {"confusion": [K, K] int32, "predictions": [B] int32, "embedding": [B, D]}.
  """
  out = model.apply({"params": params}, images_to_float(batch["image"]))
  predictions = jnp.argmax(out["logits"], -1)
  return {
    "confusion": confusion_counts(batch["label"], predictions, batch["valid"], num_classes),
    "predictions": predictions,
    "embedding": out["embedding"],
  }


def segmentation_eval_step(
  params: Any, batch: dict, *, model: nn.Module, num_classes: int, ignore_label: int = 255
) -> dict:
  """Confusion counts of a (padded) segmentation batch ({"image", "semantic", "valid"})."""
  logits = model.apply({"params": params}, images_to_float(batch["image"]))["logits"]
  predictions = jnp.argmax(logits, -1)
  labels = batch["semantic"].astype(jnp.int32)
  valid = (labels != ignore_label) & batch["valid"][:, None, None]
  return {
    "confusion": confusion_counts(labels, predictions, valid, num_classes),
    "predictions": predictions,
  }
