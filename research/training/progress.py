"""Metrics as JSON lines and TensorBoard scalars in the workdir; progress lines with rate, ETA.

The workdir may be any `etils.epath` location: a local folder, or an object store (`gs://`)
where files cannot be appended to (see `research.training.tensorboard.AppendFile`).
"""

from __future__ import annotations

import datetime
import json
import logging as pylogging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging
from etils import epath

from research.training.tensorboard import EventWriter, append_file

_TENSORBOARD_DEFAULT = True


def set_tensorboard_default(enabled: bool) -> None:
  """Turns TensorBoard event files on or off for every `MetricWriter` not told otherwise."""
  global _TENSORBOARD_DEFAULT
  _TENSORBOARD_DEFAULT = bool(enabled)


def _to_python(value: Any) -> Any:
  if isinstance(value, dict):
    return {k: _to_python(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [_to_python(v) for v in value]
  arr = np.asarray(value)
  if arr.ndim == 0:
    return arr.item()
  return arr.tolist()


def _scalars(metrics: Mapping[str, Any], prefix: str) -> dict[str, float]:
  """`{prefix/name: value}` for the numbers in `metrics` (nested dicts joined with `/`)."""
  out = {}
  for name, value in metrics.items():
    if isinstance(value, Mapping):
      out.update(_scalars(value, f"{prefix}{name}/"))
    elif isinstance(value, int | float):
      out[f"{prefix}{name}"] = float(value)
  return out


class MetricWriter:
  """Appends one JSON object per call to `<workdir>/<name>.jsonl`, and TensorBoard scalars.

  The scalars go to event files in `<workdir>/tb/` (several writers, phases or resumed runs
  in one workdir share the folder; see `research.training.tensorboard`).

  A local JSON-lines file is appended to at each `write`, as it always was: a resumed run
  adds its lines after the old ones (lines of steps it runs again stand twice, the later ones
  last). On an object store (`gs://`), which cannot append, the file's old lines are read at
  the first `write` and kept in memory with the new ones, and the whole file is written again
  (at most every `tensorboard.REWRITE_EVERY_S` seconds; `flush`, `close` and the exit of the
  process write what is pending): the file reads the same as a local one.

  Args:
    workdir: the run's output directory (any `etils.epath` location).
    name: the JSON-lines file's name without `.jsonl`.
    tensorboard: write TensorBoard event files too; None: the module default
      (`set_tensorboard_default`, on unless turned off).
    primary: False on every process but the first of a multi-host run, which then writes
      nothing (each host would otherwise write every line again).
  """

  def __init__(
    self,
    workdir: epath.PathLike,
    name: str = "metrics",
    tensorboard: bool | None = None,
    primary: bool = True,
  ):
    self.path = epath.Path(workdir) / f"{name}.jsonl" if primary else None
    self._lines = append_file(self.path) if primary else None
    use_tb = primary and (_TENSORBOARD_DEFAULT if tensorboard is None else tensorboard)
    self.events = EventWriter(epath.Path(workdir) / "tb") if use_tb else None
    if primary:
      epath.Path(workdir).mkdir(parents=True, exist_ok=True)

  def write(self, step: int, metrics: dict[str, Any], **tags: Any) -> None:
    """Writes `{"step": step, **tags, **metrics}` as one line, and the numbers as scalars.

    A scalar's TensorBoard tag is the tags' values then the metric's name, joined with `/`
    (`train/loss` for `write(step, {"loss": ...}, phase="train")`); lists are left out of
    TensorBoard (they stay in the JSON line).
    """
    if self._lines is None:
      return
    values = _to_python(metrics)
    record = {"step": int(step), **tags, **values}
    self._lines.append((json.dumps(record) + "\n").encode())
    if self.events is not None:
      prefix = "".join(f"{v}/" for v in tags.values())
      self.events.scalars(step, _scalars(values, prefix))

  def write_image(self, tag: str, png_path: epath.PathLike, step: int) -> None:
    """Adds the PNG file at `png_path` to TensorBoard as the image `tag` (no-op when off)."""
    if self.events is not None:
      self.events.image(tag, png_path, step)

  def write_images(self, directory: epath.PathLike, step: int) -> None:
    """Adds every `*.png` in `directory` (the run's `plots/`) as the image `plots/<stem>`."""
    for path in sorted(epath.Path(directory).glob("*.png")):
      self.write_image(f"plots/{path.stem}", path, step)

  def flush(self) -> None:
    """Writes what is pending (a local workdir has nothing pending: every write is on disk)."""
    if self._lines is not None:
      self._lines.flush()
    if self.events is not None:
      self.events.flush()

  def close(self) -> None:
    """Writes what is pending and releases the event file."""
    self.flush()
    if self.events is not None:
      self.events.close()


def read_metrics(path: epath.PathLike) -> list[dict[str, Any]]:
  """All records of a JSON-lines metrics file (any `etils.epath` location)."""
  return [json.loads(line) for line in epath.Path(path).read_text().splitlines() if line.strip()]


class Progress:
  """Logs `step i/N (p%) r steps/s, ETA h:mm:ss` lines, with an optional examples/s rate.

  The same lines serve long evaluations: `Progress(num_batches, name="eval test",
  examples_per_step=batch_size, unit="batch")` and `maybe_log(b + 1)` after each batch log
  `eval test batch 3/40 (8%) 1.52 batches/s, 97 examples/s, ETA 0:00:24` every
  `log_every_s` seconds, and nothing for an evaluation shorter than that.

  Args:
    total_steps: N.
    start_step: the step the run (re)starts from; the rate counts only steps run here.
    examples_per_step: batch size, to report examples/s.
    name: prefix of each line.
    unit: what a step is called in the line (`step`, `batch`).
    log_every_s: the interval of `maybe_log`, in seconds.
  """

  def __init__(
    self,
    total_steps: int,
    start_step: int = 0,
    examples_per_step: int = 0,
    name: str = "train",
    unit: str = "step",
    log_every_s: float = 10.0,
  ):
    self.total_steps = total_steps
    self.start_step = start_step
    self.examples_per_step = examples_per_step
    self.name = name
    self.unit = unit
    self.log_every_s = log_every_s
    self._start_time = time.perf_counter()
    self._last_line: float | None = None

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
    units = f"{self.unit}es" if self.unit.endswith(("s", "sh", "ch", "x")) else f"{self.unit}s"
    text = (
      f"{self.name} {self.unit} {step}/{self.total_steps} "
      f"({100.0 * step / max(self.total_steps, 1):.0f}%) {rate:.2f} {units}/s"
    )
    if self.examples_per_step:
      text += f", {rate * self.examples_per_step:.0f} examples/s"
    return text + f", ETA {eta}"

  def log(self, step: int) -> None:
    """Logs the progress line at INFO level."""
    logging.info("%s", self.line(step))
    self._last_line = time.perf_counter()

  def maybe_log(self, step: int) -> None:
    """Logs the line when `log_every_s` passed since the last one (or since the start).

    The last step is logged too once any line was, so a long loop's lines end at 100 %.
    """
    since = self._start_time if self._last_line is None else self._last_line
    due = time.perf_counter() - since >= self.log_every_s
    if due or (step >= self.total_steps and self._last_line is not None):
      self.log(step)


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
