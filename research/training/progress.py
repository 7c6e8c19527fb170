"""Metrics as JSON lines in the workdir, and progress lines with rate and ETA."""

from __future__ import annotations

import datetime
import json
import logging as pylogging
import os
import time
from typing import Any

import numpy as np
from absl import logging


def _to_python(value: Any) -> Any:
  if isinstance(value, dict):
    return {k: _to_python(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [_to_python(v) for v in value]
  arr = np.asarray(value)
  if arr.ndim == 0:
    return arr.item()
  return arr.tolist()


class MetricWriter:
  """Appends one JSON object per call to `<workdir>/<name>.jsonl`."""

  def __init__(self, workdir: str, name: str = "metrics"):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, f"{name}.jsonl")

  def write(self, step: int, metrics: dict[str, Any], **tags: Any) -> None:
    """Writes `{"step": step, **tags, **metrics}` as one line."""
    record = {"step": int(step), **tags, **_to_python(metrics)}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")


def read_metrics(path: str) -> list[dict[str, Any]]:
  """All records of a JSON-lines metrics file."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """Logs `step i/N (p%) r steps/s, ETA h:mm:ss` lines, with an optional examples/s rate.

  Args:
    total_steps: N.
    start_step: the step the run (re)starts from; the rate counts only steps run here.
    examples_per_step: batch size, to report examples/s.
    name: prefix of each line.
  """

  def __init__(
    self, total_steps: int, start_step: int = 0, examples_per_step: int = 0, name: str = "train"
  ):
    self.total_steps = total_steps
    self.start_step = start_step
    self.examples_per_step = examples_per_step
    self.name = name
    self._start_time = time.perf_counter()

  def elapsed(self) -> float:
    """Seconds since the clock (re)started."""
    return time.perf_counter() - self._start_time

  def restart_clock(self, step: int) -> None:
    """Counts the rate from `step` on (call after the first, compiling step)."""
    self.start_step = step
    self._start_time = time.perf_counter()

  def line(self, step: int) -> str:
    """The progress line for `step` (steps completed)."""
    elapsed = max(time.perf_counter() - self._start_time, 1e-9)
    done = step - self.start_step
    rate = done / elapsed
    remaining = (self.total_steps - step) / rate if rate > 0 else float("inf")
    eta = str(datetime.timedelta(seconds=int(remaining))) if np.isfinite(remaining) else "?"
    text = (
      f"{self.name} step {step}/{self.total_steps} "
      f"({100.0 * step / max(self.total_steps, 1):.0f}%) {rate:.2f} steps/s"
    )
    if self.examples_per_step:
      text += f", {rate * self.examples_per_step:.0f} examples/s"
    return text + f", ETA {eta}"

  def log(self, step: int) -> None:
    """Logs the progress line at INFO level."""
    logging.info("%s", self.line(step))


class _DropLibraryRecords(pylogging.Filter):
  """Drops chatty library records: orbax's INFO lines, tfds's INFO and WARNING lines."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    if "orbax" in record.pathname:
      return record.levelno >= pylogging.WARNING
    if "tensorflow_datasets" in record.pathname:
      return record.levelno >= pylogging.ERROR
    return True


def quiet_library_logs() -> None:
  """Keeps this codebase's INFO lines and drops the libraries' (warnings still show)."""
  logging.set_verbosity(logging.INFO)
  pylogging.getLogger("absl").addFilter(_DropLibraryRecords())
