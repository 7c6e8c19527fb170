"""The TPU VM plan: every remote argument arrives as typed, only tracked files are shipped."""

import pathlib
import shlex
import subprocess
import sys

import pytest

from launch import tpu_vm

ROOT = pathlib.Path(__file__).resolve().parents[2]
OVERRIDES = ("data.domains=('day','dusk')", 'model.name="res net"', "train.steps=5")


def _job(**kwargs):
  defaults = dict(
    tpu="t1",
    zone="z1",
    accelerator="v4-8",
    version="v",
    config="configs/uap_street.py:demo",
    workdir="gs://bucket/runs/my run",
    data_dir="gs://bucket/tensorflow datasets",
    overrides=OVERRIDES,
    prepare=("cityscapes",),
  )
  return tpu_vm.Job(**{**defaults, **kwargs})


def _remote_words(command):
  """The words the worker's shell will see for an ssh command of the plan."""
  return shlex.split(command[command.index("--command") + 1])


def test_overrides_with_quotes_parentheses_and_spaces_reach_the_workers_unchanged():
  job = _job()
  run = [c for c in tpu_vm.plan(job) if "--command" in c and "launch.main" in c[-1]]
  assert len(run) == 1 and "--worker=all" in run[0]
  words = _remote_words(run[0])
  main_argv = words[words.index("&&") + 1 :]
  assert main_argv == tpu_vm.run_argv(job)
  assert "--workdir=gs://bucket/runs/my run" in main_argv
  assert "--config.data.data_dir=gs://bucket/tensorflow datasets" in main_argv
  for override in OVERRIDES:
    assert f"--config.{override}" in main_argv
  assert main_argv[-1] == "--distributed"


def test_only_tracked_files_are_shipped_and_data_is_prepared_on_worker_zero():
  commands = tpu_vm.plan(_job())
  assert ["git", "archive", "--format=tar.gz", f"--output={tpu_vm.ARCHIVE}", "HEAD"] in commands
  assert not any("--recurse" in c and "." in c for c in commands)
  prepare = [c for c in commands if "--command" in c and "tfds" in c[-1]]
  assert len(prepare) == 1 and "--worker=0" in prepare[0]
  words = _remote_words(prepare[0])
  assert words[words.index("tfds") :] == [
    "tfds", "build", "cityscapes", "--file_format=array_record",
    "--data_dir=gs://bucket/tensorflow datasets",
  ]  # fmt: skip
  assert commands[-1] == ["gcloud", "storage", "cp", "-r", "gs://bucket/runs/my run", "runs/tpu"]


def test_workdir_defaults_to_the_bucket_and_needs_one():
  assert (
    tpu_vm.default_workdir("b", "t1", "configs/uap_street.py:demo") == "gs://b/runs/t1/uap_street"
  )
  with pytest.raises(ValueError, match="--bucket is required"):
    tpu_vm.default_workdir(None, "t1", "configs/uap_street.py")


def test_dry_run_prints_the_plan():
  out = subprocess.run(
    [
      sys.executable, "-m", "launch.tpu_vm", "--tpu=t1", "--zone=z1", "--dry_run", "--bucket=b",
      "--config=configs/segmentation_street.py", "--override=train.steps=7",
    ],
    cwd=ROOT, capture_output=True, text=True, timeout=120,
  )  # fmt: skip
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert lines[0].startswith("gcloud compute tpus tpu-vm create t1 --zone=z1")
  run = [line for line in lines if "launch.main" in line]
  assert len(run) == 1 and "--config.train.steps=7" in run[0] and "--distributed" in run[0]
  assert lines[-1] == "gcloud storage cp -r gs://b/runs/t1/segmentation_street runs/tpu"
