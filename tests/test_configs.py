"""Every config loads at every size and declares `model.backbone` and `model.dtype`, which its
experiment's settings accept, also when set on the command line (no training here)."""

import importlib
import pathlib
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from configs import sizes
from research import config_checks, experiments
from research.models import resnet

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(
  p.stem for p in (ROOT / "configs").glob("*.py") if p.stem not in ("__init__", "sizes", "common")
)


def validate(config):
  """The experiment's up-front check (its typed settings, or the baselines' `validate`), then
  `resnet.model_options`, which every model builder calls."""
  module = sys.modules[experiments.get_train_and_evaluate(config.experiment).__module__]
  if module.__name__.startswith("research.supervised."):
    module.validate(config)
  else:
    package = module.__name__.rpartition(".")[0]
    importlib.import_module(f"{package}.settings").Settings.from_config(config)
  return resnet.model_options(config)


def command_line(name, *overrides):
  """The config as `launch.main` reads it: `--config=configs/NAME.py:smoke OVERRIDES`."""
  argv = ["main", f"--config={ROOT / 'configs' / name}.py:smoke", *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=values, lock_config=True, sys_argv=argv)
  values(argv)
  return values.config


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_at_every_size_with_the_default_backbone(name):
  module = importlib.import_module(f"configs.{name}")
  for arg in (None, "demo", "smoke"):
    config = module.get_config(arg)
    assert (config.model.backbone, config.model.dtype) == ("small", "float32"), (name, arg)
  assert validate(module.get_config("smoke")) == {"backbone": "small", "dtype": None}


@pytest.mark.parametrize("name", CONFIGS)
def test_backbone_and_dtype_are_set_on_the_command_line(name):
  config = command_line(name, "--config.model.backbone=resnet18", "--config.model.dtype=bfloat16")
  assert validate(config) == {"backbone": "resnet18", "dtype": resnet.DTYPES["bfloat16"]}
  config = command_line(name, "--config.model.backbone=resnet34")
  with pytest.raises(config_checks.ConfigError, match=r"config\.model\.backbone='resnet34'"):
    validate(config)


def test_a_size_table_needs_the_same_fields_in_every_row():
  size = sizes.parse("demo")
  assert size.table(a=0, full=dict(b=1), demo=dict(b=2), smoke=dict(b=3)) == {"a": 0, "b": 2}
  with pytest.raises(ValueError, match="every row must name the same fields"):
    size.table(full=dict(b=1), demo=dict(c=2), smoke=dict(b=3))
  with pytest.raises(ValueError, match="not allowed"):
    sizes.parse("tiny")
