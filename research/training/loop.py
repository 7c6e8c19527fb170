"""The host-side training loop shared by every experiment: resume, log, checkpoint, stop on NaN.

The loop itself holds no training logic: it calls a compiled `step(state, batch, rng)` with
batches from `batch_fn(step)`, which must depend only on the step (see `data.samplers`), so
that a run killed at any moment and restarted resumes from its newest checkpoint and ends with
the same parameters as an uninterrupted run. A stop hook `should_stop(step, metrics, state)`
ends a phase early (e.g. M5's convergence rule); the reason is saved with the checkpoint of
that step, so a rerun does not train further. `fit.fit` wraps this loop for one phase.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from research.training.checkpoint import Checkpointer
from research.training.progress import MetricWriter, Progress


class NonFiniteLossError(FloatingPointError):
  """The loss, a gradient or an updated parameter became NaN or infinite (`steps.all_finite`).

  The run stopped with its last good checkpoint kept.
  """


STOP_REASON = "stop_reason"
STEP_LIMIT = "step_limit"

StopHook = Callable[[int, dict[str, float], Any], "str | None"]


@dataclasses.dataclass(frozen=True)
class LoopEnd:
  """How a training loop ended.

  Attributes:
    state: the final state (the one of the stopping step when a hook stopped it).
    steps: updates applied in all (including those before a resume).
    stop_reason: `step_limit`, or the string the stop hook returned.
  """

  state: Any
  steps: int
  stop_reason: str


def restore_or_init(checkpointer: Checkpointer, state: Any) -> tuple[Any, dict]:
  """The newest checkpoint's (state, extras) if there is one, else (state, {})."""
  restored = checkpointer.restore_latest(state)
  if restored is None:
    return state, {}
  return restored[0], restored[1]


def _mean_metrics(history: list[dict]) -> dict[str, float]:
  stacked = jax.device_get(jax.tree.map(lambda *xs: jnp.stack(xs), *history))
  return {k: float(np.mean(v)) for k, v in stacked.items()}


def _check_finite(state: Any, checkpointer: Checkpointer | None) -> None:
  bad = int(jax.device_get(state.nonfinite_step))
  if bad >= 0:
    kept = checkpointer.all_steps() if checkpointer else []
    where = f"the last good checkpoint is step {kept[-1]}" if kept else "no checkpoint was kept"
    raise NonFiniteLossError(
      f"the loss or gradients became non-finite at step {bad}; the run stopped and {where}"
    )


def train_loop(
  state: Any,
  step_fn: Callable,
  batch_fn: Callable[[int], dict],
  rng: jax.Array,
  *,
  num_steps: int,
  checkpointer: Checkpointer | None = None,
  checkpoint_every: int = 0,
  log_every: int = 50,
  writer: MetricWriter | None = None,
  examples_per_step: int = 0,
  name: str = "train",
  extras_fn: Callable[[], dict] | None = None,
  on_step_end: Callable[[int], None] | None = None,
  should_stop: StopHook | None = None,
) -> LoopEnd:
  """Runs `step_fn` from `state.step` up to `num_steps`.

  Args:
    state: a `TrainState` (possibly restored); its `step` says where to start.
    step_fn: compiled `step(state, batch, rng) -> (state, metrics)`; donates `state`.
    batch_fn: `batch_fn(step)` -> device batch for that step.
    rng: base key; the step function folds in the step.
    num_steps: total steps of the run.
    checkpointer: where to save; None for no checkpoints.
    checkpoint_every: save every this many steps (0: only at the end).
    log_every: average and write metrics every this many steps.
    writer: JSON-lines writer for the averaged metrics.
    examples_per_step: for the examples/s rate.
    name: tag of the metrics and progress lines.
    extras_fn: host-side JSON extras saved with each checkpoint.
    on_step_end: called with the completed step count (fault injection in tests, hooks).
    should_stop: called at every log point with (steps done, the interval's mean metrics, the
      state); a returned string stops the loop there, and that step is checkpointed with the
      reason in its extras (`STOP_REASON`).

  Returns:
    the `LoopEnd`.

  Raises:
    NonFiniteLossError: when a loss was not finite; no checkpoint after it is written.
  """
  start = int(jax.device_get(state.step))
  progress = Progress(num_steps, start, examples_per_step, name)
  history: list[dict] = []
  stop_reason = STEP_LIMIT
  for step in range(start, num_steps):
    state, metrics = step_fn(state, batch_fn(step), rng)
    history.append(metrics)
    done = step + 1
    if step == start:
      jax.block_until_ready(metrics)
      logging.info("%s: first step (with compilation) took %.1f s", name, progress.elapsed())
      progress.restart_clock(done)
    at_log = done % log_every == 0 or done == num_steps
    at_checkpoint = checkpointer is not None and (
      done == num_steps or (checkpoint_every and done % checkpoint_every == 0)
    )
    if at_log or at_checkpoint:
      _check_finite(state, checkpointer)
    reason = None
    if at_log and history:
      mean_metrics = _mean_metrics(history)
      if writer is not None:
        writer.write(done, mean_metrics, phase=name)
      progress.log(done)
      history = []
      if should_stop is not None:
        reason = should_stop(done, mean_metrics, state)
    if checkpointer is not None and (at_checkpoint or reason):
      extras = dict(extras_fn() if extras_fn else {})
      if reason:
        extras[STOP_REASON] = reason
      checkpointer.save(done, state, extras)
    if on_step_end is not None:
      on_step_end(done)
    if reason:
      logging.info("%s: stopped at step %d: %s", name, done, reason)
      stop_reason = reason
      break
  if checkpointer is not None:
    checkpointer.wait_until_finished()
  return LoopEnd(state, int(jax.device_get(state.step)), stop_reason)
