"""One seed-statistics rule for the whole codebase (METHODS.md "How every comparison is judged").

* Spread over seeds is the sample standard deviation (ddof = 1); the standard error is
  `std / sqrt(n)`.
* A paired verdict compares a method with a baseline seed by seed: it *wins* only when every
  per-seed difference (method - baseline, oriented so that positive is better) is positive and
  the mean difference is above 2 standard errors of the differences (and above `min_effect`);
  it *loses* on the mirror condition; everything else is a *tie*, including a positive mean
  that one seed contradicts. Fewer than 2 paired seeds can never win or lose.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

WINS, TIES, LOSES = "wins", "ties", "loses"


@dataclasses.dataclass(frozen=True)
class SeedSummary:
  """Mean, sample std (ddof 1), standard error and count of the finite per-seed values."""

  mean: float
  std: float
  se: float
  n: int

  def __str__(self) -> str:
    return format_mean_std(self)


def summarize(values: Sequence[float]) -> SeedSummary:
  """`SeedSummary` of per-seed values, ignoring NaN (e.g. a seed with an empty group).

  Args:
    values: `[S]` one number per seed.

  Returns:
    mean, std and se are NaN when no value is finite; std and se are NaN for a single value
    (a spread cannot be estimated from one seed).
  """
  v = np.asarray(values, np.float64)
  v = v[~np.isnan(v)]
  n = int(v.size)
  if n == 0:
    return SeedSummary(math.nan, math.nan, math.nan, 0)
  if n == 1:
    return SeedSummary(float(v[0]), math.nan, math.nan, 1)
  std = float(np.std(v, ddof=1))
  return SeedSummary(float(np.mean(v)), std, std / math.sqrt(n), n)


def format_mean_std(s: SeedSummary, scale: float = 1.0, digits: int = 4) -> str:
  """`mean ± std (n=S)` with `digits` significant digits, values multiplied by `scale`."""
  if s.n == 0:
    return "n/a"
  mean = f"{s.mean * scale:.{digits}g}"
  if s.n == 1:
    return f"{mean} (n=1)"
  return f"{mean} ± {s.std * scale:.{digits}g} (n={s.n})"


@dataclasses.dataclass(frozen=True)
class Verdict:
  """A paired comparison of a method with a baseline over seeds.

  Attributes:
    verdict: `wins`, `ties` or `loses` (from the method's side).
    mean_diff: mean of the per-seed differences (method - baseline, higher is better side).
    se: standard error of the differences (NaN with fewer than 2 pairs).
    n: number of paired seeds.
    diffs: the per-seed differences, in seed order.
  """

  verdict: str
  mean_diff: float
  se: float
  n: int
  diffs: tuple[float, ...]

  def __str__(self) -> str:
    if self.n == 0:
      return "no paired seeds"
    return f"{self.verdict} ({self.mean_diff:+.4g} ± 2×{self.se:.2g} SE, n={self.n})"


def paired_verdict(
  method: Mapping[int, float],
  baseline: Mapping[int, float],
  *,
  higher_is_better: bool = True,
  min_effect: float = 0.0,
) -> Verdict:
  """The paired verdict of `method` against `baseline` on the seeds both have.

  Args:
    method: `{seed: value}` of the method.
    baseline: `{seed: value}` of the baseline.
    higher_is_better: False for metrics such as forgetting or loss.
    min_effect: a mean difference at or below this never counts (metric's own scale).

  Returns:
    the `Verdict`; seeds with a NaN on either side are left out.
  """
  seeds = sorted(
    s for s in set(method) & set(baseline) if not (math.isnan(method[s]) or math.isnan(baseline[s]))
  )
  sign = 1.0 if higher_is_better else -1.0
  d = np.asarray([sign * (method[s] - baseline[s]) for s in seeds], np.float64)
  n = int(d.size)
  if n == 0:
    return Verdict(TIES, math.nan, math.nan, 0, ())
  mean = float(np.mean(d))
  if n < 2:
    return Verdict(TIES, mean, math.nan, n, tuple(d.tolist()))
  se = float(np.std(d, ddof=1) / math.sqrt(n))
  band = max(2.0 * se, min_effect)
  if np.all(d > 0) and mean > band:
    outcome = WINS
  elif np.all(d < 0) and mean < -band:
    outcome = LOSES
  else:
    outcome = TIES
  return Verdict(outcome, mean, se, n, tuple(d.tolist()))
