"""The `arg` of every config: None (full size), "demo" (minutes on a CPU) or "smoke" (seconds).

`parse` gives the size, which picks the values that change with it: one value with
`size.pick(full=64, demo=32, smoke=32)`, a block of fields with a per-size table, one row a
size (`size.table(full=dict(...), demo=dict(...), smoke=dict(...), **shared)`).
"""

SIZES = ("full", "demo", "smoke")


def pick(size, *, full, demo, smoke):
  """The value for this size."""
  return {"full": full, "demo": demo, "smoke": smoke}[size]


class Size(str):
  """One of `SIZES` (a `str`), which picks per-size values."""

  def pick(self, *, full, demo, smoke):
    """The value for this size."""
    return pick(self, full=full, demo=demo, smoke=smoke)

  def table(self, *, full, demo, smoke, **shared):
    """A block of fields: `shared` (the same at every size), then this size's row.

    Args:
      full: the fields that change with the size, as a dict, at full size.
      demo: the same fields at demo size.
      smoke: the same fields at smoke size.
      **shared: fields with one value at every size.

    Returns:
      A new dict: `shared`, then the row of this size.

    Raises:
      ValueError: when the rows do not name the same fields, or a row names a shared field.
    """
    rows = {"full": full, "demo": demo, "smoke": smoke}
    for name, row in rows.items():
      if set(row) != set(full) or set(row) & set(shared):
        raise ValueError(
          f"the {name} row names {sorted(row)}: every row must name the same fields "
          f"({sorted(full)}), none of them shared ({sorted(shared)})"
        )
    return {**shared, **rows[self]}


def parse(arg):
  """The `Size` of a config argument: None is "full"; else one of `SIZES`."""
  size = arg or "full"
  if size not in SIZES:
    raise ValueError(f"config argument {arg!r} is not allowed: use one of {SIZES} (or none)")
  return Size(size)
