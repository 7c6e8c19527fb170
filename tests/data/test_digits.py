import numpy as np
import pytest

from research.data import digits


def test_split_sizes_and_balanced_test():
  arrays = digits.load_digits_arrays()
  assert arrays["train"]["image"].shape == (1297, 8, 8, 1)
  assert np.all(np.bincount(arrays["test"]["label"]) == digits.TEST_PER_CLASS)
  assert arrays["train"]["image"].max() == 255


def test_long_tailed_counts_follow_exponential_profile():
  counts = digits.long_tailed_counts(100, 10, 10.0)
  expected = [int(np.floor(100 * 10.0 ** (-i / 9))) for i in range(10)]
  assert counts.tolist() == expected
  assert counts[0] == 100 and counts[-1] == 10


def test_long_tailed_indices_per_class():
  labels = np.repeat(np.arange(4), 20)
  idx = digits.long_tailed_indices(labels, 4.0, n_max=20, seed=0)
  assert np.bincount(labels[idx]).tolist() == [20, 12, 7, 5]
  assert len(np.unique(idx)) == len(idx)
  np.testing.assert_array_equal(idx, digits.long_tailed_indices(labels, 4.0, n_max=20, seed=0))


def test_long_tailed_errors():
  with pytest.raises(ValueError, match="imbalance_ratio=0.5"):
    digits.long_tailed_counts(10, 3, 0.5)
  with pytest.raises(ValueError, match="n_max=50"):
    digits.long_tailed_indices(np.repeat(np.arange(3), 10), 2.0, n_max=50)
