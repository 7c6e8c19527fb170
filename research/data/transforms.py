"""Per-task record -> example transforms of the streaming input pipelines (numpy only).

A transform is a picklable callable `transform(record, index, rng) -> example`: `record` is one
example of a random-access source ({feature: array}), `index` its position in the source (named
in errors), and `rng` a `np.random.Generator` keyed by (seed, step, position in the global
batch) for training, or None for evaluation, which applies no random change. Training
augmentations:

* classification: random crop (after optional zero padding) + horizontal flip;
* segmentation and panoptic: aspect-preserving random scale + crop + flip, the label map
  resampled with the image (nearest neighbour, so labels and segment ids stay exact);
* detection: the same scale + crop + flip, with the boxes following it.

Scale, crop and flip are done in one resampling of the output window (`Window`), so a
2048-pixel image costs only the crop's pixels. Bad input raises `InputDataError`, one sentence
naming the record index, the value found and what is allowed; every record is checked whole
(not only its crop), so whether a bad record fails does not depend on the augmentation drawn.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

IGNORE_LABEL = 255
PANOPTIC_DIVISOR = 1000  # street scenes' segment id = (class + 1) * 1000 + instance


class InputDataError(ValueError):
  """A record cannot be used; the message names the record index, the value and what is allowed."""


def input_error(index: int, found: str, allowed: str) -> InputDataError:
  """`InputDataError("record {index}: {found}; allowed: {allowed}")`."""
  return InputDataError(f"record {index}: {found}; allowed: {allowed}")


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(size, int | np.integer):
    return int(size), int(size)
  h, w = size
  return int(h), int(w)


def _feature(record: Mapping, key: str, index: int) -> np.ndarray:
  if key not in record:
    raise input_error(index, f"feature {key!r} is missing (features: {sorted(record)})", key)
  return np.asarray(record[key])


def _image(record: Mapping, index: int, key: str = "image") -> np.ndarray:
  """The record's [H, W, C] uint8 image, checked."""
  image = _feature(record, key, index)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise input_error(
      index, f"{key} has shape {image.shape} and dtype {image.dtype}", "[H, W, 1 or 3] uint8"
    )
  return image


def _label_map(record: Mapping, key: str, index: int, shape: tuple[int, ...]) -> np.ndarray:
  labels = _feature(record, key, index)
  if labels.shape != shape or not np.issubdtype(labels.dtype, np.integer):
    raise input_error(
      index, f"{key} has shape {labels.shape} and dtype {labels.dtype}", f"{shape} integers"
    )
  return labels


def _check_crop(image: np.ndarray, crop: tuple[int, int], index: int) -> None:
  h, w = image.shape[:2]
  if h < crop[0] or w < crop[1]:
    raise input_error(
      index,
      f"the image of {h}x{w} pixels is smaller than the crop {crop[0]}x{crop[1]}",
      "images at least as large as the crop (lower the crop size)",
    )


def _check_classes(values: np.ndarray, num_classes: int, index: int, what: str, extra=()) -> None:
  """Fails on the first value of `values` outside [0, num_classes) and not in `extra`."""
  values = np.asarray(values)
  bad = (values < 0) | (values >= num_classes)
  for e in extra:
    bad &= values != e
  if bad.any():
    also = f" or {', '.join(map(str, extra))}" if extra else ""
    raise input_error(
      index,
      f"{what} {values[bad].flat[0]} is outside the class range",
      f"0..{num_classes - 1}{also}",
    )


@dataclasses.dataclass(frozen=True)
class Window:
  """Where an output crop comes from in its source image.

  The source image is scaled by `scale` (to at least the crop), the crop's top-left corner is
  (`top`, `left`) in the scaled image, and `flip` mirrors the crop horizontally.

  Attributes:
    scale: source -> scaled image factor.
    top: crop row offset in the scaled image.
    left: crop column offset in the scaled image.
    flip: whether the crop is mirrored left-right.
    size: (h, w) of the crop.
  """

  scale: float
  top: int
  left: int
  flip: bool
  size: tuple[int, int]

  def source_rows(self) -> np.ndarray:
    """[h] float source coordinates of the crop's pixel centres (pixel i spans [i, i+1))."""
    return (self.top + np.arange(self.size[0]) + 0.5) / self.scale - 0.5

  def source_cols(self) -> np.ndarray:
    """[w] float source coordinates of the crop's pixel centres, mirrored when flipped."""
    cols = self.left + np.arange(self.size[1])
    if self.flip:
      cols = cols[::-1]
    return (cols + 0.5) / self.scale - 0.5

  def map_boxes(self, boxes: np.ndarray) -> np.ndarray:
    """[M, 4] (x0, y0, x1, y1) source pixels -> crop pixels, clipped to the crop."""
    h, w = self.size
    x0 = np.clip(boxes[:, 0] * self.scale - self.left, 0, w)
    x1 = np.clip(boxes[:, 2] * self.scale - self.left, 0, w)
    y0 = np.clip(boxes[:, 1] * self.scale - self.top, 0, h)
    y1 = np.clip(boxes[:, 3] * self.scale - self.top, 0, h)
    if self.flip:
      x0, x1 = w - x1, w - x0
    return np.stack([x0, y0, x1, y1], axis=1).astype(np.float32)


def random_window(
  shape: tuple[int, int],
  crop: tuple[int, int],
  scale_range: tuple[float, float],
  flip: bool,
  rng: np.random.Generator,
) -> Window:
  """A random aspect-preserving scale, crop position and flip for an image of `shape`.

  The scale is drawn log-uniformly from `scale_range`, then raised where needed so the scaled
  image covers the crop (no padding, so no label is invented).

  Args:
    shape: (H, W) of the source image (at least the crop).
    crop: (h, w) of the output.
    scale_range: (min, max) scale factors.
    flip: whether to mirror with probability 1/2.
    rng: the example's generator.

  Returns:
    the `Window`.
  """
  (h, w), (ch, cw) = shape, crop
  lo, hi = scale_range
  scale = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
  scale = max(scale, ch / h, cw / w)
  sh, sw = max(int(h * scale), ch), max(int(w * scale), cw)
  top = int(rng.integers(0, sh - ch + 1))
  left = int(rng.integers(0, sw - cw + 1))
  mirrored = bool(flip and rng.uniform() < 0.5)
  return Window(scale, top, left, mirrored, (ch, cw))


def resample_nearest(array: np.ndarray, window: Window) -> np.ndarray:
  """[H, W, ...] -> [h, w, ...] by nearest-neighbour sampling (labels, segment ids)."""
  h, w = array.shape[:2]
  rows = np.clip(np.floor(window.source_rows() + 0.5).astype(np.int64), 0, h - 1)
  cols = np.clip(np.floor(window.source_cols() + 0.5).astype(np.int64), 0, w - 1)
  return array[rows][:, cols]


def _axis_weights(coords: np.ndarray, size: int):
  coords = np.clip(coords, 0, size - 1)
  lo = np.floor(coords).astype(np.int64)
  hi = np.minimum(lo + 1, size - 1)
  return lo, hi, (coords - lo).astype(np.float32)


def resample_bilinear(image: np.ndarray, window: Window) -> np.ndarray:
  """[H, W, C] uint8 -> [h, w, C] uint8 by bilinear sampling (rows first, then columns)."""
  h, w = image.shape[:2]
  r0, r1, fr = _axis_weights(window.source_rows(), h)
  c0, c1, fc = _axis_weights(window.source_cols(), w)
  top, bottom = image[r0].astype(np.float32), image[r1].astype(np.float32)
  rows = top + (bottom - top) * fr[:, None, None]
  left, right = rows[:, c0], rows[:, c1]
  out = left + (right - left) * fc[None, :, None]
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class Select:
  """No augmentation: the record's `keys` as arrays (what the in-memory path batches).

  Attributes:
    keys: features kept.
  """

  keys: tuple[str, ...]

  def __call__(self, record: Mapping, index: int, rng: np.random.Generator | None) -> dict:
    """{key: array} of the record."""
    del rng
    return {k: _feature(record, k, index) for k in self.keys}


@dataclasses.dataclass(frozen=True)
class ClassificationTransform:
  """Random crop (of the zero-padded image) + horizontal flip; evaluation: centre crop.

  Attributes:
    num_classes: K; labels must be in [0, K).
    crop: (h, w) or side of the output image.
    padding: zero pixels added on each side before cropping (4 for CIFAR-style crops).
    flip: whether training mirrors with probability 1/2.
  """

  num_classes: int
  crop: int | tuple[int, int]
  padding: int = 0
  flip: bool = True

  def __call__(self, record: Mapping, index: int, rng: np.random.Generator | None) -> dict:
    """{"image": [h, w, C] uint8, "label": int64 scalar}."""
    image = _image(record, index)
    label = _feature(record, "label", index)
    if label.shape != () or not np.issubdtype(label.dtype, np.integer):
      raise input_error(index, f"label has shape {label.shape} and dtype {label.dtype}", "an int")
    _check_classes(label, self.num_classes, index, "label")
    crop = _pair(self.crop)
    p = self.padding
    if p:
      image = np.pad(image, ((p, p), (p, p), (0, 0)))
    _check_crop(image, crop, index)
    h, w = image.shape[:2]
    if rng is None:
      top, left, mirrored = (h - crop[0]) // 2, (w - crop[1]) // 2, False
    else:
      top, left = int(rng.integers(0, h - crop[0] + 1)), int(rng.integers(0, w - crop[1] + 1))
      mirrored = bool(self.flip and rng.uniform() < 0.5)
    out = image[top : top + crop[0], left : left + crop[1]]
    if mirrored:
      out = out[:, ::-1]
    return {"image": np.ascontiguousarray(out), "label": np.int64(label)}


@dataclasses.dataclass(frozen=True)
class SegmentationTransform:
  """Aspect-preserving random scale + crop + flip of an image and its label map.

  Evaluation (rng None) keeps the full image, so metrics are at the labels' resolution.

  Attributes:
    num_classes: K; labels must be in [0, K) or `ignore_label`.
    crop: (h, w) or side of the training crop.
    scale_range: (min, max) random scale factors.
    flip: whether training mirrors with probability 1/2.
    ignore_label: the label of unlabelled pixels.
  """

  num_classes: int
  crop: int | tuple[int, int]
  scale_range: tuple[float, float] = (0.5, 2.0)
  flip: bool = True
  ignore_label: int = IGNORE_LABEL

  def __call__(self, record: Mapping, index: int, rng: np.random.Generator | None) -> dict:
    """{"image": [h, w, 3] uint8, "semantic": [h, w] uint8}."""
    image = _image(record, index)
    semantic = _label_map(record, "semantic", index, image.shape[:2])
    _check_classes(semantic, self.num_classes, index, "semantic label", (self.ignore_label,))
    if rng is None:
      return {"image": image, "semantic": semantic.astype(np.uint8)}
    crop = _pair(self.crop)
    _check_crop(image, crop, index)
    window = random_window(image.shape[:2], crop, self.scale_range, self.flip, rng)
    return {
      "image": resample_bilinear(image, window),
      "semantic": resample_nearest(semantic, window).astype(np.uint8),
    }


@dataclasses.dataclass(frozen=True)
class PanopticTransform:
  """Scale + crop + flip of an image and its segment-id map, in the segment-table form.

  Records carry `image` [H, W, 3] uint8 and `panoptic` [H, W] int segment ids (0 = void), and
  either a table (`segment_ids`, `segment_classes`, `segment_is_crowd`: COCO, see
  `catalogue.coco_panoptic_example`) or, without one, the street-scenes encoding
  `id = (class + 1) * 1000 + instance`. The output is one row of `data.panoptic`'s segment-table
  form, listing the segments left in the crop; a batch of them feeds `panoptic.panoptic_targets`
  (pass it as the pipeline's `batch_transform`).

  Attributes:
    num_classes: K; segment classes must be in [0, K).
    crop: (h, w) or side of the training crop.
    max_segments: G, the table length.
    scale_range: (min, max) random scale factors.
    flip: whether training mirrors with probability 1/2.
  """

  num_classes: int
  crop: int | tuple[int, int]
  max_segments: int
  scale_range: tuple[float, float] = (0.5, 2.0)
  flip: bool = True

  def _table(self, record: Mapping, ids: np.ndarray, index: int) -> dict[int, tuple[int, bool]]:
    """{segment id: (class, crowd)} of the record, class range checked."""
    if "segment_ids" in record:
      seg_ids = np.asarray(record["segment_ids"], np.int64)
      classes = np.asarray(record["segment_classes"], np.int64)
      crowd = np.asarray(record["segment_is_crowd"], bool)
      _check_classes(classes, self.num_classes, index, "segment class")
      return {int(s): (int(c), bool(k)) for s, c, k in zip(seg_ids, classes, crowd, strict=True)}
    nonzero = ids[ids != 0]
    if nonzero.size:  # the class is monotone in the id: the extremes bound every class
      extremes = np.array([nonzero.min(), nonzero.max()]) // PANOPTIC_DIVISOR - 1
      _check_classes(extremes, self.num_classes, index, "segment class")
    return {}

  def __call__(self, record: Mapping, index: int, rng: np.random.Generator | None) -> dict:
    """One row of the segment-table form.

    Returns:
      {"image": [h, w, 3] uint8, "panoptic": [h, w] int32, "segment_ids", "segment_classes":
      [G] int64, "segment_crowd", "segment_valid": [G] bool}.
    """
    image = _image(record, index)
    ids = _label_map(record, "panoptic", index, image.shape[:2])
    table = self._table(record, ids, index)
    if rng is not None:
      crop = _pair(self.crop)
      _check_crop(image, crop, index)
      window = random_window(image.shape[:2], crop, self.scale_range, self.flip, rng)
      image, ids = resample_bilinear(image, window), resample_nearest(ids, window)
    present = np.unique(ids)
    present = present[present != 0]
    if len(present) > self.max_segments:
      raise input_error(
        index, f"{len(present)} segments", f"at most max_segments={self.max_segments}"
      )
    g = self.max_segments
    out = {
      "image": image,
      "panoptic": ids.astype(np.int32),
      "segment_ids": np.zeros(g, np.int64),
      "segment_classes": np.zeros(g, np.int64),
      "segment_crowd": np.zeros(g, bool),
      "segment_valid": np.zeros(g, bool),
    }
    for slot, s in enumerate(int(s) for s in present):
      if table:
        if s not in table:
          raise input_error(index, f"segment id {s} has no segment_ids entry", "listed ids")
        cls, crowd = table[s]
      else:
        cls, crowd = s // PANOPTIC_DIVISOR - 1, False
      out["segment_ids"][slot], out["segment_classes"][slot] = s, cls
      out["segment_crowd"][slot], out["segment_valid"][slot] = crowd, True
    return out


@dataclasses.dataclass(frozen=True)
class DetectionTransform:
  """Scale + crop + flip of an image with its padded boxes following the transform.

  Boxes are (x0, y0, x1, y1) pixels; after the transform they are clipped to the crop, and a
  box left narrower or lower than `min_size` pixels becomes invalid (zeros).

  Attributes:
    num_classes: K; valid boxes' classes (after `class_offset`) must be in [0, K).
    crop: (h, w) or side of the training crop.
    scale_range: (min, max) random scale factors.
    flip: whether training mirrors with probability 1/2.
    class_offset: subtracted from `box_classes` (5 maps street scenes' things to 0..3).
    min_size: smallest visible box side, in crop pixels.
  """

  num_classes: int
  crop: int | tuple[int, int]
  scale_range: tuple[float, float] = (0.5, 2.0)
  flip: bool = True
  class_offset: int = 0
  min_size: float = 1.0

  def __call__(self, record: Mapping, index: int, rng: np.random.Generator | None) -> dict:
    """The transformed image and boxes.

    Returns:
      {"image": [h, w, 3] uint8, "boxes": [M, 4] float32, "box_classes": [M] int32,
      "box_valid": [M] bool}.
    """
    image = _image(record, index)
    boxes = _feature(record, "boxes", index).astype(np.float32)
    valid = _feature(record, "box_valid", index).astype(bool)
    classes = _feature(record, "box_classes", index).astype(np.int64) - self.class_offset
    if (
      boxes.ndim != 2 or boxes.shape[1] != 4 or not classes.shape == valid.shape == boxes.shape[:1]
    ):
      raise input_error(
        index,
        f"boxes {boxes.shape}, box_classes {classes.shape}, box_valid {valid.shape}",
        "[M, 4], [M] and [M]",
      )
    _check_classes(classes[valid], self.num_classes, index, "box class (after class_offset)")
    if rng is not None:
      crop = _pair(self.crop)
      _check_crop(image, crop, index)
      window = random_window(image.shape[:2], crop, self.scale_range, self.flip, rng)
      image, boxes = resample_bilinear(image, window), window.map_boxes(boxes)
      sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
      valid &= sides >= self.min_size
    return {
      "image": image,
      "boxes": np.where(valid[:, None], boxes, 0).astype(np.float32),
      "box_classes": np.where(valid, classes, 0).astype(np.int32),
      "box_valid": valid,
    }
