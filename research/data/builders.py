"""TFDS builders for the embedded datasets: ArrayRecord files of `Tensor` features, no TensorFlow.

Both builders generate their data locally (procedurally, or from scikit-learn's package data),
write ArrayRecord once into a cache directory and are read back with random access through
`tfds.data_source`, which index samplers need. The cache directory is `data_dir`, else the
environment variable `RESEARCH_DATA_DIR`, else `~/.cache/research/tfds`.
"""

from __future__ import annotations

import dataclasses
import fcntl
import glob
import os
import shutil
from collections.abc import Callable

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from research.data import digits, street_scenes

FILE_FORMAT = "array_record"


def default_data_dir() -> str:
  """The embedded datasets' cache directory (see module docstring)."""
  return os.environ.get(
    "RESEARCH_DATA_DIR", os.path.join(os.path.expanduser("~"), ".cache", "research", "tfds")
  )


@dataclasses.dataclass
class StreetScenesConfig(tfds.core.BuilderConfig):
  """Size of the generated street scenes.

  Attributes:
    image_size: side length of the square images.
    train_per_domain: training images per domain.
    test_per_domain: held-out test images per domain.
  """

  image_size: int = 64
  train_per_domain: int = 400
  test_per_domain: int = 100


def street_scenes_config(image_size: int, train_per_domain: int, test_per_domain: int):
  """A `StreetScenesConfig` whose name encodes its sizes, so each size has its own cache.

  The sizes of a declared config (`StreetScenes.BUILDER_CONFIGS`) give that declared object:
  TFDS refuses a new config object that reuses a declared config's name.
  """
  name = f"s{image_size}_tr{train_per_domain}_te{test_per_domain}"
  declared = {c.name: c for c in StreetScenes.BUILDER_CONFIGS}
  if name in declared:
    return declared[name]
  return StreetScenesConfig(
    name=name,
    image_size=image_size,
    train_per_domain=train_per_domain,
    test_per_domain=test_per_domain,
  )


class StreetScenes(tfds.core.GeneratorBasedBuilder):
  """Procedural street scenes, one train and one test split per domain (`day_train`, ...)."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [
    StreetScenesConfig(
      name="s64_tr400_te100", image_size=64, train_per_domain=400, test_per_domain=100
    )
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.image_size
    n = street_scenes.MAX_BOXES
    features = tfds.features.FeaturesDict(
      {
        "image": tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8),
        "semantic": tfds.features.Tensor(shape=(s, s), dtype=np.uint8),
        "panoptic": tfds.features.Tensor(shape=(s, s), dtype=np.int32),
        "boxes": tfds.features.Tensor(shape=(n, 4), dtype=np.float32),
        "box_classes": tfds.features.Tensor(shape=(n,), dtype=np.int32),
        "box_valid": tfds.features.Tensor(shape=(n,), dtype=np.bool_),
        "domain": tfds.features.Tensor(shape=(), dtype=np.int32),
      }
    )
    return tfds.core.DatasetInfo(builder=self, features=features)

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded.
    cfg = self.builder_config
    splits = {}
    for domain in street_scenes.DOMAINS:
      splits[f"{domain}_train"] = self._generate_examples(domain, cfg.train_per_domain, 0)
      splits[f"{domain}_test"] = self._generate_examples(domain, cfg.test_per_domain, 1)
    return splits

  def _generate_examples(self, domain: str, num_images: int, split_seed: int):
    size = self.builder_config.image_size
    for i in range(num_images):
      scene = street_scenes.generate_scene(split_seed * 1_000_003 + i, domain, size)
      scene["domain"] = np.int32(street_scenes.DOMAINS.index(domain))
      yield i, scene


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits with a fixed balanced test split."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self) -> tfds.core.DatasetInfo:
    features = tfds.features.FeaturesDict(
      {
        "image": tfds.features.Tensor(shape=digits.IMAGE_SHAPE, dtype=np.uint8),
        "label": tfds.features.Tensor(shape=(), dtype=np.int64),
      }
    )
    return tfds.core.DatasetInfo(builder=self, features=features)

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded.
    arrays = digits.load_digits_arrays()
    return {split: self._generate_examples(arrays[split]) for split in ("train", "test")}

  def _generate_examples(self, arrays: dict[str, np.ndarray]):
    for i, (image, label) in enumerate(zip(arrays["image"], arrays["label"])):
      yield i, {"image": image, "label": label}


def prepared_builder(
  make_builder: Callable[[], tfds.core.DatasetBuilder], data_dir: str
) -> tfds.core.DatasetBuilder:
  """Generates a builder's files once (no-op when they exist) and returns the builder.

  Processes sharing `data_dir` (pytest workers, hosts of one job) take turns under an exclusive
  file lock, and the builder is created inside the lock, so a process that waited reads the
  files the first one wrote instead of writing them again. Folders that an interrupted
  preparation left behind (TFDS's `incomplete.*`) are deleted first: under the lock, no other
  preparation is running.
  """
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, ".prepare.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      builder = make_builder()
      for leftover in glob.glob(
        os.path.join(data_dir, builder.name, "**", "incomplete.*"), recursive=True
      ):
        logging.info("deleting %s, left by an interrupted preparation", leftover)
        shutil.rmtree(leftover, ignore_errors=True)
      builder.download_and_prepare(file_format=FILE_FORMAT)
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return builder


def street_scenes_builder(
  image_size: int = 64,
  train_per_domain: int = 400,
  test_per_domain: int = 100,
  data_dir: str | None = None,
) -> StreetScenes:
  """The prepared `StreetScenes` builder of the given size."""
  config = street_scenes_config(image_size, train_per_domain, test_per_domain)
  data_dir = data_dir or default_data_dir()
  return prepared_builder(
    lambda: StreetScenes(config=config, data_dir=data_dir, file_format=FILE_FORMAT), data_dir
  )


def digits_builder(data_dir: str | None = None) -> Digits:
  """The prepared `Digits` builder."""
  data_dir = data_dir or default_data_dir()
  return prepared_builder(lambda: Digits(data_dir=data_dir, file_format=FILE_FORMAT), data_dir)
