"""M4's model, loss, compiled training step and panoptic prediction.

The loss of one training is fixed in Python by its `settings.LossSpec`: the pseudo-label rule
and the distillation weighting are bound with `functools.partial`, so a training computes only
its own variant, and the historical forward pass exists only in the steps that need it. Each
distinct spec compiles one step (`compile_step`); the class split and the learning-rate
schedule are traced inputs, so step 0, every incremental step, every seed and the arms with the
same spec (step 0, naive and joint differ only in their labels) share it.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from research.incremental_panoptic import core
from research.incremental_panoptic.settings import LossSpec, ModelSettings, PhaseSettings, Settings
from research.models import mask_matching, resnet
from research.models.mask_former import MaskFormer, TinyMultiScaleBackbone
from research.training import parallel, state, steps


def build_model(model: ModelSettings, num_classes: int) -> MaskFormer:
  """The MaskFormer of `model` over `num_classes` real classes (plus no-object).

  The backbone is `TinyMultiScaleBackbone` for `model.backbone='small'`, else the named ResNet
  (`research.models.resnet`, feature strides 4, 8, 16, 32, computed in `model.dtype`).
  """
  if model.backbone == "small":
    backbone = TinyMultiScaleBackbone(model.widths, stem_stride=model.stem_stride)
    num_scales = len(model.widths)
  else:
    dtype = resnet.DTYPES[model.dtype]
    backbone = resnet.ResNet(0, backbone=model.backbone, dtype=dtype)
    num_scales = len(resnet.NAMED_STRIDES)
  return MaskFormer(
    num_classes=num_classes,
    backbone=backbone,
    num_queries=model.num_queries,
    hidden_dim=model.hidden_dim,
    num_decoder_layers=model.num_decoder_layers,
    num_heads=model.num_heads,
    ffn_dim=model.ffn_dim,
    num_memory_scales=num_scales - 1 or 1,
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
    base: peak learning rate (a number or a traced scalar).
    warmup: warm-up steps (same).
    total: steps of the phase (same).

  Returns:
    float32 scalar.
  """
  step = step.astype(jnp.float32)
  base, warmup, total = (jnp.asarray(x, jnp.float32) for x in (base, warmup, total))
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
  old_class_mask: jax.Array,
  spec: LossSpec,
  model: MaskFormer,
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
    old_class_mask: bool `[C]` classes of the historical model (a traced input: one compiled
      step serves every incremental step).
    spec: the static choices of this training (pseudo labels, their overlap rule and noise
      removal, distillation form, weighting, reduction, layers, `kd_weight`).
    model: the MaskFormer.
    criterion: `w_class`, `w_bce`, `w_dice`, `no_object_weight` of `set_criterion_loss`.
    pseudo_settings: keyword arguments of `core.old_class_pseudo_labels` for this spec.
    temperature: distillation temperature.

  Returns:
    `(loss, metrics)`: loss = set-criterion loss over all decoder layers (step 4 matching
    inside) + `kd_weight` x distillation (final layer, or summed over every layer when
    `spec.kd_all_layers`: CoMFormer); metrics add `kd`, `num_pseudo` (pseudo labels per
    image), `pseudo_dropped` (pseudo labels that did not fit the `T` target slots, per
    image) and `pseudo_on_true` (fraction of true-mask pixels that a pseudo mask also
    claims), all 0 where the spec has no such term.
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
    hist_all_classes, hist_all_masks = jax.lax.stop_gradient(_all_layers(hist))
    hist_classes, hist_masks = hist_all_classes[-1], hist_all_masks[-1]
    distill = functools.partial(
      core.distillation_loss,
      old_class_mask=old_class_mask,
      weighting=spec.weighting,
      temperature=temperature,
      reduction=spec.kd_reduction,
      form=spec.kd_form,
    )
    if spec.kd_all_layers:
      kd = jnp.sum(jax.vmap(distill)(cur_classes, hist_all_classes))
    else:
      kd = distill(cur_classes[-1], hist_classes)
    metrics["kd"] = kd
  if spec.pseudo:
    p_masks, p_classes, p_valid = jax.vmap(
      functools.partial(
        core.old_class_pseudo_labels, old_class_mask=old_class_mask, **pseudo_settings
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
  old_class_mask: jax.Array,
  schedule: jax.Array,
  batch: dict,
  rng: jax.Array,
  *,
  loss_fn,
  tx: optax.GradientTransformation,
) -> tuple[state.TrainState, dict]:
  """`steps.train_step` with the frozen historical parameters passed in (not differentiated).

  Args:
    train_state: the state (donated).
    hist_params: the historical parameters (None when the loss does not use them).
    old_class_mask: bool `[C]`, traced.
    schedule: float32 `[3]` = (peak learning rate, warm-up steps, phase steps), traced, so one
      compiled step serves phases of any length: warm-up, then cosine decay over the phase;
      the learning rate is logged as `learning_rate`.
    batch: the batch.
    rng: the step key.
    loss_fn: `incremental_loss` with its static choices bound.
    tx: the optimizer.
  """
  lr = cosine_learning_rate(train_state.step, schedule[0], schedule[1], schedule[2])
  opt_state = train_state.opt_state._replace(
    hyperparams={**train_state.opt_state.hyperparams, "learning_rate": lr}
  )
  train_state = train_state.replace(opt_state=opt_state)
  loss = functools.partial(loss_fn, hist_params=hist_params, old_class_mask=old_class_mask)
  new_state, metrics = steps.train_step(train_state, batch, rng, loss_fn=loss, tx=tx)
  return new_state, {**metrics, "learning_rate": lr}


def schedule_array(schedule: PhaseSettings, steps: int | None = None) -> np.ndarray:
  """The traced schedule input of :func:`fine_tune_step` (`steps` overrides the length)."""
  total = schedule.steps if steps is None else steps
  return np.array([schedule.learning_rate, schedule.warmup_steps, total], np.float32)


def compile_step(
  settings: Settings,
  model: MaskFormer,
  tx: optax.GradientTransformation,
  spec: LossSpec,
  mesh: jax.sharding.Mesh,
):
  """The jitted `step(state, hist_params, old_class_mask, schedule, batch, rng)` of a spec.

  Args:
    settings: the experiment's settings (loss weights, pseudo-label thresholds).
    model: the MaskFormer.
    tx: :func:`make_optimizer`'s optimizer.
    spec: the loss's static choices; a different spec is a different compiled step.
    mesh: the device mesh (state and metrics come back replicated on it).

  Returns:
    the compiled step; the state is donated.
  """
  loss_fn = functools.partial(
    incremental_loss,
    spec=spec,
    model=model,
    criterion=settings.criterion,
    pseudo_settings=settings.pseudo_kwargs(spec),
    temperature=settings.temperature,
  )
  rep = parallel.replicated(mesh)
  return jax.jit(
    functools.partial(fine_tune_step, loss_fn=loss_fn, tx=tx),
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
