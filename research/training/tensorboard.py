"""TensorBoard event files written without TensorFlow (tensorboardX's record writer and protos).

Every writer in one process that points at the same folder shares one event file, so phases
that open their own writers land in one file; other processes (a resumed run, another host)
add their own file, named by time, host and process id. TensorBoard reads all the files of a
folder as one run. View with `tensorboard --logdir runs/` (the `tensorboard` package is
needed only to view, not to write).
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Mapping

from tensorboardX import RecordWriter
from tensorboardX.proto import event_pb2, summary_pb2

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour type -> number of channels (grey, RGB, palette, grey + alpha, RGBA).
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}


class _EventFile:
  """One open event file, shared by the writers of one process that point at its folder."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}"
    self.path = os.path.join(logdir, name)
    self.users = 0
    self._lock = threading.Lock()
    self._records = RecordWriter(self.path)
    self.write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def write(self, event: event_pb2.Event) -> None:
    """Appends one event and flushes it to disk."""
    with self._lock:
      self._records.write(event.SerializeToString())
      self._records.flush()

  def close(self) -> None:
    """Closes the file."""
    with self._lock:
      self._records.close()


# (process id, folder) -> its open file; keyed by process so a forked child opens its own.
_OPEN: dict[tuple[int, str], _EventFile] = {}
_OPEN_LOCK = threading.Lock()


def png_summary(tag: str, png: bytes) -> summary_pb2.Summary:
  """An image summary holding an already encoded PNG (no decoding, no re-encoding).

  Args:
    tag: the image's name in TensorBoard.
    png: the bytes of a PNG file.

  Returns:
    a `Summary` with one image value.

  Raises:
    ValueError: when `png` is not a PNG file.
  """
  if png[:8] != _PNG_SIGNATURE or png[12:16] != b"IHDR":
    raise ValueError(f"image {tag!r} is not a PNG file (its first bytes are {png[:16]!r}).")
  width, height = struct.unpack(">II", png[16:24])
  image = summary_pb2.Summary.Image(
    height=height,
    width=width,
    colorspace=_PNG_CHANNELS.get(png[25], 3),
    encoded_image_string=png,
  )
  return summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, image=image)])


class EventWriter:
  """Writes scalar and image summaries to an event file in `logdir`.

  The file is created on the first write, so a writer that never writes leaves no folder.
  Each write is flushed at once: a run killed at any moment keeps everything written before.

  Args:
    logdir: the folder of the event files (`<workdir>/tb`).
  """

  def __init__(self, logdir: str):
    self.logdir = os.path.abspath(logdir)
    self._key: tuple[int, str] | None = None
    self._file: _EventFile | None = None

  def _event_file(self) -> _EventFile:
    if self._file is None:
      self._key = (os.getpid(), self.logdir)
      with _OPEN_LOCK:
        if self._key not in _OPEN:
          _OPEN[self._key] = _EventFile(self.logdir)
        self._file = _OPEN[self._key]
        self._file.users += 1
    return self._file

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    """Writes `{tag: value}` as scalars of one event at `step` (nothing when empty)."""
    if not values:
      return
    summary = summary_pb2.Summary(
      value=[summary_pb2.Summary.Value(tag=t, simple_value=float(v)) for t, v in values.items()]
    )
    self._write(step, summary)

  def image(self, tag: str, png_path: str, step: int) -> None:
    """Writes the PNG file at `png_path` as the image `tag` at `step`."""
    with open(png_path, "rb") as f:
      self._write(step, png_summary(tag, f.read()))

  def _write(self, step: int, summary: summary_pb2.Summary) -> None:
    event = event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary)
    self._event_file().write(event)

  def close(self) -> None:
    """Releases the event file; the last writer of the process to release it closes it."""
    if self._file is None:
      return
    with _OPEN_LOCK:
      self._file.users -= 1
      if self._file.users == 0:
        self._file.close()
        del _OPEN[self._key]
    self._file = None
