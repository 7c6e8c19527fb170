"""Data of the M1 experiment: M training datasets, their held-out images and a held-out domain.

METHODS.md M1 step 4 needs every dataset at one image size ("resize first"). The embedded
street scenes already share one size; Cityscapes images (1024 x 2048) are resized here, one
example at a time while reading, so that a full split never sits in memory at full size.

The experiment sees:
  ``train``:   ``{dataset: {"image": [N, H, W, 3] uint8, "semantic": [N, H, W] uint8}}``,
               the M datasets (street-scene domains, or Cityscapes train chunks).
  ``test``:    held-out images of those datasets, same keys.
  ``heldout``: ``{domain: arrays}`` of the held-out domain(s) (a street-scene domain never
               trained on, or the Cityscapes validation cities, which the train split lacks).
  ``val``:     ``{dataset: arrays}``, the last ``tune.val_per_dataset`` training images of each
               dataset (``carve_validation``): removed from ``train`` and ``train_all``, so
               never trained on or attacked; gamma and eps_r of R are chosen on them, never on
               ``test`` or ``heldout`` (METHODS.md "How every comparison is judged").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from research.data import catalogue, street_scenes
from research.data.segmentation import load_segmentation_data


def resize_labels(labels: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """Nearest-neighbour resize of label maps (labels must never be interpolated).

  Output pixel ``(i, j)`` takes the input pixel under its centre:
  ``(floor((i + 0.5) * H / h), floor((j + 0.5) * W / w))``.

  Args:
    labels: ``[..., H, W]`` integer label maps.
    size: target ``(h, w)``.

  Returns:
    ``[..., h, w]`` label maps of the same dtype.
  """
  h_in, w_in = labels.shape[-2:]
  h, w = int(size[0]), int(size[1])
  rows = np.minimum(((np.arange(h) + 0.5) * h_in / h).astype(np.int64), h_in - 1)
  cols = np.minimum(((np.arange(w) + 0.5) * w_in / w).astype(np.int64), w_in - 1)
  return labels[..., rows[:, None], cols[None, :]]


def resize_images(images: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """Antialiased bilinear resize of uint8 images ``[..., H, W, C] -> [..., h, w, C]``."""
  shape = images.shape[:-3] + (int(size[0]), int(size[1]), images.shape[-1])
  out = jax.image.resize(jnp.asarray(images, jnp.float32), shape, "linear", antialias=True)
  return np.asarray(np.clip(np.round(out), 0, 255), np.uint8)


def resized_arrays(source: Sequence, indices: Sequence[int], size: Sequence[int]) -> dict:
  """Reads ``source[indices]`` and resizes each example on the way (bounded memory).

  Args:
    source: random-access source of ``{"image": [H, W, 3] uint8, "semantic": [H, W]}``.
    indices: which examples to read.
    size: target ``(h, w)``.

  Returns:
    ``{"image": [n, h, w, 3] uint8, "semantic": [n, h, w] uint8}``.
  """
  images, labels = [], []
  for i in indices:
    record = source[int(i)]
    images.append(resize_images(np.asarray(record["image"]), size))
    labels.append(resize_labels(np.asarray(record["semantic"]), size))
  return {"image": np.stack(images), "semantic": np.stack(labels)}


def _take(arrays: dict, idx: np.ndarray) -> dict:
  return {k: v[idx] for k, v in arrays.items() if k in ("image", "semantic")}


def _street_data(config: ml_collections.ConfigDict) -> dict[str, Any]:
  base = load_segmentation_data(config)
  train = base["train"]
  domains = tuple(config.data.train_domains)
  per_domain = {
    d: np.flatnonzero(train["domain"] == street_scenes.DOMAINS.index(d)) for d in domains
  }
  return {
    "train_all": _take(train, np.arange(len(train["image"]))),
    "train": {d: _take(train, idx) for d, idx in per_domain.items()},
    "test": {d: _take(base["test"][d], slice(None)) for d in domains},
    "heldout": {d: _take(base["test"][d], slice(None)) for d in config.data.heldout_domains},
    "num_classes": base["num_classes"],
    "class_names": base["class_names"],
  }


def _cityscapes_data(config: ml_collections.ConfigDict) -> dict[str, Any]:
  d = config.data
  size = tuple(d.resize)
  train_source, num_classes = catalogue.load("cityscapes", "train", d.data_dir or None)
  val_source, _ = catalogue.load("cityscapes", "validation", d.data_dir or None)
  n_train = min(len(train_source), d.train_images) if d.train_images else len(train_source)
  n_val = min(len(val_source), d.heldout_images) if d.heldout_images else len(val_source)
  arrays = resized_arrays(train_source, range(n_train), size)
  # The M datasets are contiguous chunks of the train split (TFDS keeps city order); the last
  # test_fraction of each chunk is held out.
  train, test = {}, {}
  for j, idx in enumerate(np.array_split(np.arange(n_train), d.num_datasets)):
    n_test = max(1, int(round(d.test_fraction * len(idx))))
    train[f"train_part{j}"] = _take(arrays, idx[:-n_test])
    test[f"train_part{j}"] = _take(arrays, idx[-n_test:])
  return {
    "train_all": {k: np.concatenate([v[k] for v in train.values()]) for k in ("image", "semantic")},
    "train": train,
    "test": test,
    "heldout": {"validation": resized_arrays(val_source, range(n_val), size)},
    "num_classes": num_classes,
    "class_names": catalogue.CITYSCAPES_CLASS_NAMES,
  }


def carve_validation(data: dict[str, Any], per_dataset: int) -> dict[str, Any]:
  """Moves the last ``per_dataset`` training images of each dataset into ``val``.

  At least one training image stays per dataset (fewer are carved from a tiny dataset).
  ``train_all`` is rebuilt from what stays, so no validation image is ever trained on.

  Args:
    data: ``{"train": {name: arrays}, ...}`` as the loaders build it.
    per_dataset: validation images per dataset, >= 1.

  Returns:
    ``data`` with ``train``, ``train_all`` and ``val`` replaced.
  """
  train, val = {}, {}
  for name, arrays in data["train"].items():
    n = len(arrays["image"])
    cut = n - min(per_dataset, n - 1)
    train[name] = _take(arrays, np.arange(cut))
    val[name] = _take(arrays, np.arange(cut, n))
  train_all = {k: np.concatenate([a[k] for a in train.values()]) for k in ("image", "semantic")}
  return {**data, "train": train, "train_all": train_all, "val": val}


def load_uap_data(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The M training datasets, their held-out images and the held-out domain (module doc).

  Args:
    config: the experiment config (``config.data.name`` is ``street_scenes`` or
      ``cityscapes``).

  Returns:
    ``{"train_all": arrays, "train": {name: arrays}, "val": {name: arrays},
    "test": {name: arrays}, "heldout": {name: arrays}, "num_classes": K, "class_names": names}``.
  """
  data = _cityscapes_data(config) if config.data.name == "cityscapes" else _street_data(config)
  return carve_validation(data, int(config.tune.val_per_dataset))
