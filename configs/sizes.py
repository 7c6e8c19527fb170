"""The `arg` of every config: None (full size), "demo" (minutes on a CPU) or "smoke" (seconds)."""

SIZES = ("full", "demo", "smoke")


def parse(arg):
  """Normalises a config argument to one of `SIZES`."""
  size = arg or "full"
  if size not in SIZES:
    raise ValueError(f"config argument {arg!r} is not allowed: use one of {SIZES} (or none)")
  return size


def pick(size, *, full, demo, smoke):
  """The value for this size."""
  return {"full": full, "demo": demo, "smoke": smoke}[size]
