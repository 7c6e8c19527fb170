"""The one seed-statistics rule, against scipy and the sentence in METHODS.md."""

import math

import numpy as np
import pytest
import scipy.stats

from research.study import stats


def test_summarize_is_mean_sample_std_and_standard_error_skipping_nan():
  v = [0.5, 0.7, np.nan, 0.9]
  s = stats.summarize(v)
  finite = np.array([0.5, 0.7, 0.9])
  assert s.n == 3
  assert np.isclose(s.mean, 0.7)
  assert np.isclose(s.std, np.std(finite, ddof=1))
  assert np.isclose(s.se, scipy.stats.sem(finite))
  one = stats.summarize([0.3])
  assert one.mean == 0.3 and one.n == 1 and math.isnan(one.std) and math.isnan(one.se)
  assert stats.summarize([np.nan, np.nan]).n == 0


def test_format_mean_std():
  assert stats.format_mean_std(stats.summarize([1.0, 2.0, 3.0])) == "2 ± 1 (n=3)"
  assert stats.format_mean_std(stats.summarize([0.5]), scale=100) == "50 (n=1)"
  assert stats.format_mean_std(stats.summarize([])) == "n/a"


def _pairs(diffs, base=0.5):
  return {s: base + d for s, d in enumerate(diffs)}, {s: base for s in range(len(diffs))}


def test_a_win_needs_every_seed_positive_and_the_mean_outside_two_standard_errors():
  d = np.array([0.020, 0.030, 0.025])
  assert d.mean() > 2 * scipy.stats.sem(d)
  v = stats.paired_verdict(*_pairs(d))
  assert v.verdict == stats.WINS and v.n == 3
  assert np.isclose(v.mean_diff, d.mean()) and np.isclose(v.se, scipy.stats.sem(d))
  assert stats.paired_verdict(*_pairs(-d)).verdict == stats.LOSES


def test_a_positive_mean_that_one_seed_contradicts_is_a_tie():
  # The mean is outside 2 SE, but one seed is negative: the rule says tie.
  d = np.array([0.5, 0.6, 0.55, 0.52, -0.01])
  assert d.mean() > 2 * scipy.stats.sem(d)  # the old mean-only rule called this a win
  assert stats.paired_verdict(*_pairs(d)).verdict == stats.TIES


def test_noise_and_single_seed_are_ties():
  noisy = np.array([0.03, -0.02, 0.01])
  assert stats.paired_verdict(*_pairs(noisy)).verdict == stats.TIES
  v = stats.paired_verdict({0: 0.9}, {0: 0.1})
  assert v.verdict == stats.TIES and v.n == 1 and math.isnan(v.se)


def test_only_shared_finite_seeds_are_paired_and_lower_is_better_flips_the_sign():
  method = {0: 1.0, 1: 2.0, 2: 3.0, 3: np.nan, 7: 5.0}
  baseline = {0: 2.0, 1: 3.1, 2: 4.05, 3: 1.0}
  v = stats.paired_verdict(method, baseline, higher_is_better=False)
  assert v.n == 3 and v.verdict == stats.WINS
  assert v.diffs == pytest.approx((1.0, 1.1, 1.05))
  assert stats.paired_verdict(method, baseline, higher_is_better=False, min_effect=2.0).verdict == (
    stats.TIES
  )
