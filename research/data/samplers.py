"""Index samplers: deterministic per (seed, step), so a resumed run draws the same batches.

Every sampler is a pure function of the step: `indices(step) -> [global_batch]` int64 indices
into the dataset, computed from `np.random.default_rng([seed, ...])`. Nothing is carried
between steps, which is what lets a run killed at any step resume exactly.
`process_slice` shards a global batch across hosts.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def process_slice(indices: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
  """The contiguous part of a global batch that one host loads.

  Args:
    indices: [global_batch] indices.
    process_index: this host's index (`jax.process_index()`).
    process_count: number of hosts (`jax.process_count()`); must divide the batch.

  Returns:
    [global_batch // process_count] indices.
  """
  if len(indices) % process_count:
    raise ValueError(
      f"batch_size={len(indices)} is not divisible by process_count={process_count}: use a "
      "multiple of the number of hosts"
    )
  per = len(indices) // process_count
  return indices[process_index * per : (process_index + 1) * per]


def _check_positive(name: str, value: int) -> None:
  if not isinstance(value, int | np.integer) or value <= 0:
    raise ValueError(f"{name}={value!r} is not allowed: it must be a positive integer")


@dataclasses.dataclass(frozen=True)
class RandomSampler:
  """Epoch-wise shuffling without replacement; the last partial batch of an epoch wraps.

  Attributes:
    num_examples: dataset size N.
    batch_size: global batch size B.
    seed: sampler seed.
  """

  num_examples: int
  batch_size: int
  seed: int = 0

  def __post_init__(self):
    _check_positive("num_examples", self.num_examples)
    _check_positive("batch_size", self.batch_size)

  def _epoch(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

  def indices(self, step: int) -> np.ndarray:
    """[B] indices of global step `step` (continuing through epochs)."""
    start = step * self.batch_size
    positions = np.arange(start, start + self.batch_size)
    epochs, offsets = np.divmod(positions, self.num_examples)
    out = np.empty(self.batch_size, np.int64)
    for epoch in np.unique(epochs):
      sel = epochs == epoch
      out[sel] = self._epoch(int(epoch))[offsets[sel]]
    return out


def _class_members(labels: np.ndarray, num_classes: int | None) -> list[np.ndarray]:
  labels = np.asarray(labels)
  num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
  members = [np.flatnonzero(labels == c) for c in range(num_classes)]
  empty = [c for c, m in enumerate(members) if len(m) == 0]
  if empty:
    raise ValueError(
      f"labels has empty classes {empty}: every class in range({num_classes}) needs at least "
      "one example (pass num_classes to match the data)"
    )
  return members


@dataclasses.dataclass(frozen=True)
class ClassBalancedSampler:
  """Each example's class is drawn uniformly, then an example of it uniformly (with replacement).

  Attributes:
    labels: [N] int labels.
    batch_size: global batch size B.
    seed: sampler seed.
    num_classes: number of classes; every class must have examples.
  """

  labels: np.ndarray
  batch_size: int
  seed: int = 0
  num_classes: int | None = None

  def __post_init__(self):
    _check_positive("batch_size", self.batch_size)
    object.__setattr__(self, "_members", _class_members(self.labels, self.num_classes))

  def indices(self, step: int) -> np.ndarray:
    """[B] indices of step `step`."""
    rng = np.random.default_rng([self.seed, step])
    members = self._members
    classes = rng.integers(0, len(members), self.batch_size)
    return np.array([members[c][rng.integers(len(members[c]))] for c in classes], np.int64)


@dataclasses.dataclass(frozen=True)
class PKSampler:
  """P classes x K examples per batch (Hermans et al. 2017), as used by triplet losses.

  Classes are drawn without replacement; within a class, K examples are drawn without
  replacement when the class has at least K, otherwise with replacement (METHODS.md M3
  step 3), unless `allow_replacement=False`, which then rejects such classes up front.

  Attributes:
    labels: [N] int labels.
    p: classes per batch (<= number of classes).
    k: examples per class.
    seed: sampler seed.
    num_classes: number of classes; every class must have examples.
    allow_replacement: whether classes smaller than K may repeat examples.
  """

  labels: np.ndarray
  p: int
  k: int
  seed: int = 0
  num_classes: int | None = None
  allow_replacement: bool = True

  def __post_init__(self):
    _check_positive("p", self.p)
    _check_positive("k", self.k)
    members = _class_members(self.labels, self.num_classes)
    if self.p > len(members):
      raise ValueError(
        f"p={self.p} is not allowed: it must be <= the number of classes ({len(members)})"
      )
    if not self.allow_replacement:
      small = min(len(m) for m in members)
      if small < self.k:
        raise ValueError(
          f"k={self.k} is larger than the smallest class ({small} examples) while "
          "allow_replacement=False: lower k or allow replacement"
        )
    object.__setattr__(self, "_members", members)

  @property
  def batch_size(self) -> int:
    """P * K."""
    return self.p * self.k

  def indices(self, step: int) -> np.ndarray:
    """[P * K] indices of step `step`, grouped class by class."""
    rng = np.random.default_rng([self.seed, step])
    classes = rng.choice(len(self._members), self.p, replace=False)
    out = []
    for c in classes:
      m = self._members[c]
      out.append(rng.choice(m, self.k, replace=len(m) < self.k))
    return np.concatenate(out).astype(np.int64)
