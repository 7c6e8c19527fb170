"""Tests of research.long_tail.settings: every wrong value fails naming its field."""

import numpy as np
import pytest

from configs import long_tail_digits
from research import config_checks
from research.long_tail.settings import Settings


def test_smoke_settings_read_the_config():
  settings = Settings.from_config(long_tail_digits.get_config("smoke"))
  assert settings.methods == ("dual", "ce") and settings.seeds == (0,)
  assert settings.head.batch_size == 8 and settings.head.threshold == 40
  assert settings.head.ratio is None and settings.head.p is None  # not read in threshold mode
  assert (settings.triplet.p, settings.triplet.k) == (4, 2)
  assert settings.images_per_step("dual") == 8 + 4 * 2 == settings.images_per_step("ce")
  assert settings.images_per_step("triplet") == 4 * 2  # the dual arm's P x K batch
  assert settings.schedule == "joint"


def test_schedules_of_the_dual_arms():
  config = long_tail_digits.get_config("smoke")
  settings = Settings.from_config(config)
  assert settings.arm_schedule("dual") == settings.arm_schedule("dual_all_head") == "joint"
  assert settings.arm_schedule("dual_alternating") == "alternating"
  assert settings.arm_schedule("ce") is None and settings.updates_per_step("ce") == 1
  assert settings.updates_per_step("dual_alternating") == 2
  assert settings.images_per_step("dual_alternating") == settings.images_per_step("dual")
  config.train.schedule = "alternating"
  settings = Settings.from_config(config)
  assert settings.arm_schedule("dual") == "alternating" and settings.updates_per_step("dual") == 2
  config.methods = ("dual", "dual_alternating")
  with pytest.raises(config_checks.ConfigError, match="'dual_alternating' is not allowed"):
    Settings.from_config(config)


def test_all_head_ablation_puts_every_class_in_the_head():
  settings = Settings.from_config(long_tail_digits.get_config("smoke"))
  counts = np.array([124, 74, 44, 26, 16, 9, 5, 3, 2, 1])
  np.testing.assert_array_equal(np.flatnonzero(settings.head_mask(counts)), [0, 1, 2])
  assert settings.head_mask(counts, "dual_all_head").all()
  np.testing.assert_array_equal(
    settings.head_mask(counts, "dual_alternating"), settings.head_mask(counts)
  )


@pytest.mark.parametrize(
  "field,value,match",
  [
    ("triplet.k", 1, "triplet.k=1"),
    ("triplet.p", 1, "triplet.p=1"),
    ("head.mode", "best", "head.mode='best'"),
    ("data.imbalance_ratios", (0.5,), "imbalance_ratios"),
    ("methods", ("ce",), "methods"),
    ("loss.lambda_ce", -1.0, "lambda_ce=-1.0"),
    ("train.batch_size", 0, "batch_size=0"),
    ("train.head_batch_size", 0, "head_batch_size=0"),
    ("train.schedule", "parallel", "train.schedule='parallel'"),
    ("methods", ("dual", "dual_head"), "methods"),
  ],
)
def test_from_config_names_the_field(field, value, match):
  config = long_tail_digits.get_config("smoke")
  section, key = field.split(".") if "." in field else (None, field)
  (config[section] if section else config)[key] = value
  with pytest.raises(config_checks.ConfigError, match=match):
    Settings.from_config(config)


def test_both_loss_weights_zero_and_head_p_not_dividing_are_rejected():
  config = long_tail_digits.get_config("smoke")
  config.loss.lambda_ce = config.loss.lambda_tri = 0.0
  with pytest.raises(config_checks.ConfigError, match="one must be > 0"):
    Settings.from_config(config)
  config = long_tail_digits.get_config("smoke")
  config.head.sampling, config.head.p = "pk", 3
  with pytest.raises(config_checks.ConfigError, match="head.p=3 .* divide"):
    Settings.from_config(config)


def test_head_ratio_outside_unit_interval_is_rejected():
  config = long_tail_digits.get_config("smoke")
  config.head.mode, config.head.ratio = "ratio", 1.5
  with pytest.raises(config_checks.ConfigError, match="head.ratio=1.5"):
    Settings.from_config(config)


def test_p_larger_than_classes_and_empty_head_set_are_rejected():
  config = long_tail_digits.get_config("smoke")
  config.triplet.p = 8
  settings = Settings.from_config(config)
  with pytest.raises(config_checks.ConfigError, match="triplet.p=8 .* number of classes"):
    settings.check_p_fits(5, 3)
  config.head.threshold = 1000
  with pytest.raises(ValueError, match="head set is empty"):
    Settings.from_config(config).head_mask(np.array([124, 50, 12]))
