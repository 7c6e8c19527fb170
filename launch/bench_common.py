"""What every benchmark script records about the machine it ran on."""

from __future__ import annotations

import importlib
import os
import platform

_PEERS = (
  "jax",
  "jaxlib",
  "flax",
  "optax",
  "ott",
  "torch",
  "ot",
  "pytorch_metric_learning",
  "scipy",
)


def cpu_model() -> str:
  """The CPU model name from /proc/cpuinfo ("unknown" elsewhere)."""
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  return "unknown"


def machine_info() -> dict:
  """CPU model, cores, load average, JAX devices and versions of the installed libraries."""
  import jax

  info = {
    "cpu": cpu_model(),
    "cores": os.cpu_count(),
    "load_average_1_5_15": list(os.getloadavg()),
    "python": platform.python_version(),
    "devices": [str(d) for d in jax.devices()],
  }
  for name in _PEERS:
    try:
      info[name] = importlib.import_module(name).__version__
    except (ImportError, AttributeError):
      info[name] = None
  if info["torch"] is not None:
    import torch

    info["torch_threads"] = torch.get_num_threads()
  return info
