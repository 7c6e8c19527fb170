"""Detection data: street-scene thing boxes, CenterNet targets and ground truths for mAP.

The embedded street scenes carry up to `street_scenes.MAX_BOXES` padded boxes per image with
their semantic class; detection keeps the four thing classes (car, truck, person, bicycle) as
detector classes 0..3.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

from research.data import embedded, street_scenes
from research.models import detector

CLASS_NAMES = tuple(street_scenes.CLASS_NAMES[c] for c in street_scenes.THING_CLASSES)
BATCH_KEYS = ("image", "boxes", "box_classes", "box_valid")


def thing_boxes(box_classes: np.ndarray, box_valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Street-scene thing classes 5..8 (car, truck, person, bicycle) -> detector classes 0..3.

  Args:
    box_classes: `[N, MAX_BOXES]` int semantic class ids.
    box_valid: `[N, MAX_BOXES]` bool.

  Returns:
    `(classes [N, MAX_BOXES] int32 in [0, 4), valid [N, MAX_BOXES] bool)`; rows with a
    non-thing class become invalid.
  """
  first = street_scenes.THING_CLASSES[0]
  classes = np.asarray(box_classes, np.int32) - first
  valid = np.asarray(box_valid, bool) & (classes >= 0) & (classes < len(CLASS_NAMES))
  return np.where(valid, classes, 0).astype(np.int32), valid


def load_detection_data(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Street-scene train/test arrays of `config.data` with thing boxes as classes 0..3.

  Returns:
    {"train": {"image": [N, H, W, 3] uint8, "boxes": [N, MAX_BOXES, 4] float32 (x0, y0, x1,
    y1) pixels, "box_classes": [N, MAX_BOXES] int32, "box_valid": [N, MAX_BOXES] bool},
    "test": {...}, "num_classes": 4, "class_names": the four thing names}.
  """
  d = config.data
  out = {}
  for split in ("train", "test"):
    arrays = embedded.street_arrays(
      tuple(d.domains),
      split,
      image_size=d.image_size,
      train_per_domain=d.train_per_domain,
      test_per_domain=d.test_per_domain,
      data_dir=d.data_dir or None,
    )
    classes, valid = thing_boxes(arrays["box_classes"], arrays["box_valid"])
    out[split] = {
      "image": arrays["image"],
      "boxes": arrays["boxes"].astype(np.float32),
      "box_classes": classes,
      "box_valid": valid,
    }
  return {**out, "num_classes": len(CLASS_NAMES), "class_names": CLASS_NAMES}


def centernet_targets(
  batch: dict, *, num_classes: int, image_size: tuple[int, int], stride: int
) -> dict[str, jax.Array]:
  """CenterNet training targets of a batch's padded boxes (jit-compatible).

  Args:
    batch: `boxes [B, MAX_BOXES, 4]`, `box_classes [B, MAX_BOXES]`, `box_valid [B, MAX_BOXES]`.
    num_classes: K.
    image_size: (H, W) of the images.
    stride: input pixels per output cell of the detector.

  Returns:
    `detector.encode_batch_targets`'s targets on the `(H / stride, W / stride)` map.
  """
  h, w = image_size
  return detector.encode_batch_targets(
    batch["boxes"],
    batch["box_classes"],
    batch["box_valid"],
    num_classes=num_classes,
    output_size=(h // stride, w // stride),
    stride=stride,
  )


def ground_truths(arrays: dict[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
  """Per image `(boxes [n, 4], classes [n])` of the valid rows, as the mAP metric takes them."""
  return [
    (b[v], c[v])
    for b, c, v in zip(arrays["boxes"], arrays["box_classes"], arrays["box_valid"], strict=True)
  ]
