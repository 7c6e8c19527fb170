"""M4's model, loss, compiled training step and panoptic prediction.

The loss of one training is fixed in Python by its `settings.LossSpec`: the pseudo-label rule
and the distillation weighting are bound with `functools.partial`, so a training computes only
its own variant, and the historical forward pass exists only in the steps that need it. Each
distinct (spec, phase) compiles one step (`compile_step`); trainings with the same spec and
phase share it (naive and joint fine-tuning differ only in their labels).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from research.incremental_panoptic import core
from research.incremental_panoptic.settings import LossSpec, ModelSettings, PhaseSettings, Settings
from research.models import mask_matching
from research.models.mask_former import MaskFormer, TinyMultiScaleBackbone
from research.training import parallel, state, steps


def build_model(model: ModelSettings, num_classes: int) -> MaskFormer:
  """The MaskFormer of `model` over `num_classes` real classes (plus no-object)."""
  return MaskFormer(
    num_classes=num_classes,
    backbone=TinyMultiScaleBackbone(model.widths, stem_stride=model.stem_stride),
    num_queries=model.num_queries,
    hidden_dim=model.hidden_dim,
    num_decoder_layers=model.num_decoder_layers,
    num_heads=model.num_heads,
    ffn_dim=model.ffn_dim,
    num_memory_scales=len(model.widths) - 1 or 1,
  )


def _all_layers(out: dict) -> tuple[jax.Array, jax.Array]:
  """`[L + 1, B, ...]` class and mask logits, auxiliary layers first, final layer last."""
  classes = jnp.concatenate([out["aux"]["class_logits"], out["class_logits"][None]])
  masks = jnp.concatenate([out["aux"]["mask_logits"], out["mask_logits"][None]])
  return classes, masks


def cosine_learning_rate(step: jax.Array, base: float, warmup: float, total: float) -> jax.Array:
  """Linear warm-up from 0 then cosine decay to 0 (`optax.warmup_cosine_decay_schedule`).

  Args:
    step: traced int scalar, updates done.
    base: peak learning rate.
    warmup: warm-up steps.
    total: steps of the phase.

  Returns:
    float32 scalar.
  """
  step = step.astype(jnp.float32)
  base, warmup, total = np.float32(base), np.float32(warmup), np.float32(total)
  warm = base * step / jnp.maximum(warmup, 1.0)
  progress = jnp.clip((step - warmup) / jnp.maximum(total - warmup, 1.0), 0.0, 1.0)
  return jnp.where(step < warmup, warm, 0.5 * base * (1.0 + jnp.cos(jnp.pi * progress)))


def make_optimizer(weight_decay: float) -> optax.GradientTransformation:
  """AdamW whose learning rate is set by the step (`optax.inject_hyperparams`); decay on kernels."""
  return optax.inject_hyperparams(optax.adamw)(
    learning_rate=0.0,
    weight_decay=weight_decay,
    mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p),
  )


def incremental_loss(
  params: Any,
  batch: dict,
  rng: jax.Array,
  *,
  hist_params: Any,
  spec: LossSpec,
  model: MaskFormer,
  old_class_mask: np.ndarray,
  criterion: dict,
  pseudo_settings: dict,
  temperature: float,
) -> tuple[jax.Array, dict]:
  """Task loss on true (+ pseudo) labels plus weighted distillation (METHODS.md M4 steps 2-5).

  Args:
    params: the current model's parameters (the only ones differentiated).
    batch: `{"image" [B, S, S, 3], "target_classes" [B, T], "target_masks" [B, T, h, w],
      "target_valid" [B, T]}` true labels.
    rng: unused (deterministic model).
    hist_params: the frozen historical parameters (step 2), wrapped in `stop_gradient`;
      unused (may be None) unless `spec.historical`.
    spec: the static choices of this training (pseudo labels, their overlap rule, weighting,
      `kd_weight`).
    model: the MaskFormer.
    old_class_mask: bool `[C]`.
    criterion: `w_class`, `w_bce`, `w_dice`, `no_object_weight` of `set_criterion_loss`.
    pseudo_settings: thresholds of `core.old_class_pseudo_labels` (not `overlap_rule`).
    temperature: distillation temperature.

  Returns:
    `(loss, metrics)`: loss = set-criterion loss over all decoder layers (step 4 matching
    inside) + `kd_weight` x distillation of the final layer (step 5); metrics add `kd`,
    `num_pseudo` (pseudo labels per image), `pseudo_dropped` (pseudo labels that did not fit
    the `T` target slots, per image) and `pseudo_on_true` (fraction of true-mask pixels that a
    pseudo mask also claims), all 0 where the spec has no such term.
  """
  del rng
  images = steps.images_to_float(batch["image"])
  classes, masks, valid = batch["target_classes"], batch["target_masks"], batch["target_valid"]
  cur_classes, cur_masks = _all_layers(model.apply({"params": params}, images, train=True))
  zero = jnp.zeros((), jnp.float32)
  metrics = {"kd": zero, "num_pseudo": zero, "pseudo_dropped": zero, "pseudo_on_true": zero}
  kd = None
  if spec.historical:
    hist = model.apply({"params": jax.lax.stop_gradient(hist_params)}, images)
    hist_classes, hist_masks = jax.lax.stop_gradient((hist["class_logits"], hist["mask_logits"]))
    kd = jnp.mean(
      jax.vmap(
        functools.partial(
          core.distillation_loss,
          old_class_mask=old_class_mask,
          weighting=spec.weighting,
          temperature=temperature,
        )
      )(cur_classes[-1], hist_classes)
    )
    metrics["kd"] = kd
  if spec.pseudo:
    p_masks, p_classes, p_valid = jax.vmap(
      functools.partial(
        core.old_class_pseudo_labels,
        old_class_mask=old_class_mask,
        overlap_rule=spec.overlap_rule,
        **pseudo_settings,
      )
    )(hist_classes, hist_masks, masks, valid)
    true_pixels = jnp.any(masks & valid[..., None, None], axis=1)
    pseudo_pixels = jnp.any(p_masks & p_valid[..., None, None], axis=1)
    _, scores = jax.vmap(core.query_class_confidence)(hist_classes)
    slots = classes.shape[1]

    def merge(*args):
      return core.merge_targets(*args[:6], max_targets=slots, pseudo_scores=args[6])

    classes, masks, valid, dropped = jax.vmap(merge)(
      classes, masks, valid, p_classes, p_masks, p_valid, scores
    )
    metrics["num_pseudo"] = jnp.mean(jnp.sum(p_valid, -1))
    metrics["pseudo_dropped"] = jnp.mean(dropped)
    metrics["pseudo_on_true"] = jnp.sum(true_pixels & pseudo_pixels) / jnp.maximum(
      jnp.sum(true_pixels), 1
    )
  task, task_metrics = mask_matching.set_criterion_loss(
    cur_classes, cur_masks, classes, masks, valid, **criterion
  )
  loss = task if kd is None else task + spec.kd_weight * kd
  return loss, {**task_metrics, **metrics}


def fine_tune_step(
  train_state: state.TrainState,
  hist_params: Any,
  batch: dict,
  rng: jax.Array,
  *,
  loss_fn,
  tx: optax.GradientTransformation,
  schedule: PhaseSettings,
) -> tuple[state.TrainState, dict]:
  """`steps.train_step` with the frozen historical parameters passed in (not differentiated).

  The learning rate of the `inject_hyperparams` optimizer follows `schedule` (warm-up, then
  cosine decay over the phase) and is logged as `learning_rate`.
  """
  lr = cosine_learning_rate(
    train_state.step, schedule.learning_rate, schedule.warmup_steps, schedule.steps
  )
  opt_state = train_state.opt_state._replace(
    hyperparams={**train_state.opt_state.hyperparams, "learning_rate": lr}
  )
  train_state = train_state.replace(opt_state=opt_state)
  loss = functools.partial(loss_fn, hist_params=hist_params)
  new_state, metrics = steps.train_step(train_state, batch, rng, loss_fn=loss, tx=tx)
  return new_state, {**metrics, "learning_rate": lr}


def compile_step(
  settings: Settings,
  model: MaskFormer,
  tx: optax.GradientTransformation,
  spec: LossSpec,
  schedule: PhaseSettings,
  mesh: jax.sharding.Mesh,
):
  """The jitted `step(state, hist_params, batch, rng) -> (state, metrics)` of one training.

  Args:
    settings: the experiment's settings (class split, loss weights, pseudo-label thresholds).
    model: the MaskFormer.
    tx: :func:`make_optimizer`'s optimizer.
    spec: the loss's static choices; a different spec is a different compiled step.
    schedule: the phase's learning-rate schedule.
    mesh: the device mesh (state and metrics come back replicated on it).

  Returns:
    the compiled step; the state is donated.
  """
  loss_fn = functools.partial(
    incremental_loss,
    spec=spec,
    model=model,
    old_class_mask=settings.old_class_mask,
    criterion=settings.criterion,
    pseudo_settings=dataclasses.asdict(settings.pseudo),
    temperature=settings.temperature,
  )
  rep = parallel.replicated(mesh)
  return jax.jit(
    functools.partial(fine_tune_step, loss_fn=loss_fn, tx=tx, schedule=schedule),
    donate_argnums=0,
    out_shardings=(rep, rep),
  )


def predict_panoptic(
  params: Any, batch: dict, *, model: MaskFormer, thing_mask: np.ndarray, inference: dict
) -> dict[str, jax.Array]:
  """Panoptic segmentation at image resolution (METHODS.md M4 step 6).

  Mask logits are upsampled bilinearly to the image size, then Mask2Former's panoptic
  inference runs per image.

  Args:
    params: the model's parameters.
    batch: `{"image" [B, S, S, 3], ...}`.
    model: the MaskFormer.
    thing_mask: bool `[C]`.
    inference: `object_mask_threshold` and `overlap_threshold`.

  Returns:
    `{"segment_map" [B, S, S] int32, "segment_classes" [B, Q] int32, "segment_valid" [B, Q]
    bool}`.
  """
  images = batch["image"]
  out = model.apply({"params": params}, steps.images_to_float(images))
  b, q = out["mask_logits"].shape[:2]
  masks = jax.image.resize(out["mask_logits"], (b, q) + images.shape[1:3], method="bilinear")
  infer = functools.partial(mask_matching.panoptic_inference, thing_mask=thing_mask, **inference)
  seg_map, seg_classes, seg_valid = jax.vmap(infer)(out["class_logits"], masks)
  return {"segment_map": seg_map, "segment_classes": seg_classes, "segment_valid": seg_valid}
