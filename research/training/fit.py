"""One training phase, end to end: `fit(...)`; and the per-run context every experiment shares.

`fit` builds the replicated train state, restores the newest checkpoint of the phase (or
starts fresh), runs the shared loop (`loop.train_loop`) with progress, JSON-lines metrics,
checkpoints and an optional stop hook, and returns how the phase ended. Every experiment and
both supervised baselines train through it, so resume, non-finite stops and early stopping
behave the same everywhere.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from jax.sharding import Mesh

from research.data import samplers
from research.study import tables
from research.training import loop, parallel, state
from research.training.checkpoint import Checkpointer
from research.training.progress import MetricWriter

FINGERPRINT_BLOCKS = ("model", "optim")


def config_fingerprint(config: Any) -> dict[str, str]:
  """Short hashes of the config blocks that define what a phase trains (`FINGERPRINT_BLOCKS`).

  A checkpoint written under another model or optimizer setting (a changed learning rate
  included, which leaves the state's structure alone) is then refused on resume as another
  run's, while longer training, more seeds or another evaluation batch size still resume.
  """
  out = {}
  for block in FINGERPRINT_BLOCKS:
    if block in config:
      text = json.dumps(config[block].to_dict(), sort_keys=True, default=str)
      out[f"{block}_hash"] = hashlib.sha256(text.encode()).hexdigest()[:16]
  return out


@dataclasses.dataclass
class Run:
  """The per-run context: workdir, mesh, metric writer, start time and config fingerprint.

  Attributes:
    workdir: the run's output directory (any `etils.epath` location).
    mesh: the data-parallel device mesh.
    writer: JSON-lines metric writer (`metrics.jsonl`) and TensorBoard events, on process 0.
    started: wall-clock start time.
    fingerprint: saved with every checkpoint and compared on restore (`config_fingerprint`).
  """

  workdir: epath.PathLike
  mesh: Mesh
  writer: MetricWriter
  started: float
  fingerprint: dict[str, str] = dataclasses.field(default_factory=dict)

  def checkpointer(self, name: str = "checkpoints") -> Checkpointer:
    """A checkpointer under `<workdir>/<name>` (one per training phase)."""
    return Checkpointer(
      str(epath.Path(self.workdir) / name), fingerprint={"phase": name, **self.fingerprint}
    )

  def plot_path(self, name: str) -> str:
    """`<workdir>/plots/<name>`."""
    return tables.plot_path(self.workdir, name)

  def elapsed(self) -> float:
    """Seconds since the run started."""
    return time.perf_counter() - self.started


def start_run(workdir: epath.PathLike, config: Any = None) -> Run:
  """Creates the workdir and the run context over all devices.

  Args:
    workdir: the run's output directory (any `etils.epath` location, e.g. `gs://...`).
    config: the experiment's ConfigDict; its model and optimizer blocks fingerprint every
      checkpoint (`config_fingerprint`). None: checkpoints carry only their phase name.
  """
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  writer = MetricWriter(workdir, primary=jax.process_index() == 0)
  fingerprint = config_fingerprint(config) if config is not None else {}
  return Run(workdir, parallel.data_mesh(), writer, time.perf_counter(), fingerprint)


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


@dataclasses.dataclass(frozen=True)
class Phase:
  """How long one training phase runs and how it logs and checkpoints.

  Attributes:
    name: tag of its metrics and progress lines; its checkpoints go to
      `<workdir>/<name>_checkpoints`.
    steps: total updates.
    log_every: metrics are averaged and written (and the stop hook asked) every this many steps.
    checkpoint_every: save every this many steps (0: only at the end).
    examples_per_step: images per update, for the examples/s rate.
  """

  name: str
  steps: int
  log_every: int
  checkpoint_every: int
  examples_per_step: int

  def loop_options(self) -> dict[str, Any]:
    """The keyword arguments of `loop.train_loop` that this phase sets."""
    return dict(
      num_steps=self.steps,
      checkpoint_every=self.checkpoint_every,
      log_every=self.log_every,
      examples_per_step=self.examples_per_step,
      name=self.name,
    )

  @classmethod
  def from_train_config(cls, name: str, train: Any, examples_per_step: int | None = None):
    """The phase of a config's `train` block (`steps`, `log_every`, `checkpoint_every`)."""
    return cls(
      name,
      int(train.steps),
      int(train.log_every),
      int(train.checkpoint_every),
      int(train.batch_size if examples_per_step is None else examples_per_step),
    )


@dataclasses.dataclass(frozen=True)
class FitResult:
  """What one training phase produced.

  Attributes:
    state: the final (replicated) `TrainState`.
    steps: updates applied in all.
    stop_reason: `step_limit` or the stop hook's reason.
    extras: the host-side extras of the checkpoint it resumed from ({} for a fresh start).
  """

  state: state.TrainState
  steps: int
  stop_reason: str
  extras: dict

  @property
  def params(self) -> Any:
    """The final parameters."""
    return self.state.params


def fit(
  run: Run,
  phase: Phase,
  *,
  params: Any,
  tx: optax.GradientTransformation,
  step_fn: Callable,
  batch_fn: Callable[[int], dict],
  rng: jax.Array,
  should_stop: loop.StopHook | None = None,
  extras_fn: Callable[[], dict] | None = None,
  on_step_end: Callable[[int], None] | None = None,
) -> FitResult:
  """Runs one training phase with resume; the shared trainer of every experiment.

  Args:
    run: the run context (mesh, workdir, metric writer).
    phase: the phase's name, length, logging and checkpointing.
    params: initial parameters (used when no checkpoint of the phase exists).
    tx: the optimizer.
    step_fn: compiled `step(state, batch, rng) -> (state, metrics)` (see
      `parallel.compile_train_step`).
    batch_fn: `batch_fn(step)` -> device batch; must depend only on the step.
    rng: the loop's key (the step function folds in the step).
    should_stop: optional stop hook, see `loop.train_loop`; a phase that stopped this way is
      not trained further when the run is started again.
    extras_fn: host-side JSON extras saved with each checkpoint.
    on_step_end: called with the completed step count (tests inject faults here).

  Returns:
    the `FitResult`.
  """
  train_state = parallel.replicate(state.create_train_state(params, tx), run.mesh)
  checkpointer = run.checkpointer(f"{phase.name}_checkpoints")
  try:
    train_state, extras = loop.restore_or_init(checkpointer, train_state)
    if loop.STOP_REASON in extras:
      steps = int(jax.device_get(train_state.step))
      return FitResult(train_state, steps, extras[loop.STOP_REASON], extras)
    end = loop.train_loop(
      train_state,
      step_fn,
      batch_fn,
      rng,
      checkpointer=checkpointer,
      writer=run.writer,
      extras_fn=extras_fn,
      on_step_end=on_step_end,
      should_stop=should_stop,
      **phase.loop_options(),
    )
  finally:
    checkpointer.close()
    run.writer.flush()  # a workdir that is not local may hold metrics not yet written
  return FitResult(end.state, end.steps, end.stop_reason, extras)
