"""Statistics over repeated runs (seeds): mean and spread, and paired verdicts."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof 1) over seeds, ignoring NaN entries.

  Args:
    values: one number per seed; NaN marks a seed without a value (e.g. an empty group).

  Returns:
    ``(mean, std)``: NaN for both when every value is NaN; std 0 for a single seed.
  """
  v = np.asarray(values, np.float64)
  if np.isnan(v).all():
    return float("nan"), float("nan")
  return float(np.nanmean(v)), float(np.nanstd(v, ddof=1)) if len(v) > 1 else 0.0


def verdict(differences: Sequence[float], tie_band: float = 0.005) -> str:
  """'wins', 'ties' or 'loses' from paired per-seed differences (method - baseline).

  A win (loss) needs the mean difference above (below) ``max(2 SE, tie_band)``, where SE is
  the standard error of the paired differences (0 for a single seed).

  Args:
    differences: ``[S]`` per-seed differences on the metric's own scale.
    tie_band: the smallest mean difference that counts, on the same scale.
  """
  d = np.asarray(differences, np.float64)
  se = float(np.std(d, ddof=1) / math.sqrt(d.size)) if d.size > 1 else 0.0
  band = max(2.0 * se, tie_band)
  mean = float(np.mean(d))
  return "wins" if mean > band else "loses" if mean < -band else "ties"
