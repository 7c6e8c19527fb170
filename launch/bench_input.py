r"""Streaming input throughput and peak memory, against the segmentation step's consumption.

    python -m launch.bench_input --images=500 --image_size=512 --workers=2

Writes (once, cached under `--data_dir`) a procedural street-scenes ArrayRecord set of
`--images` records of S x 2S pixels (TFDS builder: `image` raw uint8, `semantic` and `panoptic`
zlib-compressed), then streams `--batches` batches of it (the first few are warm-up, see
`stream`) through the segmentation and the panoptic pipelines (`research.data.pipeline`, random
scale 0.5-2 + crop `--crop` + flip) with `--workers` worker processes, and times a jitted
training step of the street `Segmenter` on the same batch shape. It prints a table and merges
one entry per (images, image_size, workers, crop, batch_size) into `--out` (JSON) with, per
pipeline: images/s after the warm-up, seconds to the first batch (worker start-up), peak
resident memory (MB) of this process plus its worker processes (RSS sampled every 20 ms; shared
pages count once per process) and of this process alone, the load average before and after;
and the training step's images/s.

Records are built from a few distinct `street_scenes.generate_scene` scenes (two per record,
side by side, the right one mirrored and its instance ids shifted), so writing N records costs
N copies rather than N scene generations; a child process writes them, so this process's
memory is that of streaming alone. Images are stored raw, so no PNG/JPEG decoding is
timed: the pipeline work is reading, resampling (bilinear image, nearest labels) and stacking.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import multiprocessing
import os
import sys
import threading
import time

import numpy as np
import psutil
import tensorflow_datasets as tfds
from absl import app, flags

from research.data import builders, pipeline, samplers, street_scenes, transforms

_IMAGES = flags.DEFINE_integer("images", 500, "Records N in the generated set.")
_SIZE = flags.DEFINE_integer("image_size", 512, "Image height S (width 2S).")
_WORKERS = flags.DEFINE_integer("workers", 2, "Worker processes of the pipelines.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Images per batch.")
_BATCHES = flags.DEFINE_integer("batches", 30, "Batches streamed per pipeline.")
_CROP = flags.DEFINE_integer("crop", 0, "Side of the square training crop (0: S).")
_PREFETCH = flags.DEFINE_integer("prefetch", 2, "Batches each worker keeps ready.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 3, "Timed training steps (after compiling).")
_DATA_DIR = flags.DEFINE_string(
  "data_dir",
  os.path.join(os.path.expanduser("~"), ".cache", "research", "bench_input"),
  "Where the generated set is cached.",
)
_OUT = flags.DEFINE_string("out", "runs/bench_input.json", "JSON file the entries merge into.")

BASE_SCENES = 24
INSTANCE_SHIFT = 100  # right-half instance ids: + 100 (scenes have fewer than 100 things)


@dataclasses.dataclass
class BenchConfig(tfds.core.BuilderConfig):
  """Size of the generated set.

  Attributes:
    image_size: height S of the S x 2S images.
    num_images: records N.
  """

  image_size: int = 64
  num_images: int = 8


class BenchStreetScenes(tfds.core.GeneratorBasedBuilder):
  """Street-scenes-like S x 2S records: two procedural scenes side by side, one mirrored."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [BenchConfig(name="s64_n8")]

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.image_size
    zlib = tfds.features.Encoding.ZLIB
    features = tfds.features.FeaturesDict(
      {
        "image": tfds.features.Tensor(shape=(s, 2 * s, 3), dtype=np.uint8),
        "semantic": tfds.features.Tensor(shape=(s, 2 * s), dtype=np.uint8, encoding=zlib),
        "panoptic": tfds.features.Tensor(shape=(s, 2 * s), dtype=np.int32, encoding=zlib),
      }
    )
    return tfds.core.DatasetInfo(builder=self, features=features)

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded.
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    cfg = self.builder_config
    count = min(BASE_SCENES, cfg.num_images)
    bases = [
      street_scenes.generate_scene(k, street_scenes.DOMAINS[k % 5], cfg.image_size)
      for k in range(count)
    ]
    for i in range(cfg.num_images):
      left, right = bases[i % count], bases[(7 * i + 3) % count]
      shift = np.where(right["panoptic"] % 1000 > 0, INSTANCE_SHIFT, 0).astype(np.int32)
      shifted = right["panoptic"] + shift
      yield (
        i,
        {
          "image": np.concatenate([left["image"], right["image"][:, ::-1]], axis=1),
          "semantic": np.concatenate([left["semantic"], right["semantic"][:, ::-1]], axis=1),
          "panoptic": np.concatenate([left["panoptic"], shifted[:, ::-1]], axis=1),
        },
      )


def bench_source(num_images: int, image_size: int, data_dir: str):
  """The generated set's train split (written on first use), as a TFDS ArrayRecord source."""
  config = BenchConfig(
    name=f"s{image_size}_n{num_images}", image_size=image_size, num_images=num_images
  )
  builder = builders.prepared_builder(
    lambda: BenchStreetScenes(config=config, data_dir=data_dir, file_format="array_record"),
    data_dir,
  )
  # Read through the builder's files alone, so worker processes need not import this module.
  return tfds.builder_from_directory(str(builder.data_dir)).as_data_source()["train"]


class PeakMemory:
  """Samples the resident memory of this process and its children in a background thread."""

  def __init__(self, interval: float = 0.02):
    self._interval = interval
    self._stop = threading.Event()
    self.peak_total_mb = 0.0
    self.peak_main_mb = 0.0
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self) -> None:
    me = psutil.Process()
    while not self._stop.is_set():
      main = me.memory_info().rss
      total = main
      for child in me.children(recursive=True):
        try:
          total += child.memory_info().rss
        except psutil.NoSuchProcess:
          pass
      self.peak_main_mb = max(self.peak_main_mb, main / 2**20)
      self.peak_total_mb = max(self.peak_total_mb, total / 2**20)
      self._stop.wait(self._interval)

  def __enter__(self) -> PeakMemory:
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._thread.join()


def load() -> list[float]:
  """The 1, 5 and 15 minute load averages (/proc/loadavg)."""
  return [round(x, 2) for x in os.getloadavg()]


def stream(loader, num_batches: int, workers: int, prefetch: int) -> dict:
  """Streams `num_batches` batches of a loader; steady rate, start-up time and peak memory.

  The first `max(workers, 1) * (prefetch + 1)` batches are the warm-up: every worker has
  started and the batches it buffered meanwhile are drained, so the rate over the rest is the
  rate at which the pipeline produces batches.
  """
  warmup = max(workers, 1) * (prefetch + 1)
  if num_batches <= warmup + 1:
    raise ValueError(f"batches={num_batches} is not allowed: it must be > {warmup + 1}")
  before = load()
  with PeakMemory() as memory:
    start = time.perf_counter()
    with pipeline.StreamingBatchFn(loader, num_batches, workers=workers, prefetch=prefetch) as fn:
      first = fn(0)
      started = time.perf_counter()
      for step in range(1, warmup):
        fn(step)
      warm = time.perf_counter()
      for step in range(warmup, num_batches):
        fn(step)
      end = time.perf_counter()
  per_batch = len(first["image"])
  return {
    "images_per_s": round(per_batch * (num_batches - warmup) / (end - warm), 2),
    "first_batch_s": round(started - start, 2),
    "warmup_batches": warmup,
    "peak_rss_mb_with_workers": round(memory.peak_total_mb, 1),
    "peak_rss_mb_main": round(memory.peak_main_mb, 1),
    "batch_shapes": {k: list(v.shape) for k, v in first.items()},
    "load_before": before,
    "load_after": load(),
  }


def train_step_rate(batch: dict, num_steps: int) -> dict:
  """Images/s of the street `Segmenter`'s jitted train step (configs/segmentation_street.py)."""
  import jax
  import optax

  from configs import segmentation_street
  from research.models.resnet import Segmenter
  from research.training import state, steps

  m = segmentation_street.get_config().model
  model = Segmenter(
    street_scenes.NUM_CLASSES, tuple(m.stage_sizes), tuple(m.widths), m.decoder_width
  )
  tx = optax.adam(1e-3)
  params = model.init(jax.random.key(0), batch["image"][:1].astype(np.float32) / 255.0)["params"]
  step = jax.jit(
    functools.partial(
      steps.train_step, loss_fn=functools.partial(steps.segmentation_loss, model=model), tx=tx
    ),
    donate_argnums=0,
  )
  train_state = state.create_train_state(params, tx)
  rng = jax.random.key(1)
  before = load()
  start = time.perf_counter()
  train_state, metrics = step(train_state, batch, rng)
  jax.block_until_ready(metrics)
  compiled = time.perf_counter()
  for _ in range(num_steps):
    train_state, metrics = step(train_state, batch, rng)
  jax.block_until_ready(metrics)
  end = time.perf_counter()
  return {
    "images_per_s": round(len(batch["image"]) * num_steps / (end - compiled), 3),
    "seconds_per_step": round((end - compiled) / num_steps, 2),
    "first_step_with_compile_s": round(compiled - start, 2),
    "devices": [str(d) for d in jax.devices()],
    "load_before": before,
    "load_after": load(),
  }


def _merge(path: str, entry: dict) -> list[dict]:
  entries = []
  if os.path.exists(path):
    with open(path) as f:
      entries = json.load(f)
  key = ("images", "image_size", "workers", "crop", "batch_size")
  entries = [e for e in entries if tuple(e.get(k) for k in key) != tuple(entry[k] for k in key)]
  entries.append(entry)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(entries, f, indent=2)
  return entries


def main(argv):
  """Prepares or opens the set, streams both pipelines, times the step, writes the JSON."""
  del argv
  n, s, b = _IMAGES.value, _SIZE.value, _BATCH.value
  crop = _CROP.value or s
  started = time.perf_counter()
  # Written in a child process, so the generator's memory is not part of this one's peak.
  writer = multiprocessing.get_context("spawn").Process(
    target=bench_source, args=(n, s, _DATA_DIR.value)
  )
  writer.start()
  writer.join()
  if writer.exitcode:
    raise RuntimeError(f"writing the benchmark set failed (exit code {writer.exitcode})")
  source = bench_source(n, s, _DATA_DIR.value)
  prepare_s = time.perf_counter() - started
  files = [os.path.join(dp, f) for dp, _, fs in os.walk(_DATA_DIR.value) for f in fs]
  pipelines = {
    "segmentation": transforms.SegmentationTransform(street_scenes.NUM_CLASSES, crop),
    "panoptic": transforms.PanopticTransform(street_scenes.NUM_CLASSES, crop, max_segments=64),
  }
  results = {}
  for name, transform in pipelines.items():
    sampler = samplers.RandomSampler(n, b, seed=0)
    loader = pipeline.TrainBatches(source, sampler, transform, seed=0)
    results[name] = stream(loader, _BATCHES.value, _WORKERS.value, _PREFETCH.value)
  batch = pipeline.TrainBatches(
    source, samplers.RandomSampler(n, b, seed=0), pipelines["segmentation"]
  )(0)
  results["segmentation_train_step"] = train_step_rate(batch, _TRAIN_STEPS.value)
  entry = {
    "command": "python -m launch.bench_input " + " ".join(sys.argv[1:]),
    "images": n,
    "image_size": s,
    "image_shape": [s, 2 * s, 3],
    "workers": _WORKERS.value,
    "crop": crop,
    "batch_size": b,
    "batches": _BATCHES.value,
    "prepare_or_open_s": round(prepare_s, 1),
    "cache_bytes_all_sets": sum(os.path.getsize(f) for f in files),
    "cores": os.cpu_count(),
    **results,
  }
  _merge(_OUT.value, entry)
  rows = [
    (k, r["images_per_s"], r.get("peak_rss_mb_with_workers", ""), r["load_before"][0])
    for k, r in results.items()
  ]
  print(f"N={n} S={s} ({s}x{2 * s}) crop={crop} batch={b} workers={_WORKERS.value}")
  print(f"{'pipeline':<26}{'images/s':>10}{'peak MB':>10}{'load1':>8}")
  for row in rows:
    print(f"{row[0]:<26}{row[1]:>10}{row[2]:>10}{row[3]:>8}")
  print(f"merged into {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
