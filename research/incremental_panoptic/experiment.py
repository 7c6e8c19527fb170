"""Experiment of METHODS.md M4: class-incremental panoptic fine-tuning without forgetting.

Step 0 trains a Mask2Former-style model on the *old* classes only (pixels of the other classes
are void: no target covers them). Step 1 fine-tunes it on other images that are labelled only
for the *new* classes (all of them also show old-class stuff, and many show cars). Variants of
step 1, all from the step-0 parameters with the same images, steps and optimizer:

- ``naive``: the new-class labels only (forgetting baseline);
- ``method``: the new-class labels plus old-class pseudo labels from the frozen step-0
  ("historical") model (M4 step 3), matched together (step 4), plus the distillation loss on
  old-class probabilities weighted by ``1 - p_no-object(historical)`` (step 5);
- ``joint``: every label of the step-1 images, old and new (the ceiling);
- ablations: ``no_pseudo`` (distillation only), ``no_distill`` (pseudo labels only),
  ``no_weighting`` (distillation weight 1), ``comformer`` (true-mask pixels removed from the
  pseudo masks instead of dropping matched masks, weight ``(1 - p_no-object)^2``) and
  ``true_wins`` (matched masks dropped, then true-mask pixels removed from the kept ones, so
  the label union is one panoptic labelling; default weight).

Every variant is evaluated on held-out, fully labelled images with PQ/SQ/RQ over the old, the
new and all classes; forgetting = PQ_old(step 0) - PQ_old(after step 1).

Data conventions: a split is ``{"image" [N, S, S, 3] uint8, "panoptic" [N, S, S] int32 segment
ids (0 = void), "segment_ids" / "segment_classes" [N, G] int, "segment_crowd" /
"segment_valid" [N, G] bool}`` (:func:`street_panoptic_arrays`, :func:`coco_panoptic_arrays`);
training targets are padded to ``T`` segments at the mask-logit resolution
(:func:`panoptic_targets`). Images with no segment of the kept classes get all-invalid targets
(every query is trained towards no-object); crowd segments are never training targets and are
handled by the PQ crowd rule at evaluation.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from research import config_checks
from research.data import catalogue, embedded, samplers, street_scenes
from research.incremental_panoptic import core
from research.metrics import panoptic as pq_metrics
from research.models import mask_matching
from research.models.mask_former import MaskFormer, TinyMultiScaleBackbone
from research.training import harness, loop, parallel, report, state, steps

VARIANTS = {
  "naive": dict(labels="new", pseudo=False, distill=False),
  "method": dict(labels="new", pseudo=True, distill=True),
  "joint": dict(labels="all", pseudo=False, distill=False),
  "no_pseudo": dict(labels="new", pseudo=False, distill=True),
  "no_distill": dict(labels="new", pseudo=True, distill=False),
  "no_weighting": dict(labels="new", pseudo=True, distill=True, weighting="none"),
  "comformer": dict(
    labels="new", pseudo=True, distill=True, weighting="squared", overlap_rule="remove_true_pixels"
  ),
  "true_wins": dict(labels="new", pseudo=True, distill=True, overlap_rule="drop_matched_true_wins"),
}
VARIANT_TITLES = {
  "naive": "naive fine-tuning",
  "method": "this method (pseudo labels + weighted distillation)",
  "joint": "joint: all labels (ceiling)",
  "no_pseudo": "without pseudo labels",
  "no_distill": "without distillation",
  "no_weighting": "without weighting (w = 1)",
  "comformer": "CoMFormer overlap rule, w = (1 - p_no-object)^2",
  "true_wins": "matched masks dropped and true pixels removed from the rest",
}
TARGET_KEYS = ("image", "target_classes", "target_masks", "target_valid")


# ------------------------------------------------------------------------------------- config


def validate(config: ml_collections.ConfigDict) -> None:
  """Fails at once, naming the field, on any value the experiment cannot use."""
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
  num_classes = config_checks.check_int(config, "data.num_classes", 2)
  widths = tuple(config_checks.get_field(config, "model.widths"))
  stem = config_checks.check_choice(config, "model.stem_stride", (1, 2))
  size = config_checks.check_int(config, "data.image_size", 8)
  if size % (stem * 2 ** len(widths)):
    raise config_checks.ConfigError(
      f"config.data.image_size={size} is not allowed: it must be a multiple of "
      f"{stem * 2 ** len(widths)} (stem_stride * 2**len(model.widths))"
    )
  things = tuple(config_checks.get_field(config, "data.thing_classes"))
  if any(not 0 <= c < num_classes for c in things):
    raise config_checks.ConfigError(
      f"config.data.thing_classes={things} is not allowed: ids must be in [0, {num_classes})"
    )
  try:
    core.check_class_split(
      list(config.data.old_classes), list(config.data.new_classes), num_classes
    )
  except ValueError as e:
    raise config_checks.ConfigError(f"config.data: {e}") from e
  config_checks.check_float(config, "data.step0_fraction", 0.0, 1.0, exclusive_minimum=True)
  queries = config_checks.check_int(config, "model.num_queries", 1)
  max_segments = config_checks.check_int(config, "data.max_segments", 1)
  if max_segments > queries:
    raise config_checks.ConfigError(
      f"config.data.max_segments={max_segments} is not allowed: it must be <= "
      f"model.num_queries={queries} (every target needs its own query)"
    )
  for field in ("model.hidden_dim", "model.num_decoder_layers", "model.num_heads"):
    config_checks.check_int(config, field, 1)
  for field in ("loss.w_class", "loss.w_bce", "loss.w_dice", "method.kd_weight"):
    config_checks.check_float(config, field, 0.0)
  config_checks.check_float(config, "loss.no_object_weight", 0.0, exclusive_minimum=True)
  config_checks.check_float(config, "method.temperature", 0.0, exclusive_minimum=True)
  config_checks.check_choice(config, "method.weighting", core.WEIGHTINGS)
  try:
    core.check_pseudo_label_config(**pseudo_label_settings(config, "method"))
  except ValueError as e:
    raise config_checks.ConfigError(f"config.method: {e}") from e
  for field in ("inference.object_mask_threshold", "inference.overlap_threshold"):
    config_checks.check_float(config, field, 0.0, 1.0)
  variants = tuple(config_checks.get_field(config, "variants"))
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown or "naive" not in variants or "method" not in variants:
    raise config_checks.ConfigError(
      f"config.variants={variants} is not allowed: give 'naive', 'method' and any of "
      f"{tuple(VARIANTS)}"
    )
  for phase in ("step0", "step1"):
    config_checks.check_int(config, f"{phase}.steps", 1)
    config_checks.check_float(config, f"{phase}.learning_rate", 0.0, exclusive_minimum=True)
    config_checks.check_int(config, f"{phase}.warmup_steps", 0)
  config_checks.check_float(config, "optim.weight_decay", 0.0)
  config_checks.check_int(config, "train.batch_size", 1)
  config_checks.check_int(config, "train.eval_batch_size", 1)
  config_checks.check_int(config, "num_overlays", 0)


def pseudo_label_settings(config: ml_collections.ConfigDict, variant: str) -> dict:
  """Keyword arguments of `core.old_class_pseudo_labels` for a variant (METHODS.md M4 step 3)."""
  m = config.method
  return dict(
    match_iou=m.match_iou,
    noise_threshold=m.noise_threshold,
    max_owners=m.max_owners,
    min_area_ratio=m.min_area_ratio,
    query_score_threshold=m.query_score_threshold,
    overlap_rule=VARIANTS.get(variant, {}).get("overlap_rule", m.overlap_rule),
  )


# --------------------------------------------------------------------------------------- data


def street_panoptic_arrays(arrays: Mapping[str, np.ndarray], max_segments: int) -> dict:
  """Street scenes (`(class + 1) * 1000 + instance` ids) in the segment-table form.

  Args:
    arrays: `{"image" [N, S, S, 3], "panoptic" [N, S, S] int32}` from `embedded.street_arrays`.
    max_segments: table length `G`.

  Returns:
    `{"image", "panoptic", "segment_ids", "segment_classes", "segment_crowd", "segment_valid"}`.

  Raises:
    ValueError: when an image has more than `max_segments` segments.
  """
  panoptic = np.asarray(arrays["panoptic"], np.int64)
  n = len(panoptic)
  ids = np.zeros((n, max_segments), np.int64)
  valid = np.zeros((n, max_segments), bool)
  for i in range(n):
    present = np.unique(panoptic[i])
    present = present[present != pq_metrics.VOID]
    _check_segment_count(i, len(present), max_segments)
    ids[i, : len(present)] = present
    valid[i, : len(present)] = True
  return {
    "image": np.asarray(arrays["image"], np.uint8),
    "panoptic": panoptic.astype(np.int32),
    "segment_ids": ids,
    "segment_classes": np.where(valid, street_scenes.panoptic_category(ids), 0),
    "segment_crowd": np.zeros((n, max_segments), bool),
    "segment_valid": valid,
  }


def coco_panoptic_arrays(
  records: Sequence[Mapping[str, Any]], image_size: int, max_segments: int
) -> dict:
  """`catalogue.coco_panoptic_example` records resized to `[S, S]`, in the segment-table form.

  Images are resized by nearest-neighbour sampling at pixel centres (the same sampling for the
  image and the segment-id map, so ids stay exact); segments that vanish are dropped.

  Args:
    records: dicts with `image` [H, W, 3] uint8, `panoptic` [H, W] int32 ids (0 = void),
      `segment_ids`, `segment_classes` [K] int and `segment_is_crowd` [K] bool.
    image_size: output side `S`.
    max_segments: table length `G`.

  Returns:
    The same dict as :func:`street_panoptic_arrays`.

  Raises:
    ValueError: when an image keeps more than `max_segments` segments, or a segment id in the
      map has no entry in the record's table.
  """
  n = len(records)
  out = {
    "image": np.zeros((n, image_size, image_size, 3), np.uint8),
    "panoptic": np.zeros((n, image_size, image_size), np.int32),
    "segment_ids": np.zeros((n, max_segments), np.int64),
    "segment_classes": np.zeros((n, max_segments), np.int64),
    "segment_crowd": np.zeros((n, max_segments), bool),
    "segment_valid": np.zeros((n, max_segments), bool),
  }
  for i, record in enumerate(records):
    image = np.asarray(record["image"], np.uint8)
    h, w = image.shape[:2]
    rows = ((np.arange(image_size) + 0.5) * h / image_size).astype(int)
    cols = ((np.arange(image_size) + 0.5) * w / image_size).astype(int)
    out["image"][i] = image[rows][:, cols]
    ids_map = np.asarray(record["panoptic"], np.int64)[rows][:, cols]
    table = {
      int(s): (int(c), bool(k))
      for s, c, k in zip(
        record["segment_ids"], record["segment_classes"], record["segment_is_crowd"], strict=True
      )
    }
    present = [int(s) for s in np.unique(ids_map) if s != pq_metrics.VOID]
    missing = [s for s in present if s not in table]
    if missing:
      raise ValueError(
        f"record {i} segment ids {missing} are not allowed: they have no segment_ids entry"
      )
    _check_segment_count(i, len(present), max_segments)
    out["panoptic"][i] = ids_map
    for slot, s in enumerate(present):
      out["segment_ids"][i, slot] = s
      out["segment_classes"][i, slot], out["segment_crowd"][i, slot] = table[s]
      out["segment_valid"][i, slot] = True
  return out


def _check_segment_count(image: int, count: int, max_segments: int) -> None:
  if count > max_segments:
    raise ValueError(
      f"image {image} has {count} segments, which is not allowed: at most "
      f"data.max_segments={max_segments} (raise it, and model.num_queries with it)"
    )


def block_downsample(masks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """Binary masks `[..., H, W]` -> `[..., h, w]`: a block is in the mask when >= half is.

  Args:
    masks: bool masks; `H`, `W` multiples of `h`, `w`.
    shape: `(h, w)`.

  Returns:
    bool `[..., h, w]`.
  """
  big_h, big_w = masks.shape[-2:]
  h, w = shape
  if big_h % h or big_w % w:
    raise ValueError(f"shape={shape} is not allowed: it must divide the mask size {masks.shape}")
  blocks = masks.reshape(masks.shape[:-2] + (h, big_h // h, w, big_w // w))
  return blocks.mean(axis=(-3, -1)) >= 0.5


def panoptic_targets(
  arrays: Mapping[str, np.ndarray],
  keep_classes: Sequence[int],
  mask_shape: tuple[int, int],
  max_targets: int,
) -> dict[str, np.ndarray]:
  """Padded training targets of the kept classes at the mask-logit resolution.

  A target is a valid, non-crowd segment of a kept class; its mask is the block-majority
  downsampling of its pixels (:func:`block_downsample`); segments with no pixel left are not
  targets. Pixels of other classes, of crowd segments and of void are covered by no target.
  Targets are ordered by decreasing area.

  Args:
    arrays: the segment-table form (:func:`street_panoptic_arrays`).
    keep_classes: the labelled classes (old classes in step 0, new ones in step 1).
    mask_shape: `(h, w)` of the mask logits.
    max_targets: `T`.

  Returns:
    `{"image", "target_classes" [N, T] int32, "target_masks" [N, T, h, w] bool,
    "target_valid" [N, T] bool}`.
  """
  panoptic = arrays["panoptic"]
  keep = np.isin(arrays["segment_classes"], list(keep_classes))
  usable = arrays["segment_valid"] & ~arrays["segment_crowd"] & keep
  full = panoptic[:, None] == arrays["segment_ids"][:, :, None, None]
  small = block_downsample(full, mask_shape) & usable[:, :, None, None]
  area = small.sum((-2, -1))
  usable &= area > 0
  order = np.argsort(-np.where(usable, area, -1), axis=1, kind="stable")
  counts = usable.sum(1)
  if counts.max(initial=0) > max_targets:
    raise ValueError(
      f"an image has {counts.max()} targets, which is not allowed: at most max_targets="
      f"{max_targets}"
    )
  order = order[:, :max_targets]
  take = functools.partial(np.take_along_axis, indices=order, axis=1)
  valid = take(usable)
  masks = np.take_along_axis(small, order[:, :, None, None], axis=1) & valid[:, :, None, None]
  classes = np.where(valid, take(arrays["segment_classes"]), 0).astype(np.int32)
  pad = max_targets - order.shape[1]
  if pad:
    valid = np.pad(valid, ((0, 0), (0, pad)))
    classes = np.pad(classes, ((0, 0), (0, pad)))
    masks = np.pad(masks, ((0, 0), (0, pad), (0, 0), (0, 0)))
  return {
    "image": arrays["image"],
    "target_classes": classes,
    "target_masks": masks,
    "target_valid": valid,
  }


def ground_truth_segments(arrays: Mapping[str, np.ndarray], index: int) -> dict:
  """`{segment id: (class, iscrowd)}` of one image, for `PanopticQuality.update`."""
  valid = arrays["segment_valid"][index]
  return {
    int(s): (int(c), bool(k))
    for s, c, k in zip(
      arrays["segment_ids"][index][valid],
      arrays["segment_classes"][index][valid],
      arrays["segment_crowd"][index][valid],
      strict=True,
    )
  }


def split_train(arrays: Mapping[str, np.ndarray], fraction: float, seed: int) -> tuple[dict, dict]:
  """Disjoint random step-0 / step-1 image sets (`fraction` of the images go to step 0)."""
  n = len(arrays["image"])
  perm = np.random.default_rng([seed, 7]).permutation(n)
  cut = min(max(int(round(fraction * n)), 1), n - 1)
  return subset(arrays, perm[:cut]), subset(arrays, perm[cut:])


def subset(arrays: Mapping[str, np.ndarray], index: np.ndarray) -> dict:
  """The examples selected by a bool or int index."""
  return {k: v[index] for k, v in arrays.items()}


def load_panoptic_data(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """`{"train", "test"}` in the segment-table form, plus `class_names`."""
  d = config.data
  if d.name == "coco_panoptic":
    tables = {}
    for split, count in (("train", d.num_train), ("validation", d.num_test)):
      source, _ = catalogue.load("coco_panoptic", split, d.data_dir or None)
      records = [source[i] for i in range(min(count, len(source)))]
      tables[split] = coco_panoptic_arrays(records, d.image_size, d.max_segments)
    names = tuple(f"class_{c}" for c in range(d.num_classes))
    return {"train": tables["train"], "test": tables["validation"], "class_names": names}
  kwargs = dict(
    image_size=d.image_size,
    train_per_domain=d.train_per_domain,
    test_per_domain=d.test_per_domain,
    data_dir=d.data_dir or None,
  )
  return {
    split: street_panoptic_arrays(
      embedded.street_arrays(tuple(d.domains), split, **kwargs), d.max_segments
    )
    for split in ("train", "test")
  } | {"class_names": street_scenes.CLASS_NAMES}


# ------------------------------------------------------------------------------------ model


def build_model(config: ml_collections.ConfigDict) -> MaskFormer:
  """The MaskFormer of `config.model` over `config.data.num_classes` classes."""
  m = config.model
  return MaskFormer(
    num_classes=config.data.num_classes,
    backbone=TinyMultiScaleBackbone(tuple(m.widths), stem_stride=m.stem_stride),
    num_queries=m.num_queries,
    hidden_dim=m.hidden_dim,
    num_decoder_layers=m.num_decoder_layers,
    num_heads=m.num_heads,
    ffn_dim=m.ffn_dim,
    num_memory_scales=len(m.widths) - 1 or 1,
  )


def mask_shape(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """`(h, w)` of the mask logits: the image size over the finest backbone stride."""
  side = config.data.image_size // (2 * config.model.stem_stride)
  return side, side


def _all_layers(out: dict) -> tuple[jax.Array, jax.Array]:
  """`[L + 1, B, ...]` class and mask logits, auxiliary layers first, final layer last."""
  classes = jnp.concatenate([out["aux"]["class_logits"], out["class_logits"][None]])
  masks = jnp.concatenate([out["aux"]["mask_logits"], out["mask_logits"][None]])
  return classes, masks


def cosine_learning_rate(
  step: jax.Array, base: jax.Array, warmup: jax.Array, total: jax.Array
) -> jax.Array:
  """Linear warm-up from 0 then cosine decay to 0 (`optax.warmup_cosine_decay_schedule`).

  All arguments are traced scalars, so one compiled step serves every phase.
  """
  step = step.astype(jnp.float32)
  warm = base * step / jnp.maximum(warmup, 1.0)
  progress = jnp.clip((step - warmup) / jnp.maximum(total - warmup, 1.0), 0.0, 1.0)
  return jnp.where(step < warmup, warm, 0.5 * base * (1.0 + jnp.cos(jnp.pi * progress)))


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW whose learning rate is set by the step (`optax.inject_hyperparams`); decay on kernels."""
  wd = config_checks.check_float(config, "optim.weight_decay", 0.0)
  return optax.inject_hyperparams(optax.adamw)(
    learning_rate=0.0, weight_decay=wd, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
  )


def variant_controls(config: ml_collections.ConfigDict, variant: str, phase: str) -> dict:
  """Run-time switches of the one compiled step for a phase / variant (host numpy scalars).

  Returns:
    `{"use_hist", "use_pseudo"}` bools, `"overlap_rule"` and `"weighting"` int32 (indices into
    `core.OVERLAP_RULES` and `core.WEIGHTINGS`), `"kd_weight"`, `"learning_rate"`,
    `"warmup_steps"`, `"total_steps"` float32.
  """
  spec = VARIANTS[variant] if phase == "step1" else dict(pseudo=False, distill=False)
  kd_weight = float(config.method.kd_weight) if spec["distill"] else 0.0
  weighting = spec.get("weighting", config.method.weighting)
  rule = spec.get("overlap_rule", config.method.overlap_rule)
  return {
    "use_hist": np.bool_(spec["pseudo"] or kd_weight > 0),
    "use_pseudo": np.bool_(spec["pseudo"]),
    "overlap_rule": np.int32(core.OVERLAP_RULES.index(rule)),
    "weighting": np.int32(core.WEIGHTINGS.index(weighting)),
    "kd_weight": np.float32(kd_weight),
    "learning_rate": np.float32(config[phase].learning_rate),
    "warmup_steps": np.float32(config[phase].warmup_steps),
    "total_steps": np.float32(config[phase].steps),
  }


def incremental_loss(
  params: Any,
  batch: dict,
  rng: jax.Array,
  *,
  hist_params: Any,
  controls: Mapping[str, jax.Array],
  model: MaskFormer,
  old_class_mask: np.ndarray,
  criterion: Mapping[str, float],
  pseudo_settings: Mapping[str, Any],
  temperature: float,
) -> tuple[jax.Array, dict]:
  """Task loss on true (+ pseudo) labels plus weighted distillation (METHODS.md M4 steps 2-5).

  The historical forward pass runs only when `controls["use_hist"]` (a `lax.cond`); the
  variant switches are traced values, so step 0 and every step-1 variant share one compiled
  step.

  Args:
    params: the current model's parameters (the only ones differentiated).
    batch: `{"image" [B, S, S, 3], "target_classes" [B, T], "target_masks" [B, T, h, w],
      "target_valid" [B, T]}` true labels.
    rng: unused (deterministic model).
    hist_params: the frozen historical parameters, wrapped in `stop_gradient`.
    controls: see :func:`variant_controls`.
    model: the MaskFormer.
    old_class_mask: bool `[C]`.
    criterion: `w_class`, `w_bce`, `w_dice`, `no_object_weight` of `set_criterion_loss`.
    pseudo_settings: keyword arguments of `core.old_class_pseudo_labels` except
      `overlap_rule` (chosen by `controls["overlap_rule"]`).
    temperature: distillation temperature.

  Returns:
    `(loss, metrics)`: loss = set-criterion loss over all decoder layers + `kd_weight` x
    distillation (final layer); metrics add `kd`, `num_pseudo` (pseudo labels per image),
    `pseudo_dropped` (pseudo labels that did not fit the `T` target slots, per image) and
    `pseudo_on_true` (fraction of true-mask pixels that a pseudo mask also claims).
  """
  del rng
  images = steps.images_to_float(batch["image"])
  classes, masks, valid = batch["target_classes"], batch["target_masks"], batch["target_valid"]
  cur_classes, cur_masks = _all_layers(model.apply({"params": params}, images, train=True))
  frozen = jax.lax.stop_gradient(hist_params)

  def historical(_):
    out = model.apply({"params": frozen}, images)
    return out["class_logits"], out["mask_logits"]

  def skipped(_):
    return jnp.zeros_like(cur_classes[-1]), jnp.zeros_like(cur_masks[-1])

  hist_classes, hist_masks = jax.lax.stop_gradient(
    jax.lax.cond(controls["use_hist"], historical, skipped, None)
  )
  by_rule = [
    jax.vmap(
      functools.partial(
        core.old_class_pseudo_labels,
        old_class_mask=old_class_mask,
        overlap_rule=rule,
        **pseudo_settings,
      )
    )(hist_classes, hist_masks, masks, valid)
    for rule in core.OVERLAP_RULES
  ]
  p_masks, p_classes, p_valid = (
    jnp.stack(per_rule)[controls["overlap_rule"]] for per_rule in zip(*by_rule, strict=True)
  )
  p_valid = p_valid & controls["use_pseudo"]
  true_pixels = jnp.any(masks & valid[..., None, None], axis=1)
  pseudo_pixels = jnp.any(p_masks & p_valid[..., None, None], axis=1)
  pseudo_on_true = jnp.sum(true_pixels & pseudo_pixels) / jnp.maximum(jnp.sum(true_pixels), 1)
  _, scores = jax.vmap(core.query_class_confidence)(hist_classes)
  slots = classes.shape[1]

  def merge(*args):
    return core.merge_targets(*args[:6], max_targets=slots, pseudo_scores=args[6])

  classes, masks, valid, dropped = jax.vmap(merge)(
    classes, masks, valid, p_classes, p_masks, p_valid, scores
  )
  kd_by_weighting = jnp.stack(
    [
      jnp.mean(
        jax.vmap(
          functools.partial(
            core.distillation_loss,
            old_class_mask=old_class_mask,
            weighting=weighting,
            temperature=temperature,
          )
        )(cur_classes[-1], hist_classes)
      )
      for weighting in core.WEIGHTINGS
    ]
  )
  kd = jnp.where(controls["use_hist"], kd_by_weighting[controls["weighting"]], 0.0)
  task, task_metrics = mask_matching.set_criterion_loss(
    cur_classes, cur_masks, classes, masks, valid, **criterion
  )
  metrics = {
    **task_metrics,
    "kd": kd,
    "num_pseudo": jnp.mean(jnp.sum(p_valid, -1)),
    "pseudo_dropped": jnp.mean(dropped),
    "pseudo_on_true": pseudo_on_true,
  }
  return task + controls["kd_weight"] * kd, metrics


def fine_tune_step(
  train_state: state.TrainState,
  hist_params: Any,
  controls: Mapping[str, jax.Array],
  batch: dict,
  rng: jax.Array,
  *,
  loss_fn,
  tx,
) -> tuple[state.TrainState, dict]:
  """`steps.train_step` with the frozen historical parameters passed in (not differentiated).

  The learning rate of the `inject_hyperparams` optimizer is set from `controls` and the step.
  """
  lr = cosine_learning_rate(
    train_state.step,
    controls["learning_rate"],
    controls["warmup_steps"],
    controls["total_steps"],
  )
  opt_state = train_state.opt_state._replace(
    hyperparams={**train_state.opt_state.hyperparams, "learning_rate": lr}
  )
  train_state = train_state.replace(opt_state=opt_state)
  loss = functools.partial(loss_fn, hist_params=hist_params, controls=controls)
  new_state, metrics = steps.train_step(train_state, batch, rng, loss_fn=loss, tx=tx)
  return new_state, {**metrics, "learning_rate": lr}


def criterion_settings(config: ml_collections.ConfigDict) -> dict:
  """`set_criterion_loss` weights from `config.loss`."""
  return {k: float(config.loss[k]) for k in ("w_class", "w_bce", "w_dice", "no_object_weight")}


def compile_step(config: ml_collections.ConfigDict, model: MaskFormer, run: harness.Run):
  """`(step(state, hist, controls, batch, rng), tx)`: the one jitted step of all phases."""
  pseudo = pseudo_label_settings(config, "method")
  del pseudo["overlap_rule"]
  tx = make_optimizer(config)
  loss_fn = functools.partial(
    incremental_loss,
    model=model,
    old_class_mask=core.check_class_split(
      list(config.data.old_classes), list(config.data.new_classes), config.data.num_classes
    ),
    criterion=criterion_settings(config),
    pseudo_settings=pseudo,
    temperature=config.method.temperature,
  )
  rep = parallel.replicated(run.mesh)
  step = jax.jit(
    functools.partial(fine_tune_step, loss_fn=loss_fn, tx=tx),
    donate_argnums=0,
    out_shardings=(rep, rep),
  )
  return step, tx


def train_phase(
  config: ml_collections.ConfigDict,
  run: harness.Run,
  compiled: tuple[Any, optax.GradientTransformation],
  init: Any,
  hist_params: Any,
  targets: Mapping[str, np.ndarray],
  *,
  name: str,
  phase: str,
  variant: str = "naive",
) -> Any:
  """Trains one phase from `init`; resumes from `<workdir>/<name>_checkpoints`. Returns params.

  Args:
    config: the experiment config; `config.<phase>` gives steps and learning rate.
    run: the run context.
    compiled: :func:`compile_step`'s output.
    init: initial parameters.
    hist_params: frozen historical parameters (used only by variants that need them).
    targets: padded targets (:func:`panoptic_targets`).
    name: checkpoint and metric tag of the phase.
    phase: `step0` or `step1`.
    variant: a key of `VARIANTS` (step 1).

  Returns:
    the trained parameters.
  """
  mask_matching.check_num_targets(targets["target_valid"].sum(1), config.model.num_queries)
  parallel.check_batch_divisible(config.train.batch_size, run.mesh, "train.batch_size")
  step, tx = compiled
  # Host copies, so that the donated state never shares a buffer with the historical params.
  init, hist_params = jax.device_get((init, hist_params))
  train_state = parallel.replicate(state.create_train_state(init, tx), run.mesh)
  checkpointer = run.checkpointer(f"{name}_checkpoints")
  train_state, _ = loop.restore_or_init(checkpointer, train_state)
  hist = parallel.replicate(hist_params, run.mesh)
  controls = parallel.replicate(variant_controls(config, variant, phase), run.mesh)

  def step_fn(s, batch, rng):
    return step(s, hist, controls, batch, rng)

  sampler = samplers.RandomSampler(len(targets["image"]), config.train.batch_size, config.seed)
  batch_fn = harness.sampled_batch_fn(dict(targets), sampler, run.mesh, TARGET_KEYS)
  train_state = loop.train_loop(
    train_state,
    step_fn,
    batch_fn,
    jax.random.fold_in(jax.random.key(config.seed), 1),
    num_steps=config[phase].steps,
    checkpointer=checkpointer,
    checkpoint_every=config.train.checkpoint_every,
    log_every=config.train.log_every,
    writer=run.writer,
    examples_per_step=config.train.batch_size,
    name=name,
  )
  checkpointer.close()
  return jax.device_get(train_state.params)


# --------------------------------------------------------------------------------- evaluation


def predict_panoptic(
  params: Any, images: jax.Array, *, model: MaskFormer, thing_mask: np.ndarray, inference: dict
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Panoptic segmentation at image resolution (METHODS.md M4 step 6).

  Mask logits are upsampled bilinearly to the image size, then Mask2Former's panoptic
  inference runs per image.

  Returns:
    `(segment_map [B, S, S] int32, segment_classes [B, Q] int32, segment_valid [B, Q] bool)`.
  """
  out = model.apply({"params": params}, steps.images_to_float(images))
  b, q = out["mask_logits"].shape[:2]
  size = images.shape[1:3]
  masks = jax.image.resize(out["mask_logits"], (b, q) + tuple(size), method="bilinear")
  infer = functools.partial(mask_matching.panoptic_inference, thing_mask=thing_mask, **inference)
  return jax.vmap(infer)(out["class_logits"], masks)


def evaluate_panoptic(
  predict: Any, params: Any, arrays: Mapping[str, np.ndarray], categories: dict, batch_size: int
) -> tuple[pq_metrics.PanopticQuality, np.ndarray, list[dict]]:
  """PQ accumulator over a split, plus the predicted maps and segment tables per image."""
  metric = pq_metrics.PanopticQuality(categories)
  maps, tables = [], []
  for number, batch in enumerate(harness.padded_batches(arrays, batch_size, ["image"])):
    start = number * batch_size
    seg_map, seg_classes, seg_valid = jax.device_get(predict(params, batch["image"]))
    for j in np.flatnonzero(batch["valid"]):
      i = start + j
      table = pq_metrics.segments_from_inference(seg_classes[j], seg_valid[j])
      metric.update(seg_map[j], table, arrays["panoptic"][i], ground_truth_segments(arrays, i))
      maps.append(seg_map[j])
      tables.append(table)
  return metric, np.stack(maps), tables


def pq_summary(metric: pq_metrics.PanopticQuality, old: Sequence[int], new: Sequence[int]) -> dict:
  """`{old|new|all: {pq, sq, rq}}` in points (x100), plus per-class PQ."""
  out = {}
  for group, classes in (("old", old), ("new", new), ("all", None)):
    scores = metric.compute(classes)
    out[group] = {k: 100.0 * float(np.nan_to_num(scores["all"][k])) for k in ("pq", "sq", "rq")}
  per_class = metric.compute()["per_class"]
  out["per_class_pq"] = {int(c): 100.0 * v["pq"] for c, v in per_class.items()}
  return out


# ------------------------------------------------------------------------------------- report


def panoptic_rgb(segment_map: np.ndarray, table: Mapping[int, int], num_classes: int) -> np.ndarray:
  """`[H, W]` segment ids -> `[H, W, 3]` colours: class colour, instances shaded; void black."""
  palette = report.class_palette(num_classes)
  rgb = np.zeros(segment_map.shape + (3,), np.float32)
  for rank, (segment, category) in enumerate(sorted(table.items())):
    rgb[segment_map == segment] = palette[category] * (1.0 - 0.18 * (rank % 4))
  return rgb


def _overlay_rows(test, before, results, variants, num_classes, count):
  rows = []
  for i in range(min(count, len(test["image"]))):
    gt = ground_truth_segments(test, i)
    panels = [
      test["image"][i],
      panoptic_rgb(test["panoptic"][i], {s: c for s, (c, _) in gt.items()}, num_classes),
      panoptic_rgb(before["maps"][i], before["tables"][i], num_classes),
    ]
    panels += [
      panoptic_rgb(results[v]["maps"][i], results[v]["tables"][i], num_classes) for v in variants
    ]
    rows.append((f"test {i}: image | truth | step 0 | " + " | ".join(variants), panels))
  return rows


def check_bar(results: Mapping[str, dict], before_old: float, variant: str = "method") -> dict:
  """The issue's bar for a variant: forgetting <= forgetting(naive) / 2, PQ_new within 5 points.

  The ``*_method`` keys hold `variant`'s numbers.
  """
  f_naive = before_old - results["naive"]["old"]["pq"]
  f_method = before_old - results[variant]["old"]["pq"]
  gap = results["naive"]["new"]["pq"] - results[variant]["new"]["pq"]
  return {
    "forgetting_naive": f_naive,
    "forgetting_method": f_method,
    "forgetting_halved": bool(f_method <= 0.5 * f_naive),
    "new_pq_gap_to_naive": gap,
    "new_pq_within_5": bool(gap <= 5.0),
  }


# ---------------------------------------------------------------------------------- experiment


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Step 0, every step-1 variant, PQ before/after, forgetting, plots and report (M4)."""
  validate(config)
  run = harness.start_run(workdir)
  data = load_panoptic_data(config)
  d = config.data
  old, new = list(d.old_classes), list(d.new_classes)
  shape = mask_shape(config)
  model = build_model(config)
  step0_images, step1_pool = split_train(data["train"], d.step0_fraction, config.seed)
  step0_targets = panoptic_targets(step0_images, old, shape, d.max_segments)
  has_new = panoptic_targets(step1_pool, new, shape, d.max_segments)["target_valid"].any(1)
  step1_images = subset(step1_pool, has_new)
  if not has_new.any():
    raise ValueError("no step-1 image shows a new class: use more images or other new_classes")
  step1_targets = {
    "new": panoptic_targets(step1_images, new, shape, d.max_segments),
    "all": panoptic_targets(step1_images, old + new, shape, d.max_segments),
  }

  init = harness.init_params(model, jax.random.key(config.seed), data["train"]["image"][0])
  compiled = compile_step(config, model, run)
  hist_params = train_phase(
    config, run, compiled, init, init, step0_targets, name="step0", phase="step0"
  )

  categories = {c: c in set(d.thing_classes) for c in range(d.num_classes)}
  thing_mask = np.array([categories[c] for c in range(d.num_classes)])
  predict = jax.jit(
    functools.partial(
      predict_panoptic, model=model, thing_mask=thing_mask, inference=dict(config.inference)
    )
  )
  bs = config.train.eval_batch_size

  def evaluate(params):
    metric, maps, tables = evaluate_panoptic(predict, params, data["test"], categories, bs)
    return {**pq_summary(metric, old, new), "maps": maps, "tables": tables}

  before = evaluate(hist_params)
  run.writer.write(0, {f"{g}_pq": before[g]["pq"] for g in ("old", "new", "all")}, phase="step0")
  results = {}
  for variant in config.variants:
    params = train_phase(
      config,
      run,
      compiled,
      hist_params,
      hist_params,
      step1_targets[VARIANTS[variant]["labels"]],
      name=f"step1_{variant}",
      phase="step1",
      variant=variant,
    )
    results[variant] = evaluate(params)
    results[variant]["forgetting"] = before["old"]["pq"] - results[variant]["old"]["pq"]
    run.writer.write(
      config.step1.steps,
      {f"{g}_pq": results[variant][g]["pq"] for g in ("old", "new", "all")},
      phase=f"step1_{variant}",
    )

  bars = {v: check_bar(results, before["old"]["pq"], v) for v in results if VARIANTS[v]["pseudo"]}
  bar = bars["method"]
  _write_report(config, run, data, before, results, bars)
  out = {
    "experiment": "incremental_panoptic",
    "time_s": run.elapsed(),
    "num_images": {"step0": len(step0_images["image"]), "step1": len(step1_images["image"])},
    "before": {g: before[g] for g in ("old", "new", "all")},
    "after": {
      v: {g: r[g] for g in ("old", "new", "all")} | {"forgetting": r["forgetting"]}
      for v, r in results.items()
    },
    "bar": bar,
    "bar_by_variant": bars,
    "rows": [
      harness.summary_row(
        "PQ_old after step 1 (points)",
        results["method"]["old"]["pq"],
        "naive fine-tuning",
        results["naive"]["old"]["pq"],
      ),
      harness.summary_row(
        "forgetting PQ_old(before) - PQ_old(after)",
        bar["forgetting_method"],
        "naive fine-tuning",
        bar["forgetting_naive"],
      ),
      harness.summary_row(
        "PQ_new after step 1 (points)",
        results["method"]["new"]["pq"],
        "naive fine-tuning",
        results["naive"]["new"]["pq"],
      ),
    ],
  }
  harness.write_summary(run.workdir, out)
  return out


def _write_report(config, run, data, before, results, bars) -> None:
  names = data["class_names"]
  k = config.data.num_classes
  variants = list(results)
  header = ["model", "PQ old", "SQ old", "RQ old", "PQ new", "SQ new", "RQ new", "PQ all"]
  header += ["forgetting"]

  def row(title, r, forgetting):
    return (
      [title]
      + [r[g][m] for g in ("old", "new") for m in ("pq", "sq", "rq")]
      + [
        r["all"]["pq"],
        forgetting,
      ]
    )

  main = [v for v in variants if v in ("naive", "method", "joint")]
  ablations = [v for v in variants if v not in ("naive", "joint")]
  rows = [row("step 0 (before)", before, 0.0)]
  rows += [row(VARIANT_TITLES[v], results[v], results[v]["forgetting"]) for v in main]
  ablation_rows = [row(VARIANT_TITLES[v], results[v], results[v]["forgetting"]) for v in ablations]
  per_class = [
    [names[c], "old" if c in config.data.old_classes else "new", before["per_class_pq"][c]]
    + [results[v]["per_class_pq"][c] for v in variants]
    for c in range(k)
  ]
  report.plot_bars(
    {"step 0": [before[g]["pq"] for g in ("old", "new", "all")]}
    | {v: [results[v][g]["pq"] for g in ("old", "new", "all")] for v in variants},
    ["PQ old", "PQ new", "PQ all"],
    "PQ (points)",
    run.plot_path("pq.png"),
  )
  report.plot_segmentation_rows(
    _overlay_rows(data["test"], before, results, variants, k, config.num_overlays),
    k,
    run.plot_path("overlays.png"),
  )
  bar = bars["method"]
  bar_rows = [
    [
      VARIANT_TITLES[v],
      b["forgetting_method"],
      "yes" if b["forgetting_halved"] else "NO",
      b["new_pq_gap_to_naive"],
      "yes" if b["new_pq_within_5"] else "NO",
    ]
    for v, b in bars.items()
  ]
  verdict = (
    f"Forgetting of naive fine-tuning: {bar['forgetting_naive']:.2f} points. This method: "
    f"forgetting {bar['forgetting_method']:.2f} (at most half: "
    f"{'yes' if bar['forgetting_halved'] else 'NO'}), new-class PQ gap to naive "
    f"{bar['new_pq_gap_to_naive']:.2f} points (within 5: "
    f"{'yes' if bar['new_pq_within_5'] else 'NO'}).\n\n"
    + report.markdown_table(
      ["variant", "forgetting", "at most half", "new PQ gap to naive", "within 5"], bar_rows
    )
  )
  report.write_report(
    run.workdir,
    f"Class-incremental panoptic fine-tuning (M4) on {config.data.name}",
    [
      (
        "Set-up",
        f"Old classes {[names[c] for c in config.data.old_classes]}, new classes "
        f"{[names[c] for c in config.data.new_classes]}. Step 0: {config.step0.steps} steps on "
        f"old-class labels; step 1: {config.step1.steps} steps on images labelled only for the "
        f"new classes. PQ/SQ/RQ in points on held-out, fully labelled test images.",
      ),
      ("PQ before and after step 1", report.markdown_table(header, rows)),
      ("Bar of the issue", verdict),
      ("Ablations", report.markdown_table(header, ablation_rows) if ablation_rows else "none"),
      (
        "Per-class PQ",
        report.markdown_table(["class", "split", "step 0"] + variants, per_class),
      ),
      ("Plots", "![pq](plots/pq.png)\n\n![overlays](plots/overlays.png)"),
    ],
  )
