"""Shared pytest set-up: eight fake CPU devices, a compilation cache and a seeded PRNG key."""

import os

# Must run before JAX is imported anywhere: multi-device code is tested on fake CPU devices.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole run, shared by the xdist workers and by the
# processes the tests start (notebook kernels, launch scripts): the smoke experiments, their
# notebooks and the step tests compile many identical programs. XLA's output is keyed by the
# program, its compile options and the JAX version, so a hit gives the same executable.
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR",
  os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "jax_tests"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(1 << 30))  # oldest entries go first

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng():
  """A fixed PRNG key, so every test is deterministic."""
  return jax.random.key(0)
