import importlib
import json
import os
import pathlib
import subprocess
import sys

import pytest

from research import config_checks, experiments

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = sorted(
  p.stem for p in (ROOT / "configs").glob("*.py") if p.stem not in ("__init__", "sizes", "common")
)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("size", [None, "demo", "smoke"])
def test_every_config_loads_and_names_a_known_experiment(name, size):
  config = importlib.import_module(f"configs.{name}").get_config(size)
  assert config.experiment in experiments.EXPERIMENTS


def test_bad_config_argument_and_unknown_experiment():
  from configs import classification_digits

  with pytest.raises(ValueError, match="'huge'"):
    classification_digits.get_config("huge")
  with pytest.raises(ValueError, match="config.experiment='nope' is not known"):
    experiments.get_train_and_evaluate("nope")


def test_validation_names_field_value_and_allowed():
  from configs import classification_digits, segmentation_street
  from research.supervised import classification, segmentation

  config = classification_digits.get_config("smoke")
  config.data.name = "imagenet"
  with pytest.raises(config_checks.ConfigError, match=r"config.data.name='imagenet'.*digits"):
    classification.validate(config)
  config = classification_digits.get_config("smoke")
  config.train.steps = 0
  with pytest.raises(config_checks.ConfigError, match="config.train.steps=0.*>= 1"):
    classification.validate(config)
  config = segmentation_street.get_config("smoke")
  config.data.heldout_domains = ("snow",)
  with pytest.raises(config_checks.ConfigError, match="heldout_domains"):
    segmentation.validate(config)


def test_main_runs_smoke_config_resumes_refuses_a_changed_config_and_restarts(tmp_path):
  env = {
    **os.environ,
    "PYTHONPATH": str(ROOT),
    "XLA_FLAGS": "",
    "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
  }
  workdir = tmp_path / "run"
  cmd = [
    sys.executable,
    "-m",
    "launch.main",
    f"--config={ROOT}/configs/classification_digits.py:smoke",
    f"--workdir={workdir}",
    "--config.train.steps=3",
  ]

  def run(*extra):
    return subprocess.run(
      cmd + list(extra), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )

  first = run()
  assert first.returncode == 0, first.stderr[-3000:]
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["rows"][0]["metric"] == "test accuracy"
  assert (workdir / "report.md").exists() and (workdir / "plots" / "confusion.png").exists()
  second = run()
  assert second.returncode == 0, second.stderr[-3000:]
  assert "first step" not in second.stderr  # resumed at step 3: nothing left to train
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  assert sum('"phase": "train"' in line for line in lines) == 2  # logged at steps 2 and 3 once

  changed = run("--config.optim.name=sgd")  # another optimizer state: another run's checkpoints
  assert changed.returncode != 0
  assert "CheckpointMismatchError: the checkpoint of step 3 in" in changed.stderr
  assert "was written by another run" in changed.stderr and "--restart" in changed.stderr
  restarted = run("--config.optim.name=sgd", "--restart")
  assert restarted.returncode == 0, restarted.stderr[-3000:]
  assert "--restart: deleted 1 checkpoint folder(s)" in restarted.stderr
  assert "first step" in restarted.stderr  # trained again from step 0


def test_second_run_on_a_workdir_fails_at_once(tmp_path):
  hold = (
    "import sys, time; from research.training import workdir_lock; "
    "workdir_lock.acquire(sys.argv[1]); print('locked', flush=True); time.sleep(600)"
  )
  env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": ""}
  holder = subprocess.Popen(
    [sys.executable, "-c", hold, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True
  )
  try:
    assert holder.stdout.readline().strip() == "locked"
    second = subprocess.run(
      [
        sys.executable,
        "-m",
        "launch.main",
        f"--config={ROOT}/configs/classification_digits.py:smoke",
        f"--workdir={tmp_path}",
      ],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
    )
  finally:
    holder.kill()
    holder.wait()
  assert second.returncode != 0
  assert f"workdir {tmp_path} is in use by another run (pid {holder.pid})" in second.stderr
  assert not (tmp_path / "metrics.jsonl").exists()  # it stopped before doing anything
