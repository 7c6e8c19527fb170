"""Evaluation of a segmenter under a perturbation (METHODS.md M1 "Measure").

`evaluate_under` runs `perturbed_eval_step` over a split with `predict` and returns the flat
metrics of one (arm, split, condition): mIoU, pixel accuracy, per-class IoU, targeted success
(overall and per pair) and the flip rate. `sign_noise_like` is the random-noise control.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from research.metrics import segmentation as seg_metrics
from research.training import predict, steps
from research.uap_segmentation import core


def sign_noise_like(rng: jax.Array, perturbation: np.ndarray) -> np.ndarray:
  """The control: uniform random signs scaled to `||R||_inf` (same L-inf norm as `R`).

  Args:
    rng: PRNG key.
    perturbation: `[H, W, C]` the perturbation `R` to match.

  Returns:
    `[H, W, C]` noise with entries `+-||R||_inf`.
  """
  radius = float(np.max(np.abs(perturbation)))
  signs = jax.random.rademacher(rng, perturbation.shape, dtype=jnp.float32)
  return np.asarray(radius * signs)


def perturbed_eval_step(
  params_and_perturbation: tuple[Any, jax.Array],
  batch: dict,
  *,
  model: Any,
  num_classes: int,
  pairs: jax.Array,
  ignore_label: int = 255,
) -> dict:
  """Confusion and targeted hits of a batch under `clip(x + R)` (METHODS.md M1 "Measure").

  Besides the targeted success (`src` pixels predicted `tgt`) it counts *flips*: `src`
  pixels that the model does not already call `tgt` on the clean image but does under the
  perturbation, which separates what the perturbation does from the model's clean confusion.

  Args:
    params_and_perturbation: `(params, R [H, W, 3])`; `R = 0` evaluates clean images.
    batch: `{"image": [B, H, W, 3], "semantic": [B, H, W], "valid": [B] bool}`.
    model: the segmenter.
    num_classes: K.
    pairs: `[P, 2]` confusable `(src, tgt)` pairs.
    ignore_label: label excluded everywhere.

  Returns:
    `{"confusion": [K, K] under R, "hits": [B, P] pixels of src_p predicted tgt_p,
    "targeted": [B, P] pixels of class src_p, "flips": [B, P] of those not tgt_p clean but
    tgt_p under R, "flippable": [B, P] of those not tgt_p clean}`; padding rows count 0.
  """
  params, perturbation = params_and_perturbation
  x = steps.images_to_float(batch["image"])

  def labels_of(images):
    return jnp.argmax(model.apply({"params": params}, images)["logits"], -1)[..., None]

  clean = labels_of(x)
  predictions = labels_of(core.second_samples(x, perturbation))
  labels = batch["semantic"].astype(jnp.int32)
  valid = (labels != ignore_label) & batch["valid"][:, None, None]
  is_src = (labels[..., None] == pairs[:, 0]) & valid[..., None]  # [B, H, W, P]
  hit = is_src & (predictions == pairs[:, 1])
  flippable = is_src & (clean != pairs[:, 1])
  return {
    "confusion": steps.confusion_counts(labels, predictions[..., 0], valid, num_classes),
    "hits": jnp.sum(hit, axis=(1, 2)),
    "targeted": jnp.sum(is_src, axis=(1, 2)),
    "flips": jnp.sum(flippable & hit, axis=(1, 2)),
    "flippable": jnp.sum(flippable, axis=(1, 2)),
  }


def evaluate_under(
  eval_step: Callable,
  params: Any,
  perturbation: np.ndarray,
  arrays: dict,
  *,
  batch_size: int,
  mesh: Mesh,
  pair_names: Sequence[str],
  class_names: Sequence[str],
) -> dict[str, float]:
  """The metrics of a split under `R` (`R = 0`: clean), ready for `Results.add`.

  Args:
    eval_step: jitted `perturbed_eval_step` with its model, classes and pairs bound.
    params: the evaluated model's parameters.
    perturbation: `[H, W, 3]` R.
    arrays: the split, `{"image": [N, H, W, 3], "semantic": [N, H, W]}`.
    batch_size: evaluation batch size.
    mesh: the device mesh.
    pair_names: `src->tgt` names of the P pairs.
    class_names: the K class names.

  Returns:
    `{"miou", "pixel_accuracy", "success", "flip_rate", "success/<pair>" per pair,
    "iou/<class>" per class}`.
  """
  out = predict.predict(
    eval_step,
    (params, jnp.asarray(perturbation, jnp.float32)),
    arrays,
    batch_size=batch_size,
    mesh=mesh,
    keys=("image", "semantic"),
    collect=("hits", "targeted", "flips", "flippable"),
    sum_over_batches=("confusion",),
    name="evaluate",
  )
  hits, targeted = out["hits"].sum(0), out["targeted"].sum(0)
  flips, flippable = out["flips"].sum(0), out["flippable"].sum(0)
  per_pair = hits / np.maximum(targeted, 1)
  iou = seg_metrics.per_class_iou(out["confusion"])
  return {
    **seg_metrics.segmentation_summary(out["confusion"]),
    "success": float(hits.sum() / max(targeted.sum(), 1)),
    "flip_rate": float(flips.sum() / max(flippable.sum(), 1)),
    **{f"success/{p}": float(v) for p, v in zip(pair_names, per_pair)},
    **{f"iou/{c}": float(v) for c, v in zip(class_names, iou)},
  }


@functools.partial(jax.jit, static_argnums=0)
def _labels_under(model: Any, params: Any, images: jax.Array, perturbation: jax.Array):
  x = core.second_samples(steps.images_to_float(images), perturbation)
  return jnp.argmax(model.apply({"params": params}, x)["logits"], -1)


def predict_labels(
  model: Any, params: Any, images: np.ndarray, perturbation: np.ndarray
) -> np.ndarray:
  """Predicted label maps `[B, H, W]` of `clip(images / 255 + perturbation)` (for figures)."""
  return np.asarray(_labels_under(model, params, jnp.asarray(images), jnp.asarray(perturbation)))
