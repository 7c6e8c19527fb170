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
  p.stem for p in (ROOT / "configs").glob("*.py") if p.stem not in ("__init__", "sizes")
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


def test_main_runs_smoke_config_and_resumes(tmp_path):
  env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": ""}
  cmd = [
    sys.executable,
    "-m",
    "launch.main",
    f"--config={ROOT}/configs/classification_digits.py:smoke",
    f"--workdir={tmp_path}",
    "--config.train.steps=3",
  ]
  first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["rows"][0]["metric"] == "test accuracy"
  assert (tmp_path / "report.md").exists() and (tmp_path / "plots" / "confusion.png").exists()
  second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "first step" not in second.stderr  # resumed at step 3: nothing left to train
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert sum('"phase": "train"' in line for line in lines) == 2  # logged at steps 2 and 3 once


def test_tpu_vm_dry_run_prints_the_plan():
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "launch.tpu_vm",
      "--tpu=t1",
      "--zone=z1",
      "--dry_run",
      "--config=configs/segmentation_street.py",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert lines[0].startswith("gcloud compute tpus tpu-vm create t1 --zone=z1")
  assert any(
    "--worker=all" in line and "launch.main" in line and "--distributed" in line for line in lines
  )
  assert lines[-1].endswith("runs/tpu --zone=z1 --worker=0")
