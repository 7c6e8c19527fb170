"""Seed statistics against scipy and numpy references."""

import numpy as np
import scipy.stats

from research.metrics import seeds


def test_mean_std_is_the_sample_std_and_skips_nan():
  v = [0.5, 0.7, np.nan, 0.9]
  mean, std = seeds.mean_std(v)
  assert np.isclose(mean, 0.7) and np.isclose(std, np.std([0.5, 0.7, 0.9], ddof=1))
  assert seeds.mean_std([0.3]) == (0.3, 0.0)
  assert all(np.isnan(seeds.mean_std([np.nan, np.nan])))


def test_verdict_against_scipy_standard_error():
  d = np.array([0.020, 0.030, 0.025])
  band = 2 * scipy.stats.sem(d)
  assert d.mean() > band and seeds.verdict(d) == "wins"
  assert seeds.verdict(-d) == "loses"
  noisy = np.array([0.03, -0.02, 0.01])
  assert abs(noisy.mean()) < 2 * scipy.stats.sem(noisy)
  assert seeds.verdict(noisy) == "ties"
  assert seeds.verdict(np.array([0.004])) == "ties"  # one seed: the 0.5-point band
  assert seeds.verdict(np.array([0.006])) == "wins"
