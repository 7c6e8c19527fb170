"""Panoptic records as segment tables, and padded mask-classification targets from them.

A split in the *segment-table form* is ``{"image" [N, S, S, 3] uint8, "panoptic" [N, S, S] int32
segment ids (0 = void), "segment_ids" / "segment_classes" [N, G] int, "segment_crowd" /
"segment_valid" [N, G] bool, "segment_truncated" [N] int}``, built one record at a time from the
embedded street scenes (:func:`street_panoptic_arrays`) or from COCO panoptic records
(:func:`coco_panoptic_arrays`). An image with more than ``G`` segments keeps its ``G`` largest in
its table; ``segment_truncated`` counts the others (their pixels are covered by no training
target). Training targets are padded to ``T`` segments at the mask-logit resolution
(:func:`panoptic_targets`, built image by image): the input of Mask2Former-style set losses
(METHODS.md M4). Images with no segment of the kept classes get all-invalid targets; crowd
segments are never targets. Evaluation uses :class:`GroundTruth`: each test image's label map at
its original resolution with its full segment table (nothing truncated, nothing resized).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from research.data import catalogue, embedded, street_scenes
from research.metrics import panoptic as pq_metrics

TARGET_KEYS = ("image", "target_classes", "target_masks", "target_valid")


def _empty_tables(n: int, image_size: int, max_segments: int) -> dict:
  return {
    "image": np.zeros((n, image_size, image_size, 3), np.uint8),
    "panoptic": np.zeros((n, image_size, image_size), np.int32),
    "segment_ids": np.zeros((n, max_segments), np.int64),
    "segment_classes": np.zeros((n, max_segments), np.int64),
    "segment_crowd": np.zeros((n, max_segments), bool),
    "segment_valid": np.zeros((n, max_segments), bool),
    "segment_truncated": np.zeros((n,), np.int64),
  }


def _fill_table(out: dict, i: int, ids_map: np.ndarray, table: Mapping[int, tuple[int, bool]]):
  """Puts one image's segments (largest first, at most `G`) into row `i` of the tables."""
  present, areas = np.unique(ids_map, return_counts=True)
  keep = present != pq_metrics.VOID
  present, areas = present[keep], areas[keep]
  order = np.argsort(-areas, kind="stable")
  g = out["segment_ids"].shape[1]
  out["segment_truncated"][i] = max(0, len(present) - g)
  for slot, s in enumerate(present[order][:g]):
    out["segment_ids"][i, slot] = s
    out["segment_classes"][i, slot], out["segment_crowd"][i, slot] = table[int(s)]
    out["segment_valid"][i, slot] = True


def street_table(panoptic_map: np.ndarray) -> dict[int, tuple[int, bool]]:
  """`{segment id: (class, iscrowd)}` of a street-scene map (ids encode their class)."""
  ids = [int(s) for s in np.unique(panoptic_map) if s != pq_metrics.VOID]
  return {s: (int(street_scenes.panoptic_category(np.int64(s))), False) for s in ids}


def street_panoptic_arrays(arrays: Mapping[str, np.ndarray], max_segments: int) -> dict:
  """Street scenes (`(class + 1) * 1000 + instance` ids) in the segment-table form.

  Args:
    arrays: `{"image" [N, S, S, 3], "panoptic" [N, S, S] int32}` from `embedded.street_arrays`.
    max_segments: table length `G` (>= 1).

  Returns:
    the segment-table form (module docstring).
  """
  _check_max_segments(max_segments)
  panoptic = np.asarray(arrays["panoptic"], np.int32)
  n, size = panoptic.shape[:2]
  out = _empty_tables(n, size, max_segments)
  out["image"] = np.asarray(arrays["image"], np.uint8)
  out["panoptic"] = panoptic
  for i in range(n):
    _fill_table(out, i, panoptic[i], street_table(panoptic[i]))
  return out


def nearest_indices(source: int, target: int) -> np.ndarray:
  """Nearest-neighbour sampling at pixel centres: `target` indices into `source` pixels."""
  return np.minimum(((np.arange(target) + 0.5) * source / target).astype(int), source - 1)


def record_table(record: Mapping[str, Any]) -> dict[int, tuple[int, bool]]:
  """`{segment id: (class, iscrowd)}` of a `catalogue.coco_panoptic_example` record."""
  return {
    int(s): (int(c), bool(k))
    for s, c, k in zip(
      record["segment_ids"], record["segment_classes"], record["segment_is_crowd"], strict=True
    )
  }


def _check_record(i: int, ids_map: np.ndarray, table: Mapping) -> None:
  missing = [int(s) for s in np.unique(ids_map) if s != pq_metrics.VOID and int(s) not in table]
  if missing:
    raise ValueError(
      f"record {i} segment ids {missing} are not allowed: they have no segment_ids entry"
    )


def coco_panoptic_arrays(
  records: Sequence[Mapping[str, Any]] | Callable[[int], Mapping[str, Any]],
  image_size: int,
  max_segments: int,
  count: int | None = None,
) -> dict:
  """`catalogue.coco_panoptic_example` records resized to `[S, S]`, in the segment-table form.

  Records are read and converted one at a time (a list, or a function `i -> record` with
  `count`). Images are resized by nearest-neighbour sampling at pixel centres (the same
  sampling for the image and the segment-id map, so ids stay exact); segments that vanish
  are dropped.

  Args:
    records: dicts with `image` [H, W, 3] uint8, `panoptic` [H, W] int32 ids (0 = void),
      `segment_ids`, `segment_classes` [K] int and `segment_is_crowd` [K] bool.
    image_size: output side `S`.
    max_segments: table length `G` (>= 1).
    count: number of records when `records` is a function.

  Returns:
    the segment-table form (module docstring).

  Raises:
    ValueError: when a segment id in a map has no entry in the record's table.
  """
  _check_max_segments(max_segments)
  get = records if callable(records) else records.__getitem__
  n = len(records) if count is None else count
  out = _empty_tables(n, image_size, max_segments)
  for i in range(n):
    record = get(i)
    image = np.asarray(record["image"], np.uint8)
    h, w = image.shape[:2]
    rows, cols = nearest_indices(h, image_size), nearest_indices(w, image_size)
    out["image"][i] = image[rows][:, cols]
    ids_map = np.asarray(record["panoptic"], np.int64)[rows][:, cols]
    table = record_table(record)
    _check_record(i, ids_map, table)
    out["panoptic"][i] = ids_map
    _fill_table(out, i, ids_map, table)
  return out


def _check_max_segments(max_segments: int) -> None:
  if not isinstance(max_segments, int) or max_segments < 1:
    raise ValueError(f"max_segments={max_segments!r} is not allowed: it must be an int >= 1")


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
  """Padded training targets of the kept classes at the mask-logit resolution, image by image.

  A target is a valid, non-crowd segment of a kept class in the image's table; its mask is the
  block-majority downsampling of its pixels (:func:`block_downsample`); segments with no pixel
  left are not targets. Pixels of other classes, of crowd segments, of truncated segments and
  of void are covered by no target. Targets are ordered by decreasing area (ties: by segment
  id). Only one image's
  `[G, S, S]` masks exist at a time.

  Args:
    arrays: the segment-table form.
    keep_classes: the labelled classes (old classes in step 0, new ones later).
    mask_shape: `(h, w)` of the mask logits.
    max_targets: `T`; an image with more targets is an error (use `T >= G`).

  Returns:
    `{"image", "target_classes" [N, T] int32, "target_masks" [N, T, h, w] bool,
    "target_valid" [N, T] bool}`.
  """
  n = len(arrays["segment_ids"])
  keep = np.isin(arrays["segment_classes"], list(keep_classes))
  usable_all = arrays["segment_valid"] & ~arrays["segment_crowd"] & keep
  classes = np.zeros((n, max_targets), np.int32)
  masks = np.zeros((n, max_targets) + tuple(mask_shape), bool)
  valid = np.zeros((n, max_targets), bool)
  for i in range(n):
    rows = np.flatnonzero(usable_all[i])
    if not len(rows):
      continue
    rows = rows[np.argsort(arrays["segment_ids"][i][rows], kind="stable")]  # ties: by id
    full = arrays["panoptic"][i][None] == arrays["segment_ids"][i][rows][:, None, None]
    small = block_downsample(full, mask_shape)
    area = small.sum((-2, -1))
    order = [k for k in np.argsort(-area, kind="stable") if area[k] > 0]
    if len(order) > max_targets:
      raise ValueError(
        f"image {i} has {len(order)} targets, which is not allowed: at most max_targets="
        f"{max_targets}"
      )
    for slot, k in enumerate(order):
      classes[i, slot] = arrays["segment_classes"][i, rows[k]]
      masks[i, slot] = small[k]
      valid[i, slot] = True
  return {
    "image": arrays["image"],
    "target_classes": classes,
    "target_masks": masks,
    "target_valid": valid,
  }


def class_map(arrays: Mapping[str, np.ndarray], mask_shape: tuple[int, int]) -> np.ndarray:
  """`[N, h, w]` int class of each mask-resolution pixel (block majority), -1 where none.

  Used to score pseudo labels against the hidden full labels of the incremental images.
  """
  n = len(arrays["image"])
  out = np.full((n,) + tuple(mask_shape), -1, np.int64)
  for i in range(n):
    for s, c, v in zip(
      arrays["segment_ids"][i],
      arrays["segment_classes"][i],
      arrays["segment_valid"][i],
      strict=True,
    ):
      if v:
        out[i][block_downsample(arrays["panoptic"][i] == s, mask_shape)] = c
  return out


def ground_truth_segments(arrays: Mapping[str, np.ndarray], index: int) -> dict:
  """`{segment id: (class, iscrowd)}` of one image's (possibly truncated) table."""
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


class GroundTruth:
  """Test labels for PQ, read one record at a time.

  `truth[i]` is `(label map [H_i, W_i] at the original resolution, full segment table)`.

  Args:
    count: number of test images.
    read: `i -> (map, table)`.
  """

  def __init__(self, count: int, read: Callable[[int], tuple[np.ndarray, dict]]):
    self.count = count
    self._read = read

  def __len__(self) -> int:
    return self.count

  def __getitem__(self, i: int) -> tuple[np.ndarray, dict]:
    if not 0 <= i < self.count:
      raise IndexError(f"index {i} is out of range for {self.count} test images")
    return self._read(i)


def upsample_segment_map(segment_map: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """A predicted `[S, S]` segment map brought to a label's `(H, W)` by nearest sampling."""
  rows = nearest_indices(segment_map.shape[0], shape[0])
  cols = nearest_indices(segment_map.shape[1], shape[1])
  return np.asarray(segment_map)[rows][:, cols]


def subset(arrays: Mapping[str, np.ndarray], index: np.ndarray) -> dict:
  """The examples selected by a bool or int index."""
  return {k: v[index] for k, v in arrays.items()}


def load_panoptic_data(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Train and test splits of `config.data` (street scenes or COCO panoptic) as segment tables.

  Returns:
    `{"train": split, "test": split, "truth": GroundTruth of the test split, "class_names":
    (C names)}`, each split in the segment-table form (module docstring); COCO's test split
    is its validation split, and its ground truth is re-read record by record at the
    original resolution.
  """
  d = config.data
  if d.name == "coco_panoptic":
    out = {}
    for split, count in (("train", d.num_train), ("validation", d.num_test)):
      source, _ = catalogue.load("coco_panoptic", split, d.data_dir or None)
      n = min(count, len(source))
      out[split] = coco_panoptic_arrays(source.__getitem__, d.image_size, d.max_segments, n)
      if split == "validation":

        def read(i, source=source):
          record = source[i]
          return np.asarray(record["panoptic"], np.int64), record_table(record)

        out["truth"] = GroundTruth(n, read)
    names = tuple(f"class_{c}" for c in range(d.num_classes))
    return {
      "train": out["train"],
      "test": out["validation"],
      "truth": out["truth"],
      "class_names": names,
    }
  kwargs = dict(
    image_size=d.image_size,
    train_per_domain=d.train_per_domain,
    test_per_domain=d.test_per_domain,
    data_dir=d.data_dir or None,
  )
  out = {
    split: street_panoptic_arrays(
      embedded.street_arrays(tuple(d.domains), split, **kwargs), d.max_segments
    )
    for split in ("train", "test")
  }
  test_maps = out["test"]["panoptic"]
  truth = GroundTruth(len(test_maps), lambda i: (test_maps[i], street_table(test_maps[i])))
  return out | {"truth": truth, "class_names": street_scenes.CLASS_NAMES}
