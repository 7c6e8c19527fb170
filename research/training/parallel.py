"""Data-parallel execution over a device mesh, and multi-host start-up.

Parameters are replicated and batches are split along the mesh axis `data`; `jax.jit` inserts
the gradient all-reduce. The same code runs on one CPU, 8 fake CPU devices, a GPU or a TPU
slice. With several hosts, each loads its own slice of the global batch
(`samplers.process_slice`) and `shard_batch` assembles the global array.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def initialize_distributed(enabled: bool) -> None:
  """Calls `jax.distributed.initialize()` (multi-host TPU/GPU); first thing in `main`."""
  if enabled:
    jax.distributed.initialize()


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named `data` over the given devices (default: all devices)."""
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding that keeps a full copy on every device."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Sharding that splits the leading (batch) axis across the `data` axis."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_divisible(batch_size: int, mesh: Mesh, field: str = "batch_size") -> None:
  """Fails with a clear message when the global batch does not split evenly over devices."""
  if batch_size % mesh.size:
    raise ValueError(
      f"{field}={batch_size} is not divisible by the {mesh.size} devices: use a multiple of "
      f"{mesh.size}"
    )


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Places this host's part of a batch on the mesh as one global, batch-sharded array each."""
  sharding = batch_sharded(mesh)
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
  }


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Copies a pytree to every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))


def compile_train_step(step_fn: Callable, mesh: Mesh) -> Callable:
  """`jax.jit` of `step(state, batch, rng)` with the state donated and outputs replicated."""
  rep = replicated(mesh)
  return jax.jit(step_fn, donate_argnums=0, out_shardings=(rep, rep))


def compile_eval_step(eval_fn: Callable) -> Callable:
  """`jax.jit` of `eval(params, batch)`; shardings follow the inputs."""
  return jax.jit(eval_fn)
