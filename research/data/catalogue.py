"""Catalogue datasets by name from a prepared TFDS `data_dir` (nothing is downloaded here).

Each adapter returns a random-access source of examples in this codebase's conventions:
classification `{"image": [H, W, C] uint8, "label": int}`, semantic segmentation
`{"image", "semantic": [H, W] uint8}` (255 = ignore) and panoptic `{"image", "panoptic":
[H, W] int32 segment ids, "segments": {...}}`. Datasets must be prepared beforehand in the
ArrayRecord format, e.g. `tfds build cifar10 --data_dir=DIR --file_format=array_record`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import read_only_builder, registered

from research.data import digits

CLASSIFICATION = {"cifar10": 10, "cifar100": 100, "mnist": 10}
SEGMENTATION = {"cityscapes": "cityscapes/semantic_segmentation"}
PANOPTIC = {"coco_panoptic": "coco/2017_panoptic"}
KNOWN = tuple(CLASSIFICATION) + tuple(SEGMENTATION) + tuple(PANOPTIC)

# Cityscapes label ids -> the 19 train ids (others ignored), as in cityscapesScripts.
_CITYSCAPES_TRAIN_IDS = {
  7: 0,
  8: 1,
  11: 2,
  12: 3,
  13: 4,
  17: 5,
  19: 6,
  20: 7,
  21: 8,
  22: 9,
  23: 10,
  24: 11,
  25: 12,
  26: 13,
  27: 14,
  28: 15,
  31: 16,
  32: 17,
  33: 18,
}
CITYSCAPES_CLASS_NAMES = (
  "road",
  "sidewalk",
  "building",
  "wall",
  "fence",
  "pole",
  "traffic light",
  "traffic sign",
  "vegetation",
  "terrain",
  "sky",
  "person",
  "rider",
  "car",
  "truck",
  "bus",
  "train",
  "motorcycle",
  "bicycle",
)


class DatasetNotPreparedError(FileNotFoundError):
  """A catalogue dataset is not prepared in the given data_dir."""


class MappedSource(Sequence):
  """A random-access source whose examples pass through `fn` when read."""

  def __init__(self, source: Sequence, fn):
    self._source = source
    self._fn = fn

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._fn(self._source[index])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    # Record by record: tfds's mocked sources (tfds.testing.mock_data) break on batched reads.
    return [self[int(i)] for i in indices]


def tfds_source(name: str, split: str, data_dir: str | None) -> Sequence:
  """A prepared dataset's random-access source; a missing dataset fails with one sentence.

  The prepared files are read directly (`builder_from_files`), so no dataset code runs: some
  TFDS builders (e.g. `coco`) import TensorFlow, which is not installed. Without files,
  `tfds.data_source` is asked without download (under `tfds.testing.mock_data` it gives mock
  records); a dataset found nowhere, or whose code would need TensorFlow, is not prepared.
  """
  try:
    builder = read_only_builder.builder_from_files(name, data_dir=data_dir)
  except registered.DatasetNotFoundError:
    builder = None
  if builder is not None:
    return builder.as_data_source(split=split)
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except (
    NotImplementedError,
    FileNotFoundError,
    AssertionError,
    ValueError,
    KeyError,
    ModuleNotFoundError,
  ) as e:
    raise DatasetNotPreparedError(
      f"dataset {name!r} (split {split!r}) is not prepared in data_dir={data_dir!r}: on a "
      f"machine with internet run `tfds build {name} --data_dir=DIR "
      f"--file_format=array_record` and copy DIR here."
    ) from e


def _classification_example(record: dict) -> dict:
  return {"image": np.asarray(record["image"], np.uint8), "label": np.int64(record["label"])}


def _cityscapes_example(record: dict) -> dict:
  raw = np.asarray(record["segmentation_label"])[..., 0]
  semantic = np.full(raw.shape, 255, np.uint8)
  for label_id, train_id in _CITYSCAPES_TRAIN_IDS.items():
    semantic[raw == label_id] = train_id
  return {"image": np.asarray(record["image_left"], np.uint8), "semantic": semantic}


def coco_panoptic_example(record: dict) -> dict:
  """Converts a TFDS `coco/2017_panoptic` record to segment ids and per-segment arrays.

  The PNG's RGB colour encodes the segment id as `R + 256 G + 256^2 B` (COCO panoptic format);
  0 is void.

  Returns:
    {"image": [H, W, 3] uint8, "panoptic": [H, W] int32 segment ids, "segment_ids": [S],
     "segment_classes": [S], "segment_is_crowd": [S] bool}.
  """
  rgb = np.asarray(record["panoptic_image"]).astype(np.int64)
  ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
  objects = record["panoptic_objects"]
  return {
    "image": np.asarray(record["image"], np.uint8),
    "panoptic": ids.astype(np.int32),
    "segment_ids": np.asarray(objects["id"], np.int64),
    "segment_classes": np.asarray(objects["label"], np.int64),
    "segment_is_crowd": np.asarray(objects["is_crowd"], bool),
  }


def load(name: str, split: str, data_dir: str | None) -> tuple[Sequence, int]:
  """A catalogue dataset by name.

  Args:
    name: one of `KNOWN` or `cifar10_lt` / `cifar100_lt` (the balanced train split; the
      long-tailed subset is chosen by `long_tailed_subset`).
    split: TFDS split name (`train`, `test`, `validation`, ...).
    data_dir: the TFDS data directory holding the prepared dataset.

  Returns:
    (source, num_classes): a random-access source of converted examples and the class count.
  """
  base = name.removesuffix("_lt")
  if base in CLASSIFICATION:
    return MappedSource(tfds_source(base, split, data_dir), _classification_example), (
      CLASSIFICATION[base]
    )
  if name in SEGMENTATION:
    source = tfds_source(SEGMENTATION[name], split, data_dir)
    return MappedSource(source, _cityscapes_example), len(CITYSCAPES_CLASS_NAMES)
  if name in PANOPTIC:
    return MappedSource(tfds_source(PANOPTIC[name], split, data_dir), coco_panoptic_example), 133
  allowed = KNOWN + ("cifar10_lt", "cifar100_lt")
  raise ValueError(f"dataset={name!r} is not known: allowed catalogue datasets are {allowed}")


def long_tailed_subset(labels: np.ndarray, imbalance_ratio: float, seed: int = 0) -> np.ndarray:
  """Indices of CIFAR-LT built as Cao et al. / Menon et al. do (n_max = 5000 or 500)."""
  n_max = int(np.bincount(labels).max())
  return digits.long_tailed_indices(labels, imbalance_ratio, n_max=n_max, seed=seed)
