"""The embedded datasets as in-memory numpy arrays, read through their TFDS data sources."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from research.data import builders, street_scenes


def to_arrays(source: Sequence) -> dict[str, np.ndarray]:
  """Reads every example of a random-access source and stacks each feature: {key: [N, ...]}."""
  records = source.__getitems__(list(range(len(source))))
  return {k: np.stack([np.asarray(r[k]) for r in records]) for k in records[0]}


def digits_arrays(data_dir: str | None = None) -> dict[str, dict[str, np.ndarray]]:
  """{"train": {"image": [1297, 8, 8, 1] uint8, "label": [1297]}, "test": {... 500 ...}}."""
  sources = builders.digits_builder(data_dir).as_data_source()
  return {split: to_arrays(sources[split]) for split in ("train", "test")}


def street_arrays(
  domains: Sequence[str],
  split: str,
  image_size: int = 64,
  train_per_domain: int = 400,
  test_per_domain: int = 100,
  data_dir: str | None = None,
) -> dict[str, np.ndarray]:
  """Street scenes of several domains concatenated (feature `domain` says which is which).

  Args:
    domains: domain names from `street_scenes.DOMAINS`.
    split: "train" or "test".
    image_size: side length of the images.
    train_per_domain: training images per domain in the cached dataset.
    test_per_domain: test images per domain in the cached dataset.
    data_dir: cache directory (see `builders.default_data_dir`).

  Returns:
    {feature: [N, ...]} arrays, N = images per domain x len(domains).
  """
  unknown = [d for d in domains if d not in street_scenes.DOMAINS]
  if unknown or not domains:
    raise ValueError(
      f"domains={list(domains)} is not allowed: give one or more of {street_scenes.DOMAINS}"
    )
  if split not in ("train", "test"):
    raise ValueError(f"split={split!r} is not allowed: use 'train' or 'test'")
  builder = builders.street_scenes_builder(image_size, train_per_domain, test_per_domain, data_dir)
  sources = builder.as_data_source()
  parts = [to_arrays(sources[f"{d}_{split}"]) for d in domains]
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
