"""Streaming pipelines: the in-memory path's batches, resume by step, host slices, workers."""

import os
import shutil

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from research.data import builders, embedded, pipeline, samplers, transforms
from research.training import fit, parallel

RNG = np.random.default_rng(0)
N = 40
ARRAYS = {
  "image": RNG.integers(0, 256, (N, 12, 20, 3), dtype=np.uint8),
  "semantic": RNG.integers(0, 9, (N, 12, 20), dtype=np.uint8),
  "label": RNG.integers(0, 5, N).astype(np.int64),
}
SEG = transforms.SegmentationTransform(9, (8, 10), scale_range=(0.5, 2.0))


def _equal(a: dict, b: dict) -> None:
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(np.asarray(jax.device_get(a[k])), np.asarray(b[k]), err_msg=k)


@pytest.mark.parametrize(
  "sampler",
  [
    samplers.RandomSampler(N, 16, seed=3),
    samplers.ClassBalancedSampler(ARRAYS["label"], 16, seed=4),
    samplers.PKSampler(ARRAYS["label"], p=4, k=4, seed=5),
  ],
  ids=["random", "class_balanced", "pk"],
)
def test_select_streams_exactly_the_in_memory_batches(sampler):
  mesh = parallel.data_mesh()
  keys = ("image", "label")
  in_memory = fit.sampled_batch_fn(ARRAYS, sampler, mesh, keys)
  source = pipeline.ArraySource(ARRAYS)
  with pipeline.streaming_batch_fn(
    source, sampler, mesh, transforms.Select(keys), num_steps=6
  ) as streaming:
    for step in range(6):
      _equal(streaming(step), {k: jax.device_get(v) for k, v in in_memory(step).items()})


def test_a_tfds_array_record_source_gives_the_batches_of_its_arrays():
  source = builders.digits_builder().as_data_source()["train"]
  arrays = embedded.to_arrays(source)
  sampler = samplers.RandomSampler(len(source), 16, seed=1)
  loader = pipeline.TrainBatches(source, sampler, transforms.Select(("image", "label")))
  cached = pipeline.TrainBatches(
    pipeline.cache_in_memory(source), sampler, transforms.Select(("image", "label"))
  )
  for step in (0, 81, 82):  # 81 * 16 = 1296 < 1297: step 81 wraps into the next epoch
    idx = sampler.indices(step)
    _equal(loader(step), {"image": arrays["image"][idx], "label": arrays["label"][idx]})
    _equal(cached(step), loader(step))


def test_batches_depend_only_on_the_step_so_a_restart_resumes_exactly():
  sampler = samplers.RandomSampler(N, 8, seed=2)
  loader = pipeline.TrainBatches(pipeline.ArraySource(ARRAYS), sampler, SEG, seed=7)
  with pipeline.StreamingBatchFn(loader, 8) as uninterrupted:
    expected = [uninterrupted(s) for s in range(8)]
  with pipeline.StreamingBatchFn(loader, 8) as resumed:
    got = [resumed(s) for s in range(5, 8)]  # a run restored at step 5
    assert resumed.next_step == 8
    again = resumed(2)  # out of order: the pipeline restarts there
  for e, g in zip(expected[5:], got):
    _equal(g, e)
  _equal(again, expected[2])
  # Augmentation differs between steps and between examples, and with the seed.
  assert not np.array_equal(expected[0]["image"], expected[1]["image"])
  other_seed = pipeline.TrainBatches(pipeline.ArraySource(ARRAYS), sampler, SEG, seed=8)(0)
  assert not np.array_equal(other_seed["image"], expected[0]["image"])


def test_each_host_reads_only_its_slice_and_augments_it_as_one_host_would():
  sampler = samplers.RandomSampler(N, 8, seed=2)
  read = {0: [], 1: []}

  class Recording(pipeline.ArraySource):
    def __init__(self, arrays, log):
      super().__init__(arrays)
      self.log = log

    def __getitems__(self, indices):
      self.log.extend(indices)
      return super().__getitems__(indices)

  hosts = [pipeline.TrainBatches(Recording(ARRAYS, read[p]), sampler, SEG, 7, p, 2) for p in (0, 1)]
  one = pipeline.TrainBatches(pipeline.ArraySource(ARRAYS), sampler, SEG, 7)
  for step in range(3):
    parts = [h(step) for h in hosts]
    _equal({k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, one(step))
  for p in (0, 1):
    expected = [samplers.process_slice(sampler.indices(s), p, 2) for s in range(3)]
    assert read[p] == list(np.concatenate(expected))


def test_worker_processes_give_the_same_batches_in_order():
  source = builders.digits_builder().as_data_source()["train"]
  sampler = samplers.RandomSampler(len(source), 8, seed=1)
  crop = transforms.ClassificationTransform(10, 6, padding=1)
  loader = pipeline.TrainBatches(source, sampler, crop, seed=3)
  with pipeline.StreamingBatchFn(loader, 5, workers=2, prefetch=1) as streaming:
    got = [streaming(s) for s in range(1, 5)]
  for step, batch in zip(range(1, 5), got):
    _equal(batch, loader(step))


@pytest.mark.parametrize("batch_size,process_count", [(8, 1), (16, 1), (8, 2)])
def test_eval_batches_match_padded_batches(batch_size, process_count):
  from research.training import predict

  n = 21
  arrays = {k: v[:n] for k, v in ARRAYS.items()}
  keys = ("image", "semantic")
  expected = list(predict.padded_batches(arrays, batch_size, keys))
  hosts = [
    list(
      pipeline.eval_batches(
        pipeline.EvalBatches(
          pipeline.ArraySource(arrays), batch_size, transforms.Select(keys), p, process_count
        )
      )
    )
    for p in range(process_count)
  ]
  assert all(len(h) == len(expected) for h in hosts)
  for b, e in enumerate(expected):
    _equal({k: np.concatenate([h[b][k] for h in hosts]) for k in e}, e)


def _corrupted_digits(tmp_path, how: str):
  """A copy of the prepared digits whose train file is overwritten mid-way or truncated."""
  prepared = builders.digits_builder()
  target = tmp_path / "digits" / str(prepared.version)
  shutil.copytree(prepared.data_dir, target)
  path = next(p for p in target.iterdir() if "train.array_record" in p.name)
  data = bytearray(path.read_bytes())
  if how == "overwritten":
    data[len(data) // 2 : len(data) // 2 + 200] = bytes(200)
  else:
    data = data[: len(data) // 2]
  path.write_bytes(bytes(data))
  return tfds.builder_from_directory(os.fspath(target)).as_data_source()["train"]


@pytest.mark.parametrize("how", ["overwritten", "truncated"])
def test_a_corrupt_or_truncated_record_fails_naming_its_index(tmp_path, how):
  source = _corrupted_digits(tmp_path, how)
  readable = []
  for i in range(len(source)):
    try:
      source[i]
      readable.append(i)
    except Exception:  # noqa: BLE001 - the reference: which records the reader rejects.
      break
  bad = len(readable)
  assert bad < len(source)
  with pytest.raises(transforms.InputDataError, match=rf"^record {bad}: the record cannot be read"):
    pipeline.read_records(source, np.array(sorted({0, bad})))


def test_an_index_outside_the_source_fails_naming_it():
  with pytest.raises(transforms.InputDataError, match=r"record 40: .* allowed: 0\.\.39"):
    pipeline.read_records(pipeline.ArraySource(ARRAYS), np.array([3, 40]))
