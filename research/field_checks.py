"""Checks of the fields of frozen settings objects (dataclasses, Flax modules) at construction."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def check_positive_int_fields(owner: Any, names: Iterable[str]) -> None:
  """Checks that each field `names` of `owner` is an int >= 1.

  Args:
    owner: the object whose attributes are checked (e.g. `self` in `__post_init__`).
    names: the attribute names, checked in this order.

  Raises:
    ValueError: for the first field that is not an int >= 1, naming it and its value.
  """
  for name in names:
    value = getattr(owner, name)
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}={value!r} is not allowed: {name} must be an int >= 1")
