"""TensorBoard event files written without TensorFlow (tensorboardX's record format and protos).

Every writer in one process that points at the same folder shares one event file, so phases
that open their own writers land in one file; other processes (a resumed run, another host)
add their own file, named by time, host and process id. TensorBoard reads all the files of a
folder as one run. View with `tensorboard --logdir runs/` (the `tensorboard` package is
needed only to view, not to write).

The folder may be any `etils.epath` location: files are written through `AppendFile`, which
appends to a local file in place and rewrites a whole object on a store that cannot append
(`gs://`).
"""

from __future__ import annotations

import atexit
import math
import os
import socket
import struct
import threading
import time
import weakref
from collections.abc import Mapping

from etils import epath
from tensorboardX.proto import event_pb2, summary_pb2
from tensorboardX.record_writer import masked_crc32c

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour type -> number of channels (grey, RGB, palette, grey + alpha, RGBA).
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}
# The least time between two rewrites of one object that cannot be appended to (GCS takes
# about one write per second to one object name).
REWRITE_EVERY_S = 2.0


def is_local(path: epath.PathLike) -> bool:
  """Whether `path` is on this machine's filesystem (it has no `scheme://`, like `gs://`)."""
  return "://" not in os.fspath(path)


class AppendFile:
  """A file that is only ever appended to, on any `etils.epath` filesystem.

  A local file is appended to in place at each `append` (flushed and synced), so the appends
  of several processes interleave and a killed process loses nothing it appended. An object
  store (`gs://`) has no append: there the file's bytes (what it held at the first append,
  then every append) are kept in memory and the whole file is written again, at most once
  every `REWRITE_EVERY_S` seconds; `flush` writes what is pending at once (`MetricWriter.close`
  and the end of a training phase call it; `flush_all`, at the end of `launch.main` and at the
  exit of the process, flushes every file). Only one process may write such a file (the first
  process of a run writes the metrics), and it gets it through `append_file`, so that every
  writer of the process shares its bytes.

  Args:
    path: the file.
  """

  def __init__(self, path: epath.PathLike):
    self.path = epath.Path(path)
    self.local = is_local(path)
    self._lock = threading.Lock()
    self._content: bytearray | None = None  # not local: the file's bytes, once read
    self._pending = False
    self._written_at = -math.inf

  def append(self, data: bytes) -> None:
    """Appends `data` (not local: rewrites the file unless it was rewritten very recently)."""
    with self._lock:
      if self.local:
        with self.path.open("ab") as f:
          f.write(data)
          f.flush()
          os.fsync(f.fileno())
        return
      if self._content is None:
        self._content = bytearray(self.path.read_bytes() if self.path.exists() else b"")
      self._content += data
      self._pending = True
      _PENDING.add(self)
      if time.monotonic() - self._written_at >= REWRITE_EVERY_S:
        self._rewrite()

  def flush(self) -> None:
    """Writes the appends not yet written (only a file that is not local has any)."""
    with self._lock:
      if self._pending:
        self._rewrite()

  def _rewrite(self) -> None:
    self.path.write_bytes(bytes(self._content))
    self._pending = False
    self._written_at = time.monotonic()
    _PENDING.discard(self)


# (process id, path) -> the process's `AppendFile` of that path.
_FILES: dict[tuple[int, str], AppendFile] = {}
_FILES_LOCK = threading.Lock()
# Files with appends not yet written, flushed when the process exits.
_PENDING: weakref.WeakSet[AppendFile] = weakref.WeakSet()


def append_file(path: epath.PathLike) -> AppendFile:
  """This process's `AppendFile` of `path` (one per file, shared by all its writers)."""
  name = os.path.abspath(path) if is_local(path) else os.fspath(epath.Path(path))
  key = (os.getpid(), name)
  with _FILES_LOCK:
    if key not in _FILES:
      _FILES[key] = AppendFile(name)
    return _FILES[key]


@atexit.register
def flush_all() -> None:
  """Writes every file's pending appends (registered to run at the exit of the process)."""
  for file in list(_PENDING):
    file.flush()


class _EventFile:
  """One event file, shared by the writers of one process that point at its folder."""

  def __init__(self, logdir: str):
    epath.Path(logdir).mkdir(parents=True, exist_ok=True)
    name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}"
    self.path = os.fspath(epath.Path(logdir) / name)
    self.users = 0
    self._records = AppendFile(self.path)  # a new file: no other writer shares it
    self.write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def write(self, event: event_pb2.Event) -> None:
    """Appends one event as a TFRecord (length, its CRC, the bytes, their CRC)."""
    data = event.SerializeToString()
    header = struct.pack("Q", len(data))
    self._records.append(
      header
      + struct.pack("I", masked_crc32c(header))
      + data
      + struct.pack("I", masked_crc32c(data))
    )

  def flush(self) -> None:
    """Writes what is pending (only a file that is not local has anything pending)."""
    self._records.flush()


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
  A local file gets each write at once: a run killed at any moment keeps everything written
  before. A file on an object store (`gs://`) is written again whole, at most every
  `REWRITE_EVERY_S` seconds and at `flush`, `close` and the exit of the process.

  Args:
    logdir: the folder of the event files (`<workdir>/tb`), any `etils.epath` location.
  """

  def __init__(self, logdir: epath.PathLike):
    self.logdir = os.path.abspath(logdir) if is_local(logdir) else os.fspath(epath.Path(logdir))
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

  def image(self, tag: str, png_path: epath.PathLike, step: int) -> None:
    """Writes the PNG file at `png_path` (any `etils.epath` location) as the image `tag`."""
    self._write(step, png_summary(tag, epath.Path(png_path).read_bytes()))

  def _write(self, step: int, summary: summary_pb2.Summary) -> None:
    event = event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary)
    self._event_file().write(event)

  def flush(self) -> None:
    """Writes what is pending (only an event file that is not local has anything pending)."""
    if self._file is not None:
      self._file.flush()

  def close(self) -> None:
    """Releases the event file; the last writer of the process to release it writes it out."""
    if self._file is None:
      return
    with _OPEN_LOCK:
      self._file.users -= 1
      if self._file.users == 0:
        self._file.flush()
        del _OPEN[self._key]
    self._file = None
