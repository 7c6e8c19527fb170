"""A workdir that is not a local folder: every file of a run goes through `etils.epath`.

The workdir is a `gs://` path served by an in-memory fsspec filesystem that, like GCS, cannot
append (`fake_gcs`): no network, and nothing of the run may land in the local working folder.
Orbax writes array data through TensorStore's own GCS driver, which no fake reaches offline,
so the runs here keep their checkpoints in a local folder (`local_checkpoints`); every other
file (metrics, TensorBoard events, results, plots, reports, summaries) is on the fake bucket.
"""

import functools
import os
import signal
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from etils import epath
from etils.epath import backend, gpath
from fsspec.implementations.memory import MemoryFileSystem
from tensorboard.backend.event_processing import event_accumulator

from configs import classification_digits
from research import experiments
from research.data import samplers
from research.models import pretrained
from research.training import fit, parallel, progress, steps, tensorboard, workdir_lock
from research.training.checkpoint import Checkpointer

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# A 1x1 grey PNG.
_PNG = bytes.fromhex(
  "89504e470d0a1a0a0000000d4948445200000001000000010800000000"
  "3a7e9b550000000a49444154789c6360000000020001e221bc330000000049454e44ae426082"
)


class _NoAppendMemoryFS(MemoryFileSystem):
  """`gs://bucket/path` files in memory; like GCS, a file is written whole or not at all."""

  protocol = ("gs", "gcs")
  root_marker = ""

  @classmethod
  def _strip_protocol(cls, path):
    return str(path).removeprefix("gs://").removeprefix("gcs://").strip("/")

  def _open(self, path, mode="rb", **kwargs):
    if "a" in mode or "+" in mode:
      raise NotImplementedError(f"GCS cannot open {path} in mode {mode!r}")
    return super()._open(path, mode, **kwargs)


def install_fake_gcs(setattr_fn=setattr):
  """Serves every `gs://` path of `etils.epath` from a new, empty in-memory filesystem.

  Args:
    setattr_fn: `setattr`, or a test's `monkeypatch.setattr` to undo it afterwards.
  """
  fs_cls = type("FakeGCS", (_NoAppendMemoryFS,), {"store": {}, "pseudo_dirs": [""]})
  fs = fs_cls(skip_instance_cache=True)
  setattr_fn(gpath, "_is_tf_installed", lambda: False)  # gs:// -> the fsspec backend
  setattr_fn(backend.fsspec_backend, "fs", lambda path: fs)
  # This process's shared files and event files belong to earlier tests' buckets.
  setattr_fn(tensorboard, "_FILES", {})
  setattr_fn(tensorboard, "_OPEN", {})


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """An empty fake bucket: returns its `gs://` root; the test runs in an empty local folder."""
  install_fake_gcs(monkeypatch.setattr)
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  yield f"gs://bucket-{tmp_path.name.lower().replace('_', '-')}"
  tensorboard.flush_all()  # while the bucket is there: nothing is left for the exit
  assert os.listdir(cwd) == [], "a file of the run was written to the local working folder"


@pytest.fixture
def local_checkpoints(tmp_path, monkeypatch):
  """Runs' checkpoints under a local folder (see the module docstring); returns the folder."""
  root = tmp_path / "checkpoints"

  def checkpointer(directory, **kwargs):
    return Checkpointer(str(root / str(directory).removeprefix("gs://")), **kwargs)

  monkeypatch.setattr(fit, "Checkpointer", checkpointer)
  return root


def _events(logdir, local_copy):
  """The scalars `{tag: [(step, value)]}` of the event files in `logdir`, read by TensorBoard."""
  local_copy.mkdir()
  for path in epath.Path(logdir).iterdir():
    (local_copy / path.name).write_bytes(path.read_bytes())
  acc = event_accumulator.EventAccumulator(
    str(local_copy), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0}
  )
  acc.Reload()
  scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
  return scalars, acc.Tags()["images"]


def test_metric_writer_rewrites_whole_files_and_keeps_a_previous_runs_lines(
  fake_gcs, tmp_path, monkeypatch
):
  workdir = epath.Path(fake_gcs) / "run"
  (workdir / "plots").mkdir(parents=True)
  (workdir / "plots" / "curve.png").write_bytes(_PNG)
  (workdir / "metrics.jsonl").write_text('{"step": 1, "loss": 4.0}\n{"step": 2, "loss": 3.0}\n')
  monkeypatch.setattr(tensorboard, "REWRITE_EVERY_S", 3600.0)  # only the first write goes out

  writer = progress.MetricWriter(workdir, tensorboard=True)  # an epath.Path, not a string
  writer.write(2, {"loss": 2.5}, phase="train")
  writer.write(3, {"loss": 2.0}, phase="train")
  lines = progress.read_metrics(workdir / "metrics.jsonl")
  assert [r["step"] for r in lines] == [1, 2, 2]  # the old lines, then the first new one
  # A second writer of the process (as `tables.write_report` opens) shares the pending lines.
  other = progress.MetricWriter(str(workdir))
  other.write(3, {"accuracy": 0.5}, phase="test")
  other.write_images(workdir / "plots", 3)
  other.close()
  lines = progress.read_metrics(str(workdir / "metrics.jsonl"))
  assert [(r["step"], r.get("phase")) for r in lines] == [
    (1, None),
    (2, None),
    (2, "train"),
    (3, "train"),
    (3, "test"),
  ]
  writer.write(4, {"loss": 1.0}, phase="train")  # never closed: written when the process exits
  assert len(progress.read_metrics(workdir / "metrics.jsonl")) == 5
  tensorboard.flush_all()
  assert progress.read_metrics(workdir / "metrics.jsonl")[-1] == {
    "step": 4,
    "phase": "train",
    "loss": 1.0,
  }
  scalars, images = _events(workdir / "tb", tmp_path / "tb")
  assert scalars == {
    "train/loss": [(2, 2.5), (3, 2.0), (4, 1.0)],
    "test/accuracy": [(3, 0.5)],
  }
  assert images == ["plots/curve"]


def test_a_local_workdir_is_still_appended_to_at_once(tmp_path, monkeypatch):
  monkeypatch.setattr(tensorboard, "REWRITE_EVERY_S", 3600.0)
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
  writer = progress.MetricWriter(epath.Path(tmp_path), tensorboard=False)
  writer.write(2, {"loss": 1.0})
  writer.write(3, {"loss": 0.5})  # no flush, no close: already in the file
  assert [r["step"] for r in progress.read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def _fit(workdir, crash_at=None):
  """The tiny phase of `test_fit.py` (12 steps, metrics every 2, checkpoints every 4)."""
  x = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
  data = {"x": x, "y": x @ np.array([1.0, -2.0, 0.5], np.float32)}

  def loss(params, batch, rng):
    del rng
    return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2), {}

  def on_step_end(step):
    if step == crash_at:
      raise KeyboardInterrupt("killed")

  run = fit.start_run(workdir)
  tx = optax.adam(0.05)
  step_fn = parallel.compile_train_step(
    functools.partial(steps.train_step, loss_fn=loss, tx=tx), run.mesh
  )
  batch_fn = fit.sampled_batch_fn(data, samplers.RandomSampler(64, 8, seed=3), run.mesh, ("x", "y"))
  return fit.fit(
    run,
    fit.Phase("phase", 12, log_every=2, checkpoint_every=4, examples_per_step=8),
    params={"w": jnp.zeros(3)},
    tx=tx,
    step_fn=step_fn,
    batch_fn=batch_fn,
    rng=jax.random.key(1),
    on_step_end=on_step_end,
  )


def test_a_killed_and_resumed_phase_logs_the_same_lines_as_on_a_local_disk(
  fake_gcs, local_checkpoints, tmp_path, monkeypatch
):
  monkeypatch.setattr(tensorboard, "REWRITE_EVERY_S", 3600.0)  # fit's end must write them out
  logged = {}
  for workdir in (f"{fake_gcs}/run", str(tmp_path / "local_run")):
    with pytest.raises(KeyboardInterrupt):
      _fit(workdir, crash_at=10)  # after the checkpoint of step 8 and the metrics of step 10
    assert _fit(workdir).steps == 12  # resumes from step 8
    logged[workdir] = progress.read_metrics(epath.Path(workdir) / "metrics.jsonl")
  remote, local = logged.values()
  assert [r["step"] for r in remote] == [2, 4, 6, 8, 10, 10, 12]
  assert [(r["step"], r["phase"]) for r in remote] == [(r["step"], r["phase"]) for r in local]
  assert sorted(p.name for p in (local_checkpoints / fake_gcs[5:] / "run").iterdir()) == [
    "phase_checkpoints"
  ]
  scalars, _ = _events(f"{fake_gcs}/run/tb", tmp_path / "tb")
  assert [s for s, _ in scalars["phase/loss"]] == [2, 4, 6, 8, 10, 10, 12]


def test_experiment_report_and_rebuilt_report_on_a_bucket(fake_gcs, local_checkpoints, tmp_path):
  run = epath.Path(fake_gcs) / "classification"
  train_and_evaluate = experiments.get_train_and_evaluate("supervised_classification")
  summary = train_and_evaluate(classification_digits.get_config("smoke"), str(run))
  assert {p.name for p in run.iterdir()} == {
    "metrics.jsonl",
    "plots",
    "report.md",
    "results.json",
    "summary.json",
    "tb",
  }
  assert (run / "plots" / "confusion.png").exists()
  written = (run / "report.md").read_text()
  (run / "report.md").unlink()
  assert experiments.rebuild_report(str(run)) == summary  # what `launch.report` does
  assert (run / "report.md").read_text() == written
  lines = progress.read_metrics(run / "metrics.jsonl")
  assert [(r["step"], r["phase"]) for r in lines] == [(2, "train"), (4, "train"), (4, "test")]
  scalars, images = _events(run / "tb", tmp_path / "tb")
  assert [s for s, _ in scalars["train/loss"]] == [2, 4]
  assert sorted(images) == sorted(f"plots/{p.stem}" for p in (run / "plots").glob("*.png"))
  # Started again, it resumes from its last checkpoint; the first run's lines stay.
  train_and_evaluate(classification_digits.get_config("smoke"), str(run))
  assert progress.read_metrics(run / "metrics.jsonl") == lines + lines[-1:]
  assert sorted(p.name for p in local_checkpoints.glob("*/*/*")) == ["train_checkpoints"]


# `launch.demo` defines flags that other launch modules define too: it runs in its own process.
DEMO = """
import sys
sys.path.insert(0, "tests/training")
import test_any_workdir
from etils import epath
from launch import demo
from research import experiments

test_any_workdir.install_fake_gcs()
ran = []

def experiment(config, workdir):  # stands in for the training run
  ran.append(workdir)
  (epath.Path(workdir) / "report.md").write_text("its report")
  row = dict(metric="accuracy", baseline="majority", baseline_value=0.1, value=0.9)
  return dict(rows=[row], time_s=1.0)

experiments.get_train_and_evaluate = lambda name: experiment
demo.flags.FLAGS(["demo", "--workdir=gs://bucket/demo", "--only=classification_digits"])
demo.main(["demo"])
"""


def test_demo_writes_its_report_on_a_bucket(tmp_path):
  code = DEMO + (
    "assert ran == ['gs://bucket/demo/classification_digits'], ran\n"
    "assert epath.Path('gs://bucket/demo/classification_digits/report.md').exists()\n"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=_REPO, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.startswith("# Demo (demo size)")  # `main` prints the report it wrote
  assert "| classification_digits | accuracy | majority | 0.1 | 0.9 |" in out.stdout


HOLD = (
  "import sys, time; from research.training import workdir_lock; "
  "workdir_lock.acquire(sys.argv[1]); print('locked', flush=True); time.sleep(600)"
)


def test_a_bucket_workdir_is_locked_on_this_machine(fake_gcs, tmp_path, monkeypatch):
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
  (tmp_path / "tmp").mkdir()
  workdir = f"{fake_gcs}/run"
  child = subprocess.Popen(
    [sys.executable, "-c", HOLD, workdir],
    stdout=subprocess.PIPE,
    text=True,
    cwd=_REPO,
    env={**os.environ, "TMPDIR": str(tmp_path / "tmp")},
  )
  try:
    assert child.stdout.readline().strip() == "locked"
    with pytest.raises(workdir_lock.WorkdirLockedError) as err:
      workdir_lock.acquire(workdir)
  finally:
    child.send_signal(signal.SIGKILL)
    child.wait()
  assert str(err.value).startswith(f"workdir {workdir} is in use by another run (pid {child.pid})")
  with workdir_lock.hold(workdir) as path:  # the killed holder's lock is taken over
    assert path.startswith(str(tmp_path / "tmp" / workdir_lock.REMOTE_LOCKS))
    assert open(path).read().strip() == str(os.getpid())
  assert not epath.Path(workdir).exists()  # nothing was written to the bucket


def test_pretrained_checkpoint_on_a_bucket_is_looked_up_there(fake_gcs):
  with pytest.raises(FileNotFoundError, match=f"no checkpoint directory at {fake_gcs}/none$"):
    pretrained.restore_params(f"{fake_gcs}/none", {"w": jnp.zeros(3)})
