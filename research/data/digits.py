"""The real handwritten digits shipped inside scikit-learn, with long-tailed training subsets.

`sklearn.datasets.load_digits` holds 1,797 8x8 grey images (values 0..16) of 10 classes,
read from scikit-learn's own package data: nothing is downloaded. A fixed, class-balanced
test split (`TEST_PER_CLASS` per class, chosen with seed 0) is held out; the rest is the
training split.
"""

from __future__ import annotations

import numpy as np

NUM_CLASSES = 10
CLASS_NAMES = tuple(str(i) for i in range(NUM_CLASSES))
TEST_PER_CLASS = 50
IMAGE_SHAPE = (8, 8, 1)


def load_digits_arrays() -> dict[str, dict[str, np.ndarray]]:
  """Loads the digits and splits them into a balanced test split and a training split.

  Returns:
    {"train": {"image": [N, 8, 8, 1] uint8, "label": [N] int64},
     "test": {...}} with 500 test images (50 per class) and 1,297 training images.
  """
  from sklearn.datasets import load_digits

  bunch = load_digits()
  images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = bunch.target.astype(np.int64)
  rng = np.random.default_rng(0)
  test_idx = np.concatenate(
    [rng.permutation(np.flatnonzero(labels == c))[:TEST_PER_CLASS] for c in range(NUM_CLASSES)]
  )
  is_test = np.zeros(len(labels), bool)
  is_test[test_idx] = True
  return {
    "train": {"image": images[~is_test], "label": labels[~is_test]},
    "test": {"image": images[is_test], "label": labels[is_test]},
  }


def long_tailed_counts(n_max: int, num_classes: int, imbalance_ratio: float) -> np.ndarray:
  """Per-class counts of the exponential profile `n_i = floor(n_max * rho^(-i / (C - 1)))`.

  This is the profile of Cao et al. (2019) and Menon et al.'s logit-adjustment code, so that
  CIFAR-LT numbers compare with theirs.

  Args:
    n_max: count of the largest (first) class.
    num_classes: C.
    imbalance_ratio: rho = n_max / n_min, >= 1.

  Returns:
    [C] int64 counts, non-increasing, first n_max, last about n_max / rho.
  """
  if imbalance_ratio < 1:
    raise ValueError(f"imbalance_ratio={imbalance_ratio} is not allowed: it must be >= 1")
  if n_max < 1:
    raise ValueError(f"n_max={n_max} is not allowed: it must be >= 1")
  i = np.arange(num_classes)
  counts = np.floor(n_max * imbalance_ratio ** (-i / max(num_classes - 1, 1)))
  return np.maximum(counts, 1).astype(np.int64)


def long_tailed_indices(
  labels: np.ndarray, imbalance_ratio: float, n_max: int | None = None, seed: int = 0
) -> np.ndarray:
  """Indices of a long-tailed subset: per class, shuffled with `seed`, first n_i kept.

  Args:
    labels: [N] int class labels of the balanced training set.
    imbalance_ratio: rho = n_max / n_min.
    n_max: count of class 0; defaults to the smallest class size (so every class can give n_i).
    seed: seed of the per-class shuffles (0 in Menon et al.'s code).

  Returns:
    sorted [sum n_i] int64 indices into `labels`.
  """
  classes = np.unique(labels)
  sizes = np.array([(labels == c).sum() for c in classes])
  n_max = int(sizes.min()) if n_max is None else n_max
  counts = long_tailed_counts(n_max, len(classes), imbalance_ratio)
  if np.any(counts > sizes):
    raise ValueError(
      f"n_max={n_max} is too large: class sizes are {sizes.tolist()}, so n_max must be <= "
      f"{int(sizes.min())}"
    )
  rng = np.random.default_rng(seed)
  keep = [rng.permutation(np.flatnonzero(labels == c))[:n] for c, n in zip(classes, counts)]
  return np.sort(np.concatenate(keep))
