"""Streaming input pipelines: grain over random-access sources, driven by the index samplers.

A training pipeline is a grain `MapDataset` over *steps*: element `step` is this host's slice
(`samplers.process_slice`) of the global batch `sampler.indices(step)`, read from the source,
passed record by record through a task transform (`data.transforms`) whose random generator
is keyed by (seed, step, position in the global batch), and stacked. Everything is a pure
function of the step, so:

* the iterator state is just the step, which the train state already checkpoints: a killed run
  resumes by starting the pipeline at the restored step, and reaches bit-identical parameters;
* with `transforms.Select` and an in-memory source the batches are exactly those of
  `fit.sampled_batch_fn`, and any source holding the same records gives the same batches;
* each host reads only its slice, and its examples get the same augmentation as on one host.

Worker processes (`grain.MultiprocessingOptions`) each build whole batches (worker k takes
steps start + k, start + k + W, ...) and grain interleaves them back in order; each worker
keeps `prefetch` batches ready. Memory is bounded by the batches in flight, never by the
dataset: sources are read record by record (a TFDS ArrayRecord data source keeps only its
file index in memory).

Sources are any `Sequence` of {feature: array} records: `tfds.data_source(...)` (the embedded
builders' `as_data_source()`), `catalogue.load(...)`, or `ArraySource` for small sets cached in
memory. Evaluation streams a split in order in padded batches with `valid` and `index`, as
`predict.padded_batches` does (`eval_batches`).

An experiment switches from the in-memory path by replacing
`fit.sampled_batch_fn(arrays, sampler, mesh, keys)` with
`streaming_batch_fn(source, sampler, mesh, transform, num_steps=...)` and closing it after `fit`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import flags
from jax.sharding import Mesh

from research.data import samplers, transforms
from research.training import parallel

Transform = Callable[[Mapping, int, "np.random.Generator | None"], dict]
BatchTransform = Callable[[dict], dict]


class ArraySource(Sequence):
  """A random-access source over in-memory arrays: record i is {key: arrays[key][i]}.

  Small embedded sets can be cached this way and streamed through the same pipeline. Worker
  processes each receive a copy, so use it with `workers=0`.

  Args:
    arrays: {feature: [N, ...]}, all of the same length.
  """

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
      raise ValueError(f"arrays={lengths} is not allowed: every feature needs the same length")
    self.arrays = dict(arrays)
    self._length = next(iter(lengths.values()))

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in self.arrays.items()}

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
    return [self[int(i)] for i in indices]


def cache_in_memory(source: Sequence) -> ArraySource:
  """Reads a whole (small) source once into an `ArraySource`."""
  records = read_records(source, np.arange(len(source)))
  return ArraySource({k: np.stack([np.asarray(r[k]) for r in records]) for k in records[0]})


def read_records(source: Sequence, indices: np.ndarray) -> list[Mapping]:
  """The records at `indices`, with one clear error for an out-of-range or unreadable record.

  Args:
    source: a random-access source.
    indices: [n] int record indices.

  Returns:
    n records.

  Raises:
    transforms.InputDataError: naming the first index out of range or that cannot be read
      (a corrupt or truncated record), with the reader's error.
  """
  n = len(source)
  out_of_range = indices[(indices < 0) | (indices >= n)]
  if out_of_range.size:
    raise transforms.input_error(
      int(out_of_range[0]), "the index is outside the source", f"0..{n - 1}"
    )
  ids = [int(i) for i in indices]
  try:
    if hasattr(source, "__getitems__"):
      return list(source.__getitems__(ids))
    return [source[i] for i in ids]
  except Exception as batch_error:  # noqa: BLE001 - find and name the record that fails.
    for i in ids:
      try:
        source[i]
      except Exception as e:  # noqa: BLE001
        raise transforms.input_error(
          i,
          f"the record cannot be read ({type(e).__name__}: {e})",
          "readable records (the file is corrupt or truncated: prepare the dataset again)",
        ) from e
    raise batch_error


def stack(examples: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """[{key: [...]}] * n -> {key: [n, ...]}."""
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


@dataclasses.dataclass(frozen=True)
class TrainBatches:
  """`loader(step)`: this host's slice of the sampler's global batch of `step`, transformed.

  The grain map function of the training pipeline; picklable, so worker processes run it.

  Attributes:
    source: random-access source of records.
    sampler: an index sampler (`indices(step) -> [B]`), e.g. `samplers.RandomSampler`.
    transform: `transform(record, index, rng) -> example` (`data.transforms`).
    seed: augmentation seed; example j of the global batch of `step` uses
      `np.random.default_rng([seed, step, j])`.
    process_index: this host.
    process_count: number of hosts (divides the batch).
    batch_transform: optional `fn(batch) -> batch` applied to the stacked batch (e.g.
      `panoptic.panoptic_targets` bound with `functools.partial`).
  """

  source: Sequence
  sampler: Any
  transform: Transform
  seed: int = 0
  process_index: int = 0
  process_count: int = 1
  batch_transform: BatchTransform | None = None

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    """{key: [B / process_count, ...]} of global step `step`."""
    step = int(step)
    local = samplers.process_slice(
      self.sampler.indices(step), self.process_index, self.process_count
    )
    first = self.process_index * len(local)
    records = read_records(self.source, local)
    examples = [
      self.transform(r, int(i), np.random.default_rng([self.seed, step, first + j]))
      for j, (r, i) in enumerate(zip(records, local, strict=True))
    ]
    batch = stack(examples)
    return self.batch_transform(batch) if self.batch_transform else batch


def _read_options(threads: int, prefetch: int) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch if threads else 0)


def step_dataset(
  loader: Callable[[int], dict],
  start: int,
  stop: int,
  *,
  workers: int = 0,
  threads: int = 0,
  prefetch: int = 2,
) -> grain.IterDataset:
  """The grain pipeline of steps `start .. stop - 1` of a loader, in order.

  Args:
    loader: `loader(step) -> batch` (`TrainBatches`, `EvalBatches`); picklable for workers.
    start: first step.
    stop: one past the last step.
    workers: worker processes (0: batches are built in the calling process).
    threads: reading threads per process (0: none).
    prefetch: batches each worker (or the thread pool) keeps ready.

  Returns:
    an `IterDataset` of batches.
  """
  if workers < 0 or threads < 0 or prefetch < 1:
    raise ValueError(
      f"workers={workers}, threads={threads}, prefetch={prefetch} are not allowed: workers and "
      "threads must be >= 0 and prefetch >= 1"
    )
  if workers and not flags.FLAGS.is_parsed():
    # grain's worker start-up reads its absl flags; outside an absl app (a notebook, pytest)
    # they are unparsed, so their defaults are taken.
    flags.FLAGS.mark_as_parsed()
  ds = grain.MapDataset.range(start, stop).map(loader)
  ds = ds.to_iter_dataset(_read_options(threads, prefetch))
  if workers:
    ds = ds.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=prefetch)
    )
  return ds


class StreamingBatchFn:
  """`batch_fn(step)` for `fit`/`loop.train_loop` over a streaming training pipeline.

  The pipeline's iterator state is the next step. Asked for that step, it returns the next
  prefetched batch; asked for any other step (the first call, a resumed run), it restarts the
  pipeline at that step, so the batch of a step never depends on what was asked before.
  Close it (or use it as a context manager) to stop the worker processes.

  Args:
    loader: `loader(step) -> host batch` (`TrainBatches`).
    num_steps: the phase's total steps (the pipeline ends there).
    place: `fn(host batch) -> device batch` (e.g. `parallel.shard_batch` on a mesh); None
      returns host arrays.
    workers: worker processes.
    threads: reading threads per process.
    prefetch: batches each worker keeps ready.
  """

  def __init__(
    self,
    loader: Callable[[int], dict],
    num_steps: int,
    *,
    place: Callable[[dict], Any] | None = None,
    workers: int = 0,
    threads: int = 0,
    prefetch: int = 2,
  ):
    self.loader = loader
    self.num_steps = num_steps
    self._place = place or (lambda batch: batch)
    self._options = dict(workers=workers, threads=threads, prefetch=prefetch)
    self._iterator = None
    self.next_step: int | None = None

  def __call__(self, step: int) -> Any:
    """The (placed) batch of `step`."""
    if not 0 <= step < self.num_steps:
      raise ValueError(
        f"step={step} is not allowed: the pipeline has steps 0..{self.num_steps - 1}"
      )
    if self._iterator is None or step != self.next_step:
      self.close()
      self._iterator = iter(step_dataset(self.loader, step, self.num_steps, **self._options))
    batch = next(self._iterator)
    self.next_step = step + 1
    return self._place(batch)

  def close(self) -> None:
    """Stops the pipeline's workers (a later call starts it again)."""
    if self._iterator is not None and hasattr(self._iterator, "close"):
      self._iterator.close()
    self._iterator, self.next_step = None, None

  def __enter__(self) -> StreamingBatchFn:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def streaming_batch_fn(
  source: Sequence,
  sampler: Any,
  mesh: Mesh,
  transform: Transform,
  *,
  num_steps: int,
  seed: int = 0,
  batch_transform: BatchTransform | None = None,
  workers: int = 0,
  threads: int = 0,
  prefetch: int = 2,
) -> StreamingBatchFn:
  """The streaming twin of `fit.sampled_batch_fn`: this host's slice, placed on the mesh.

  Args:
    source: random-access source of records.
    sampler: index sampler over the source.
    mesh: the device mesh (`run.mesh`).
    transform: per-record transform (`transforms.Select(keys)` reproduces the in-memory path).
    num_steps: the phase's total steps.
    seed: augmentation seed.
    batch_transform: optional function of the stacked host batch.
    workers: worker processes.
    threads: reading threads per process.
    prefetch: batches each worker keeps ready.

  Returns:
    a `StreamingBatchFn`; pass it as `fit(..., batch_fn=...)` and close it afterwards.
  """
  loader = TrainBatches(
    source,
    sampler,
    transform,
    seed,
    jax.process_index(),
    jax.process_count(),
    batch_transform,
  )
  return StreamingBatchFn(
    loader,
    num_steps,
    place=functools.partial(parallel.shard_batch, mesh=mesh),
    workers=workers,
    threads=threads,
    prefetch=prefetch,
  )


@dataclasses.dataclass(frozen=True)
class EvalBatches:
  """`loader(b)`: this host's slice of padded evaluation batch `b` of a split, in order.

  Global batch b holds split positions b * B .. b * B + B - 1; positions past the end are
  padding rows that repeat the last example (`valid` False), as in `predict.padded_batches`.

  Attributes:
    source: the split.
    batch_size: global batch size B.
    transform: per-record transform, called with rng None (no augmentation).
    process_index: this host.
    process_count: number of hosts (divides B).
  """

  source: Sequence
  batch_size: int
  transform: Transform
  process_index: int = 0
  process_count: int = 1

  def __len__(self) -> int:
    return -(-len(self.source) // self.batch_size)

  def __call__(self, b: int) -> dict[str, np.ndarray]:
    """{key: [B / process_count, ...], "valid": bool, "index": int32} of batch `b`."""
    n = len(self.source)
    positions = np.arange(b * self.batch_size, (b + 1) * self.batch_size)
    local = samplers.process_slice(positions, self.process_index, self.process_count)
    valid = local < n
    idx = np.where(valid, local, n - 1)
    records = read_records(self.source, idx)
    batch = stack([self.transform(r, int(i), None) for r, i in zip(records, idx, strict=True)])
    return {**batch, "valid": valid, "index": idx.astype(np.int32)}


def eval_batches(
  loader: EvalBatches, *, workers: int = 0, threads: int = 0, prefetch: int = 2
) -> Iterator[dict[str, np.ndarray]]:
  """A split streamed in order in padded batches; memory holds a few.

  Args:
    loader: the split, batch size, transform and this host's slice (`EvalBatches`).
    workers: worker processes (0: in this process).
    threads: reader threads per worker.
    prefetch: batches each worker keeps ready.

  Yields:
    {key: [B / process_count, ...], "valid": [B / process_count] bool, "index": [...] int32}.
  """
  iterator = iter(
    step_dataset(loader, 0, len(loader), workers=workers, threads=threads, prefetch=prefetch)
  )
  try:
    yield from iterator
  finally:
    if hasattr(iterator, "close"):
      iterator.close()
