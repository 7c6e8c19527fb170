"""Up-front config validation: one sentence naming the field, the value and what is allowed."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any


class ConfigError(ValueError):
  """A configuration value is not allowed."""


def get_field(config: Any, field: str) -> Any:
  """Reads a dotted field (`train.steps`) of a ConfigDict, failing with its full name."""
  value = config
  for part in field.split("."):
    try:
      value = value[part]
    except (KeyError, AttributeError) as e:
      raise ConfigError(f"config.{field} is missing: the experiment needs it") from e
  return value


_REQUIRED = object()


def check_choice(
  config: Any, field: str, allowed: Collection[Any], default: Any = _REQUIRED
) -> Any:
  """The field's value, which must be one of `allowed` (`default` when given and it is absent)."""
  try:
    value = get_field(config, field)
  except ConfigError:
    if default is _REQUIRED:
      raise
    value = default
  if value not in allowed:
    raise ConfigError(f"config.{field}={value!r} is not allowed: choose one of {sorted(allowed)}")
  return value


def check_int(config: Any, field: str, minimum: int | None = None, maximum: int | None = None):
  """The field's value, which must be an int within [minimum, maximum]."""
  value = get_field(config, field)
  if not isinstance(value, int) or isinstance(value, bool):
    raise ConfigError(f"config.{field}={value!r} is not allowed: it must be an integer")
  _check_bounds(field, value, minimum, maximum)
  return value


def check_float(
  config: Any,
  field: str,
  minimum: float | None = None,
  maximum: float | None = None,
  exclusive_minimum: bool = False,
) -> float:
  """The field's value, which must be a number within the bounds."""
  value = get_field(config, field)
  if not isinstance(value, int | float) or isinstance(value, bool):
    raise ConfigError(f"config.{field}={value!r} is not allowed: it must be a number")
  if exclusive_minimum and minimum is not None and value <= minimum:
    raise ConfigError(f"config.{field}={value!r} is not allowed: it must be > {minimum}")
  _check_bounds(field, value, minimum, maximum)
  return float(value)


def _check_bounds(field: str, value: float, minimum: float | None, maximum: float | None) -> None:
  if minimum is not None and value < minimum:
    raise ConfigError(f"config.{field}={value!r} is not allowed: it must be >= {minimum}")
  if maximum is not None and value > maximum:
    raise ConfigError(f"config.{field}={value!r} is not allowed: it must be <= {maximum}")
