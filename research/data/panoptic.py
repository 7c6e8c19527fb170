"""Panoptic records as segment tables, and padded mask-classification targets from them.

A split in the *segment-table form* is ``{"image" [N, S, S, 3] uint8, "panoptic" [N, S, S] int32
segment ids (0 = void), "segment_ids" / "segment_classes" [N, G] int, "segment_crowd" /
"segment_valid" [N, G] bool}``, built from the embedded street scenes
(:func:`street_panoptic_arrays`) or from COCO panoptic records (:func:`coco_panoptic_arrays`).
Training targets are padded to ``T`` segments at the mask-logit resolution
(:func:`panoptic_targets`): the input of Mask2Former-style set losses (METHODS.md M4). Images
with no segment of the kept classes get all-invalid targets; crowd segments are never targets.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from research.data import catalogue, embedded, street_scenes
from research.metrics import panoptic as pq_metrics

TARGET_KEYS = ("image", "target_classes", "target_masks", "target_valid")


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


def subset(arrays: Mapping[str, np.ndarray], index: np.ndarray) -> dict:
  """The examples selected by a bool or int index."""
  return {k: v[index] for k, v in arrays.items()}


def load_panoptic_data(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Train and test splits of `config.data` (street scenes or COCO panoptic) as segment tables.

  Returns:
    `{"train": split, "test": split, "class_names": (C names)}`, each split in the
    segment-table form (module docstring); COCO's test split is its validation split.
  """
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
