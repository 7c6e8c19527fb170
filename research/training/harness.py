"""Pieces every experiment's `train_and_evaluate` shares: set-up, batching, evaluation, summary."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from research.data import samplers
from research.training import parallel
from research.training.checkpoint import Checkpointer
from research.training.progress import MetricWriter


@dataclasses.dataclass
class Run:
  """The per-run context: workdir, mesh, metric writer and checkpointer.

  Attributes:
    workdir: the run's output directory.
    mesh: the data-parallel device mesh.
    writer: JSON-lines metric writer (`metrics.jsonl`).
    started: wall-clock start time.
  """

  workdir: str
  mesh: Mesh
  writer: MetricWriter
  started: float

  def checkpointer(self, name: str = "checkpoints") -> Checkpointer:
    """A checkpointer under `<workdir>/<name>` (one per training phase)."""
    return Checkpointer(os.path.join(self.workdir, name))

  def plot_path(self, name: str) -> str:
    """`<workdir>/plots/<name>`."""
    return os.path.join(self.workdir, "plots", name)

  def elapsed(self) -> float:
    """Seconds since the run started."""
    return time.perf_counter() - self.started


def start_run(workdir: str) -> Run:
  """Creates the workdir and the run context over all devices."""
  os.makedirs(workdir, exist_ok=True)
  return Run(workdir, parallel.data_mesh(), MetricWriter(workdir), time.perf_counter())


@functools.lru_cache(maxsize=32)
def _jitted_init(model: nn.Module) -> Callable:
  """One compiled `model.init` per (hashable) module configuration."""
  return jax.jit(model.init)


def init_params(model: nn.Module, rng: jax.Array, sample_image: np.ndarray) -> Any:
  """Initial parameters from one example image ([H, W, C] uint8); compiled once per model."""
  x = jnp.zeros((1,) + sample_image.shape, jnp.float32)
  return _jitted_init(model)(rng, x)["params"]


def sampled_batch_fn(
  arrays: dict[str, np.ndarray], sampler: Any, mesh: Mesh, keys: Sequence[str]
) -> Callable[[int], dict]:
  """`batch_fn(step)`: this host's slice of the sampler's global batch, placed on the mesh."""

  def batch_fn(step: int) -> dict:
    idx = samplers.process_slice(sampler.indices(step), jax.process_index(), jax.process_count())
    return parallel.shard_batch({k: arrays[k][idx] for k in keys}, mesh)

  return batch_fn


def padded_batches(
  arrays: dict[str, np.ndarray], batch_size: int, keys: Sequence[str]
) -> Iterator[dict[str, np.ndarray]]:
  """Fixed-size batches in order; the last is padded and `valid` marks the real examples."""
  n = len(arrays[keys[0]])
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size)
    valid = idx < n
    idx = np.where(valid, idx, n - 1)
    yield {**{k: arrays[k][idx] for k in keys}, "valid": valid}


def evaluate(
  eval_step: Callable,
  params: Any,
  arrays: dict[str, np.ndarray],
  batch_size: int,
  mesh: Mesh,
  keys: Sequence[str],
  collect: Sequence[str] = (),
) -> dict[str, np.ndarray]:
  """Runs a compiled `eval_step(params, batch)` over a whole split.

  Args:
    eval_step: returns a dict with `confusion` [K, K] and the per-example outputs in `collect`.
    params: parameters (replicated on the mesh).
    arrays: the split as {feature: [N, ...]}.
    batch_size: eval batch size (a multiple of the device count).
    mesh: the device mesh.
    keys: features fed to the step.
    collect: per-example outputs to gather (padding removed).

  Returns:
    {"confusion": summed [K, K] int64, **{name: [N, ...]} for name in collect}.
  """
  confusion = None
  gathered: dict[str, list] = {k: [] for k in collect}
  for batch in padded_batches(arrays, batch_size, keys):
    valid = batch["valid"]
    out = eval_step(params, parallel.shard_batch(batch, mesh))
    c = np.asarray(jax.device_get(out["confusion"]), np.int64)
    confusion = c if confusion is None else confusion + c
    for k in collect:
      gathered[k].append(np.asarray(jax.device_get(out[k]))[valid])
  return {"confusion": confusion, **{k: np.concatenate(v) for k, v in gathered.items()}}


def write_summary(workdir: str, summary: dict) -> str:
  """Writes `<workdir>/summary.json` (what the demo's table is built from)."""
  path = os.path.join(workdir, "summary.json")
  with open(path, "w") as f:
    json.dump(summary, f, indent=2, default=float)
  return path


def summary_row(metric: str, value: float, baseline: str, baseline_value: float) -> dict:
  """One row of the demo table: a metric of the method against a named baseline."""
  return {
    "metric": metric,
    "value": float(value),
    "baseline": baseline,
    "baseline_value": float(baseline_value),
  }
