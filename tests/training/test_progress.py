"""Progress lines: the training line's format, evaluation lines in batches, timed logging."""

import types

import pytest

from research.training import progress


@pytest.fixture
def clock(monkeypatch):
  """A fake clock (`clock.now` seconds) and the list of logged lines."""
  state = types.SimpleNamespace(now=0.0, lines=[])
  monkeypatch.setattr(progress, "time", types.SimpleNamespace(perf_counter=lambda: state.now))
  monkeypatch.setattr(progress.logging, "info", lambda fmt, *args: state.lines.append(fmt % args))
  return state


def test_training_line_is_unchanged(clock):
  p = progress.Progress(1000, start_step=100, examples_per_step=32)
  clock.now = 10.0
  assert p.line(300) == "train step 300/1000 (30%) 20.00 steps/s, 640 examples/s, ETA 0:00:35"


def test_evaluation_line_counts_batches(clock):
  p = progress.Progress(40, examples_per_step=64, name="eval test", unit="batch")
  clock.now = 2.0
  assert p.line(3) == "eval test batch 3/40 (8%) 1.50 batches/s, 96 examples/s, ETA 0:00:24"


def test_maybe_log_every_interval_and_the_end(clock):
  p = progress.Progress(10, name="eval night", unit="batch", log_every_s=5.0)
  for b in range(1, 11):
    clock.now = 2.0 * b
    p.maybe_log(b)
  # A line at the first batch 5 s or more after the last one (6, 12, 18 s), and the last batch.
  assert [line.split(" (")[0] for line in clock.lines] == [
    "eval night batch 3/10",
    "eval night batch 6/10",
    "eval night batch 9/10",
    "eval night batch 10/10",
  ]


def test_maybe_log_is_silent_for_a_short_loop(clock):
  p = progress.Progress(4, name="eval", unit="batch", log_every_s=10.0)
  for b in range(1, 5):
    clock.now = float(b)
    p.maybe_log(b)
  assert clock.lines == []


def test_a_non_primary_host_writes_nothing(tmp_path):
  writer = progress.MetricWriter(str(tmp_path / "run"), primary=False, tensorboard=True)
  writer.write(1, {"loss": 0.5}, phase="train")
  writer.close()
  assert not (tmp_path / "run").exists()
