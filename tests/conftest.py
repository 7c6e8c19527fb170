"""Shared pytest set-up: eight fake CPU devices and a seeded PRNG key fixture."""

import os

# Must run before JAX is imported anywhere: multi-device code is tested on fake CPU devices.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng():
  """A fixed PRNG key, so every test is deterministic."""
  return jax.random.key(0)
