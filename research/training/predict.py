"""`predict(...)`: a jitted function over a whole split in padded batches, padding masked.

The last batch of a split is padded to the batch size by repeating its last example. Every
batch handed to the function carries `valid` ([B] bool, False on padding rows) and `index`
([B] int32, the example's position in the split; padding rows repeat the last index), so the
function can keep padding rows out of anything that mixes examples (a transport problem, a
summed confusion matrix) and key per-example randomness by image rather than by batch. The
per-example outputs returned have the padding rows removed, so no consumer can count one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from research.training import parallel
from research.training.progress import Progress


def padded_batches(
  arrays: dict[str, np.ndarray], batch_size: int, keys: Sequence[str]
) -> Iterator[dict[str, np.ndarray]]:
  """Fixed-size batches in order, with `valid` and `index` (see the module docstring).

  Args:
    arrays: the split as {feature: [N, ...]}.
    batch_size: B.
    keys: features to put in each batch.

  Yields:
    {key: [B, ...], "valid": [B] bool, "index": [B] int32}.
  """
  n = len(arrays[keys[0]])
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size)
    valid = idx < n
    idx = np.where(valid, idx, n - 1)
    yield {**{k: arrays[k][idx] for k in keys}, "valid": valid, "index": idx.astype(np.int32)}


@dataclasses.dataclass(frozen=True)
class Predictions:
  """The outputs of `predict` over one split.

  Attributes:
    per_example: {name: [N, ...]} for each name in `collect`, padding rows removed.
    totals: {name: summed value} for each name in `sum_over_batches` (the function must mask
      padding rows itself, with `batch["valid"]`).
    num_examples: N.
    num_padding: padding rows that were fed to the function and dropped.
  """

  per_example: dict[str, np.ndarray]
  totals: dict[str, np.ndarray]
  num_examples: int
  num_padding: int

  def __getitem__(self, name: str) -> np.ndarray:
    if name in self.per_example:
      return self.per_example[name]
    return self.totals[name]


def predict(
  fn: Callable[[Any, dict], dict],
  params: Any,
  arrays: dict[str, np.ndarray],
  *,
  batch_size: int,
  mesh: Mesh,
  keys: Sequence[str],
  collect: Sequence[str] = (),
  sum_over_batches: Sequence[str] = (),
  name: str = "predict",
) -> Predictions:
  """Runs a compiled `fn(params, batch) -> {name: array}` over a whole split.

  Args:
    fn: jitted; its batch has the `keys` plus `valid` and `index` (module docstring).
    params: parameters (replicated on the mesh) or any pytree `fn` takes first.
    arrays: the split as {feature: [N, ...]}.
    batch_size: eval batch size (a multiple of the device count).
    mesh: the device mesh.
    keys: features fed to `fn`.
    collect: per-example outputs ([B, ...]) to gather, padding rows dropped.
    sum_over_batches: outputs summed over batches (e.g. a confusion matrix).
    name: tag of the progress lines (logged every few seconds when the split takes longer).

  Returns:
    the `Predictions`.
  """
  parallel.check_batch_divisible(batch_size, mesh, f"{name} batch size")
  n = len(arrays[keys[0]])
  num_batches = -(-n // batch_size)
  progress = Progress(num_batches, 0, batch_size, name, unit="batch")
  gathered: dict[str, list] = {k: [] for k in collect}
  totals: dict[str, Any] = {}
  for b, batch in enumerate(padded_batches(arrays, batch_size, keys)):
    out = fn(params, parallel.shard_batch(batch, mesh))
    valid = batch["valid"]
    for k in collect:
      gathered[k].append(np.asarray(jax.device_get(out[k]))[valid])
    for k in sum_over_batches:
      v = np.asarray(jax.device_get(out[k]))
      v = v.astype(np.int64) if np.issubdtype(v.dtype, np.integer) else v
      totals[k] = v if k not in totals else totals[k] + v
    if b == 0:
      progress.restart_clock(1)  # the first batch compiles; the rate counts the rest
    else:
      progress.maybe_log(b + 1)
  per_example = {k: np.concatenate(v) for k, v in gathered.items()}
  return Predictions(per_example, totals, n, num_batches * batch_size - n)
