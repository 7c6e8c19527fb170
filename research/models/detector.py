"""A small CenterNet-style detector: head, target encoding, loss and decoding.

The detection model of METHODS.md M5 (step 1 "load the detection model to train", step 6
"detection loss"). CenterNet (Zhou et al., "Objects as Points", 2019) conventions:

- Outputs live on the feature map of stride ``s``: per-class centre heatmap logits
  ``[B, h, w, K]``, box size ``(w, h)`` in feature-map cells ``[B, h, w, 2]`` and the sub-cell
  centre offset ``[B, h, w, 2]``.
- An object with box ``(x0, y0, x1, y1)`` in pixels has centre ``c = ((x0 + x1) / 2,
  (y0 + y1) / 2) / s``; its integer cell ``floor(c)`` is the heatmap peak (a Gaussian of radius
  ``gaussian_radius`` splatted with max), ``c - floor(c)`` the offset target and
  ``((x1 - x0) / s, (y1 - y0) / s)`` the size target.
- Loss: penalty-reduced focal loss (alpha=2, beta=4) over the heatmap, normalised by the
  number of objects, plus L1 size (weight 0.1) and L1 offset (weight 1) at object centres.
- Decoding: 3x3 max-pool NMS, top-K over all classes and cells.

Everything here is jit-compatible with fixed shapes (``N_max`` padded objects with a validity
mask, fixed ``K`` detections).

Backbones (:func:`resnet_detector`, ``model.backbone`` of ``research.models.resnet``):
``'small'`` is the configurable ResNet whose last stage already has the output stride (the
M5 detector: stride-1 stem and three stages, stride 4), used as is. The named ImageNet ResNets
(``'resnet18'``, ``'resnet50'``) end at stride 32, so a :class:`TopDownNeck` (FPN's top-down
pathway: 1x1 laterals, nearest-neighbour upsampling and sums, a 3x3 output convolution) merges
their four stage outputs into one map at the stride of their first stage, 4. The head, target
encoding, loss and decoding are the same for every backbone.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.models import conv, resnet

Array = jax.Array

# Heatmap bias initialisation of CenterNet: sigmoid(-2.19) ~= 0.1 prior.
HEATMAP_BIAS_INIT = -2.19


def _check_positive_int(name: str, value: Any) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{name}={value} is not allowed: {name} must be an int >= 1")


# --------------------------------------------------------------------------------------------
# Modules.


class TinyBackbone(nn.Module):
  """A tiny conv backbone with the interface the detector expects (for tests and demos).

  ``log2(stride)`` stride-2 3x3 convolutions with ReLU.

  Attributes:
    features: channels F of the feature map.
    stride: output stride, a power of two >= 1.
  """

  features: int = 16
  stride: int = 4

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> dict[str, Array]:
    """Maps images to the feature map and its spatial mean.

    Args:
      x: images ``[B, H, W, C]``.
      train: unused (no batch statistics here); part of the backbone interface.

    Returns:
      ``{'feature_map': [B, H/s, W/s, F], 'embedding': [B, F]}``.
    """
    del train  # No batch statistics in this backbone.
    _check_positive_int("stride", self.stride)
    if self.stride & (self.stride - 1):
      raise ValueError(f"stride={self.stride} is not allowed: stride must be a power of two")
    h = nn.relu(conv.Conv(self.features, (3, 3))(x))
    for _ in range(int(math.log2(self.stride))):
      h = nn.relu(conv.Conv(self.features, (3, 3), strides=(2, 2))(h))
    return {"feature_map": h, "embedding": jnp.mean(h, axis=(1, 2))}


class CenterNetHead(nn.Module):
  """CenterNet heads on a feature map: 3x3 conv + ReLU + 1x1 conv per output.

  Attributes:
    num_classes: number of object classes K.
    head_channels: hidden channels of each head.
    dtype: compute dtype (None: that of the inputs and parameters); the outputs are float32
      when it is given.
  """

  num_classes: int
  head_channels: int = 64
  dtype: Any = None

  @nn.compact
  def __call__(self, feature_map: Array) -> dict[str, Array]:
    """Applies the three heads.

    Args:
      feature_map: ``[B, h, w, F]``.

    Returns:
      ``{'heatmap': [B, h, w, K] logits, 'size': [B, h, w, 2], 'offset': [B, h, w, 2]}``.
    """
    _check_positive_int("num_classes", self.num_classes)

    d = self.dtype

    def head(name: str, out: int, bias_init=nn.initializers.zeros) -> Array:
      h = nn.relu(
        conv.Conv(self.head_channels, (3, 3), name=f"{name}_hidden", dtype=d)(feature_map)
      )
      y = conv.Conv(out, (1, 1), bias_init=bias_init, name=f"{name}_out", dtype=d)(h)
      return y if d is None else y.astype(jnp.float32)

    return {
      "heatmap": head("heatmap", self.num_classes, nn.initializers.constant(HEATMAP_BIAS_INIT)),
      "size": head("size", 2),
      "offset": head("offset", 2),
    }


class TopDownNeck(nn.Module):
  """FPN's top-down pathway (Lin et al., 2017) kept to its finest output: one stride-s map.

  Each stage output ``C_i`` (fine -> coarse) is projected to ``features`` channels by a 1x1
  lateral convolution; from the coarsest stage down, the running map is upsampled (nearest
  neighbour, to the next finer stage's size) and added to that stage's lateral; a 3x3
  convolution smooths the finest sum (FPN's output convolution, here only for ``P_2``).

  Attributes:
    features: channels of the laterals and of the output map.
    dtype: compute dtype (None: that of the inputs and parameters).
  """

  features: int = 64
  dtype: Any = None

  @nn.compact
  def __call__(self, stage_maps: Sequence[Array]) -> Array:
    """Merges the stage outputs top-down.

    Args:
      stage_maps: ``[B, H_i, W_i, C_i]`` stage outputs, fine -> coarse (``H_i`` non-increasing).

    Returns:
      ``[B, H_0, W_0, features]``, at the resolution of the first (finest) stage.
    """
    if not stage_maps:
      raise ValueError("stage_maps is empty: the neck needs at least one stage output")

    def lateral(i: int) -> Array:
      return conv.Conv(self.features, (1, 1), name=f"lateral_{i}", dtype=self.dtype)(stage_maps[i])

    y = lateral(len(stage_maps) - 1)
    for i in reversed(range(len(stage_maps) - 1)):
      shape = (*stage_maps[i].shape[:3], self.features)
      y = jax.image.resize(y, shape, "nearest") + lateral(i)
    return conv.Conv(self.features, (3, 3), name="output", dtype=self.dtype)(y)


class Detector(nn.Module):
  """Backbone (+ optional neck) + :class:`CenterNetHead`.

  Attributes:
    backbone: module with ``backbone(x, train) -> {'feature_map': [B, h, w, F], 'embedding':
      [B, D], ...}`` where ``h = H / stride``, ``w = W / stride`` (with a ``neck``: a
      ``'features'`` list of stage outputs and ``'embedding'``).
    num_classes: number of object classes K.
    stride: the output stride of the feature map (used to check shapes; pass it to decoding).
    head_channels: hidden channels of each head.
    neck: None (the head reads the backbone's ``feature_map``) or a module mapping the
      backbone's ``features`` (stage outputs, fine -> coarse) to the ``[B, h, w, F]`` map, e.g.
      :class:`TopDownNeck`.
    dtype: compute dtype of the head (None: that of the feature map and parameters); the head
      outputs are float32 when it is given.
  """

  backbone: nn.Module
  num_classes: int
  stride: int
  head_channels: int = 64
  neck: nn.Module | None = None
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> dict[str, Array]:
    """Runs backbone and head.

    Args:
      x: images ``[B, H, W, C]``.
      train: passed on to the backbone.

    Returns:
      The :class:`CenterNetHead` outputs plus the backbone's ``embedding [B, D]`` and
      ``pooled [B, F]`` (the backbone's own ``pooled`` output, e.g. ``ResNet``'s, else the
      spatial mean of the feature map): the pooled features M5 matches by optimal transport.
    """
    _check_positive_int("stride", self.stride)
    features = self.backbone(x, train)
    if self.neck is None:
      feature_map = features["feature_map"]
    else:
      feature_map = self.neck(features["features"])
    expected = (x.shape[1] // self.stride, x.shape[2] // self.stride)
    if feature_map.shape[1:3] != expected:
      raise ValueError(
        f"feature_map has spatial shape {feature_map.shape[1:3]}: with images {x.shape[1:3]} "
        f"and stride={self.stride} it must be {expected}"
      )
    head = CenterNetHead(self.num_classes, self.head_channels, self.dtype, name="head")
    outputs = head(feature_map)
    pooled = features.get("pooled", jnp.mean(feature_map, axis=(1, 2)))
    return {**outputs, "embedding": features["embedding"], "pooled": pooled}


def resnet_detector(
  num_classes: int,
  stride: int,
  head_channels: int = 64,
  *,
  backbone: str = "small",
  dtype: Any = None,
  stage_sizes: Sequence[int] = (2, 2, 2),
  widths: Sequence[int] = (16, 32, 64),
  embedding_dim: int = 64,
  stem_strides: int = 1,
  neck_channels: int = 64,
) -> Detector:
  """A :class:`Detector` on a ``research.models.resnet.ResNet`` backbone chosen by name.

  ``'small'``: the head reads the last stage output of ``ResNet(0, stage_sizes, widths,
  embedding_dim, stem_strides)`` (its stride, ``stem_strides * 2**(len(stage_sizes) - 1)``,
  must be ``stride``); ``neck_channels`` is ignored. ``'resnet18'`` / ``'resnet50'``: a
  :class:`TopDownNeck` of ``neck_channels`` merges the four stage outputs (strides 4-32) into
  the stride-4 map, so ``stride`` must be 4; ``stage_sizes``, ``widths`` and ``stem_strides``
  are ignored.

  Parameters are ``{'backbone': ResNet's, 'neck': (named backbones only), 'head': ...}``, so
  ``pretrained.restore_params(directory, params, target='backbone')`` initialises the
  backbone from a checkpoint of a headless ``ResNet`` with the same ``backbone`` and
  ``embedding_dim``.

  Args:
    num_classes: number of object classes K.
    stride: output stride of the detector (input pixels per heatmap cell).
    head_channels: hidden channels of each head.
    backbone: one of ``resnet.BACKBONES``.
    dtype: compute dtype of backbone, neck and head (None: float32); parameters stay float32
      and the head outputs, ``embedding`` and ``pooled`` are float32.
    stage_sizes: blocks per stage of the ``'small'`` backbone.
    widths: channels per stage of the ``'small'`` backbone.
    embedding_dim: size of the backbone's embedding.
    stem_strides: stem stride of the ``'small'`` backbone.
    neck_channels: channels of the neck (named backbones).

  Raises:
    ValueError: ``backbone`` is not one of ``resnet.BACKBONES`` (naming the field, the value
      and the allowed names), or a named backbone with ``stride != 4``.
  """
  resnet.check_backbone(backbone)
  net = resnet.ResNet(
    0,
    tuple(stage_sizes),
    tuple(widths),
    embedding_dim,
    stem_strides,
    backbone=backbone,
    dtype=dtype,
  )
  if backbone == "small":
    return Detector(net, num_classes, stride, head_channels, dtype=dtype)
  if stride != resnet.NAMED_STRIDES[0]:
    raise ValueError(
      f"stride={stride} is not allowed with backbone={backbone!r}: its neck ends at its first "
      f"stage, stride {resnet.NAMED_STRIDES[0]}"
    )
  neck = TopDownNeck(neck_channels, dtype=dtype)
  return Detector(net, num_classes, stride, head_channels, neck=neck, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Target encoding.


def gaussian_radius(height: Array, width: Array, min_overlap: float = 0.7) -> Array:
  """CenterNet's Gaussian radius for a box of ``height x width`` (feature-map cells).

  The smallest of the three CornerNet cases, exactly as CenterNet's reference
  ``gaussian_radius`` computes it (including its ``(b + sqrt(b^2 - 4ac)) / 2`` roots).

  Args:
    height: box heights, any shape.
    width: box widths, same shape.
    min_overlap: IoU a box with corners shifted by the radius keeps.

  Returns:
    Radii, same shape (float).
  """
  b1 = height + width
  c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
  r1 = (b1 + jnp.sqrt(b1**2 - 4 * c1)) / 2
  b2 = 2 * (height + width)
  c2 = (1 - min_overlap) * width * height
  r2 = (b2 + jnp.sqrt(b2**2 - 16 * c2)) / 2
  a3 = 4 * min_overlap
  b3 = -2 * min_overlap * (height + width)
  c3 = (min_overlap - 1) * width * height
  r3 = (b3 + jnp.sqrt(b3**2 - 4 * a3 * c3)) / 2
  return jnp.minimum(jnp.minimum(r1, r2), r3)


def encode_targets(
  boxes: Array,
  classes: Array,
  valid: Array,
  *,
  num_classes: int,
  output_size: tuple[int, int],
  stride: int,
  min_overlap: float = 0.7,
) -> dict[str, Array]:
  """CenterNet training targets for one image (``jax.vmap`` it for a batch).

  Objects with ``valid == False`` or an empty box are ignored. The heatmap of class ``k`` is the
  element-wise max over its objects of ``exp(-(dx^2 + dy^2) / (2 sigma^2))`` on the
  ``(2r + 1)^2`` window around the integer centre, ``r = max(0, floor(gaussian_radius(ceil(h),
  ceil(w))))`` for the box's size in cells,
  ``sigma = (2r + 1) / 6`` (CenterNet's ``draw_umich_gaussian``); centres outside the map are
  clipped onto it.

  Args:
    boxes: ``[N_max, 4]`` ``(x0, y0, x1, y1)`` in input pixels.
    classes: ``[N_max]`` int class ids in ``[0, num_classes)``.
    valid: ``[N_max]`` bool, which rows are real objects.
    num_classes: K.
    output_size: ``(h, w)`` of the feature map.
    stride: input pixels per feature-map cell.
    min_overlap: see :func:`gaussian_radius`.

  Returns:
    ``heatmap [h, w, K]``, ``size [N_max, 2]`` (w, h in cells), ``offset [N_max, 2]``
    (x, y in cells), ``indices [N_max]`` (int32 flat cell index ``y * w + x``) and
    ``mask [N_max]`` (float32, 1 for objects that count).
  """
  _check_positive_int("num_classes", num_classes)
  _check_positive_int("stride", stride)
  h, w = output_size
  _check_positive_int("output_size[0]", h)
  _check_positive_int("output_size[1]", w)
  if boxes.ndim != 2 or boxes.shape[-1] != 4:
    raise ValueError(f"boxes has shape {boxes.shape}: it must be [N_max, 4]")
  if classes.shape != boxes.shape[:1] or valid.shape != boxes.shape[:1]:
    raise ValueError(
      f"classes {classes.shape} and valid {valid.shape} must both have shape {boxes.shape[:1]}"
    )
  boxes = jnp.asarray(boxes, jnp.float32) / stride
  box_w = boxes[:, 2] - boxes[:, 0]
  box_h = boxes[:, 3] - boxes[:, 1]
  mask = jnp.asarray(valid, bool) & (box_w > 0) & (box_h > 0)
  centre = jnp.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], -1)
  cell = jnp.floor(centre)
  cell = jnp.stack([jnp.clip(cell[:, 0], 0, w - 1), jnp.clip(cell[:, 1], 0, h - 1)], -1)
  radius = gaussian_radius(jnp.ceil(box_h), jnp.ceil(box_w), min_overlap)
  radius = jnp.maximum(0.0, jnp.floor(radius))
  sigma = (2 * radius + 1) / 6

  dx = jnp.arange(w, dtype=jnp.float32)[None, None, :] - cell[:, 0, None, None]
  dy = jnp.arange(h, dtype=jnp.float32)[None, :, None] - cell[:, 1, None, None]
  r = radius[:, None, None]
  window = (jnp.abs(dx) <= r) & (jnp.abs(dy) <= r) & mask[:, None, None]
  gauss = jnp.exp(-(dx**2 + dy**2) / (2 * sigma[:, None, None] ** 2))
  gauss = jnp.where(window, gauss, 0.0)  # [N_max, h, w]
  segment = jnp.where(mask, jnp.asarray(classes, jnp.int32), num_classes)
  heatmap = jax.ops.segment_max(gauss, segment, num_segments=num_classes + 1)[:num_classes]
  heatmap = jnp.maximum(heatmap, 0.0).transpose(1, 2, 0)

  maskf = mask.astype(jnp.float32)
  return {
    "heatmap": heatmap,
    "size": jnp.stack([box_w, box_h], -1) * maskf[:, None],
    "offset": (centre - cell) * maskf[:, None],
    "indices": (cell[:, 1] * w + cell[:, 0]).astype(jnp.int32) * mask,
    "mask": maskf,
  }


def encode_batch_targets(boxes: Array, classes: Array, valid: Array, **options) -> dict[str, Array]:
  """:func:`encode_targets` over a batch: inputs ``[B, N_max, ...]``, outputs ``[B, ...]``.

  Args:
    boxes: ``[B, N_max, 4]``.
    classes: ``[B, N_max]``.
    valid: ``[B, N_max]``.
    **options: the keyword arguments of :func:`encode_targets` (``num_classes``,
      ``output_size``, ``stride``, ``min_overlap``), the same for every image.
  """
  if boxes.ndim != 3:
    raise ValueError(f"boxes has shape {boxes.shape}: it must be [B, N_max, 4]")
  return jax.vmap(functools.partial(encode_targets, **options))(boxes, classes, valid)


# --------------------------------------------------------------------------------------------
# Loss.


def focal_loss(logits: Array, heatmap: Array) -> tuple[Array, Array]:
  """CenterNet's penalty-reduced pixel-wise focal loss (alpha=2, beta=4), summed.

  ``-sum[ (1-p)^2 log p at gt == 1 ; (1-gt)^4 p^2 log(1-p) elsewhere ]`` with
  ``p = sigmoid(logits)`` (log-probabilities from ``log_sigmoid`` for stability).

  Args:
    logits: ``[B, h, w, K]`` heatmap logits.
    heatmap: ``[B, h, w, K]`` Gaussian targets in [0, 1], exactly 1 at object centres.

  Returns:
    ``(loss_sum, num_positives)``; divide by ``max(num_positives, 1)``.
  """
  prob = jax.nn.sigmoid(logits)
  log_p = jax.nn.log_sigmoid(logits)
  log_not_p = jax.nn.log_sigmoid(-logits)
  positive = heatmap >= 1.0
  pos = jnp.where(positive, (1 - prob) ** 2 * log_p, 0.0)
  neg = jnp.where(positive, 0.0, (1 - heatmap) ** 4 * prob**2 * log_not_p)
  return -jnp.sum(pos + neg), jnp.sum(positive).astype(logits.dtype)


def _gather_at(maps: Array, indices: Array) -> Array:
  """``maps [B, h, w, C]``, ``indices [B, N]`` flat cells -> ``[B, N, C]``."""
  flat = maps.reshape(maps.shape[0], -1, maps.shape[-1])
  return jnp.take_along_axis(flat, indices[..., None], axis=1)


def detection_loss(
  outputs: dict[str, Array],
  targets: dict[str, Array],
  *,
  size_weight: float = 0.1,
  offset_weight: float = 1.0,
) -> tuple[Array, dict[str, Array]]:
  """CenterNet detection loss (the task loss of METHODS.md M5 step 6).

  ``focal / max(num_centres, 1) + size_weight * L1_size + offset_weight * L1_offset``; the L1
  terms are means over the ``2 * num_objects`` coordinates of valid objects (CenterNet's
  ``RegL1Loss``), 0 when an image batch has no objects.

  Args:
    outputs: ``heatmap [B, h, w, K]`` logits, ``size [B, h, w, 2]``, ``offset [B, h, w, 2]``.
    targets: batched :func:`encode_targets` output (``heatmap [B, h, w, K]``, ``size``,
      ``offset [B, N, 2]``, ``indices [B, N]``, ``mask [B, N]``).
    size_weight: weight of the size loss.
    offset_weight: weight of the offset loss.

  Returns:
    ``(loss, metrics)`` with ``loss``, ``heatmap_loss``, ``size_loss``, ``offset_loss`` and
    ``num_objects``.
  """
  if outputs["heatmap"].shape != targets["heatmap"].shape:
    raise ValueError(
      f"outputs['heatmap'] has shape {outputs['heatmap'].shape}: it must match "
      f"targets['heatmap'] {targets['heatmap'].shape}"
    )
  focal_sum, num_pos = focal_loss(outputs["heatmap"], targets["heatmap"])
  heatmap_loss = focal_sum / jnp.maximum(num_pos, 1.0)
  mask = targets["mask"][..., None]
  denom = jnp.maximum(2.0 * jnp.sum(targets["mask"]), 1.0)

  def l1(name: str) -> Array:
    pred = _gather_at(outputs[name], targets["indices"])
    return jnp.sum(jnp.abs(pred - targets[name]) * mask) / denom

  size_loss = l1("size")
  offset_loss = l1("offset")
  loss = heatmap_loss + size_weight * size_loss + offset_weight * offset_loss
  return loss, {
    "loss": loss,
    "heatmap_loss": heatmap_loss,
    "size_loss": size_loss,
    "offset_loss": offset_loss,
    "num_objects": jnp.sum(targets["mask"]),
  }


# --------------------------------------------------------------------------------------------
# Decoding.


def decode_detections(
  outputs: dict[str, Array], *, stride: int, top_k: int = 100
) -> dict[str, Array]:
  """Fixed-size detections from the head outputs (CenterNet ``ctdet_decode``).

  Heatmap probabilities are kept only where they equal their 3x3 max-pool (the NMS), then the
  ``top_k`` scores over all cells and classes are taken; box = centre ``(cell + offset) * s``
  +- half the predicted size ``* s`` (negative predicted sizes are clipped to 0, so boxes
  always have ``x1 >= x0`` and ``y1 >= y0``).

  Args:
    outputs: ``heatmap [B, h, w, K]`` logits, ``size [B, h, w, 2]``, ``offset [B, h, w, 2]``.
    stride: input pixels per feature-map cell.
    top_k: number of detections per image (<= h * w * K).

  Returns:
    ``boxes [B, top_k, 4]`` (x0, y0, x1, y1 pixels), ``scores [B, top_k]`` (descending) and
    ``classes [B, top_k]`` (int32).
  """
  _check_positive_int("stride", stride)
  _check_positive_int("top_k", top_k)
  batch, h, w, k = outputs["heatmap"].shape
  if top_k > h * w * k:
    raise ValueError(f"top_k={top_k} is not allowed: top_k must be <= h * w * K = {h * w * k}")
  heat = jax.nn.sigmoid(outputs["heatmap"])
  pooled = jax.lax.reduce_window(heat, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 1, 1, 1), "SAME")
  heat = jnp.where(heat == pooled, heat, 0.0)
  scores, flat = jax.lax.top_k(heat.reshape(batch, -1), top_k)
  cls = flat % k
  cells = flat // k
  size = jnp.maximum(_gather_at(outputs["size"], cells), 0.0)  # A negative size is empty.
  offset = _gather_at(outputs["offset"], cells)
  cx = (cells % w + offset[..., 0]) * stride
  cy = (cells // w + offset[..., 1]) * stride
  half_w = size[..., 0] * stride / 2
  half_h = size[..., 1] * stride / 2
  boxes = jnp.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], -1)
  return {"boxes": boxes, "scores": scores, "classes": cls.astype(jnp.int32)}
