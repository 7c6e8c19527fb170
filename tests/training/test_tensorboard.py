"""TensorBoard event files: read back with TensorBoard's own EventAccumulator (no TensorFlow)."""

import glob
import json
import os
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from tensorboard.backend.event_processing import event_accumulator  # noqa: E402

from research.training import progress  # noqa: E402

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _read(logdir):
  acc = event_accumulator.EventAccumulator(
    logdir, size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0}
  )
  acc.Reload()
  return acc


def _scalars(acc, tag):
  return [(e.step, e.value) for e in acc.Scalars(tag)]


def _png(path, shape=(3, 5)):
  fig, ax = plt.subplots(figsize=(shape[1], shape[0]), dpi=10)
  ax.plot([0, 1], [1, 0])
  fig.savefig(path)
  plt.close(fig)
  return path


def test_scalars_and_image_read_back(tmp_path):
  writer = progress.MetricWriter(str(tmp_path))
  writer.write(
    10, {"loss": np.float32(0.5), "accuracy": 0.25, "per_class": [1.0, 2.0]}, phase="train"
  )
  writer.write(20, {"loss": 0.125, "accuracy": np.array(0.75)}, phase="train")
  writer.write(20, {"pq": {"old": 41.5, "new": 7}, "n": np.int64(3)}, phase="test|night")
  writer.write(30, {"converged": True})
  png = _png(str(tmp_path / "curve.png"))
  writer.write_image("plots/curve", png, 20)
  writer.close()

  acc = _read(str(tmp_path / "tb"))
  assert sorted(acc.Tags()["scalars"]) == [
    "converged",
    "test|night/n",
    "test|night/pq/new",
    "test|night/pq/old",
    "train/accuracy",
    "train/loss",
  ]
  assert _scalars(acc, "train/loss") == [(10, 0.5), (20, 0.125)]
  assert _scalars(acc, "train/accuracy") == [(10, 0.25), (20, 0.75)]
  assert _scalars(acc, "test|night/pq/old") == [(20, 41.5)]
  assert _scalars(acc, "test|night/pq/new") == [(20, 7.0)]
  assert _scalars(acc, "test|night/n") == [(20, 3.0)]
  assert _scalars(acc, "converged") == [(30, 1.0)]
  (image,) = acc.Images("plots/curve")
  with open(png, "rb") as f:
    assert image.encoded_image_string == f.read()
  assert (image.step, image.height, image.width) == (20, 30, 50)


def test_json_lines_unchanged(tmp_path):
  writer = progress.MetricWriter(str(tmp_path))
  writer.write(5, {"loss": np.float32(0.5), "per_class": np.array([1, 2])}, phase="train", seed=1)
  writer.write(6, {"pq": {"old": np.float64(1.5)}})
  with open(tmp_path / "metrics.jsonl") as f:
    text = f.read()
  assert text == (
    json.dumps({"step": 5, "phase": "train", "seed": 1, "loss": 0.5, "per_class": [1, 2]})
    + "\n"
    + json.dumps({"step": 6, "pq": {"old": 1.5}})
    + "\n"
  )
  writer.close()


def test_tensorboard_off_writes_no_folder(tmp_path, monkeypatch):
  off = tmp_path / "off"
  writer = progress.MetricWriter(str(off), tensorboard=False)
  writer.write(1, {"loss": 1.0}, phase="train")
  writer.write_images(str(tmp_path), 1)
  writer.close()
  assert os.listdir(off) == ["metrics.jsonl"]

  monkeypatch.setattr(progress, "_TENSORBOARD_DEFAULT", True)
  progress.set_tensorboard_default(False)
  default_off = tmp_path / "default_off"
  progress.MetricWriter(str(default_off)).write(1, {"loss": 1.0})
  assert os.listdir(default_off) == ["metrics.jsonl"]
  forced = tmp_path / "forced"
  progress.MetricWriter(str(forced), tensorboard=True).write(1, {"loss": 1.0})
  assert sorted(os.listdir(forced)) == ["metrics.jsonl", "tb"]


def test_writers_phases_processes_and_resume_share_the_folder(tmp_path):
  workdir = str(tmp_path)
  first, second = progress.MetricWriter(workdir), progress.MetricWriter(workdir)
  first.write(1, {"loss": 4.0}, phase="a")
  second.write(1, {"loss": 3.0}, phase="b")
  first.write(2, {"loss": 2.0}, phase="a")
  # Another process writes into the same folder while this one's file is open.
  code = (
    "from research.training import progress; "
    f"progress.MetricWriter({workdir!r}).write(7, {{'loss': 9.0}}, phase='other')"
  )
  subprocess.run([sys.executable, "-c", code], check=True, cwd=_REPO)
  second.write(2, {"loss": 1.0}, phase="b")
  first.close()
  second.close()
  # The run resumes: a new writer after the old ones are gone appends a new file.
  resumed = progress.MetricWriter(workdir)
  resumed.write(3, {"loss": 0.5}, phase="a")
  resumed.close()

  files = glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*"))
  assert len(files) == 3  # this process's two writers share one file; the other process, resume
  acc = _read(os.path.join(workdir, "tb"))
  assert _scalars(acc, "a/loss") == [(1, 4.0), (2, 2.0), (3, 0.5)]
  assert _scalars(acc, "b/loss") == [(1, 3.0), (2, 1.0)]
  assert _scalars(acc, "other/loss") == [(7, 9.0)]
  assert len(progress.read_metrics(os.path.join(workdir, "metrics.jsonl"))) == 6


def test_write_images_adds_every_plot(tmp_path):
  plots = tmp_path / "plots"
  plots.mkdir()
  _png(str(plots / "b.png"))
  _png(str(plots / "a.png"), shape=(2, 2))
  (plots / "notes.txt").write_text("not an image")
  writer = progress.MetricWriter(str(tmp_path))
  writer.write_images(str(plots), 100)
  writer.close()
  acc = _read(str(tmp_path / "tb"))
  assert sorted(acc.Tags()["images"]) == ["plots/a", "plots/b"]
  assert [(e.step, e.width, e.height) for e in acc.Images("plots/a")] == [(100, 20, 20)]


def test_a_file_that_is_not_png_fails_with_its_name(tmp_path):
  path = tmp_path / "fake.png"
  path.write_bytes(b"GIF89a" + bytes(30))
  writer = progress.MetricWriter(str(tmp_path))
  with pytest.raises(ValueError, match="'plots/fake' is not a PNG file"):
    writer.write_image("plots/fake", str(path), 1)
  writer.close()
