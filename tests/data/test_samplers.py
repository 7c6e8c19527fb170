import numpy as np
import pytest

from research.data import samplers


def test_random_sampler_covers_each_epoch_once():
  s = samplers.RandomSampler(10, 5, seed=1)
  epoch = np.concatenate([s.indices(0), s.indices(1)])
  assert sorted(epoch.tolist()) == list(range(10))
  np.testing.assert_array_equal(s.indices(3), samplers.RandomSampler(10, 5, seed=1).indices(3))
  wrap = samplers.RandomSampler(10, 4, seed=1)
  first_two_epochs = np.concatenate([wrap.indices(i) for i in range(5)])
  assert sorted(first_two_epochs.tolist()) == sorted(list(range(10)) * 2)


def test_class_balanced_sampler_is_balanced():
  labels = np.array([0] * 90 + [1] * 9 + [2] * 1)
  s = samplers.ClassBalancedSampler(labels, 300, seed=0)
  freq = np.bincount(labels[np.concatenate([s.indices(i) for i in range(20)])]) / 6000
  np.testing.assert_allclose(freq, 1 / 3, atol=0.03)


def test_pk_sampler_structure_and_replacement():
  labels = np.array([0] * 10 + [1] * 2 + [2] * 6 + [3] * 7)
  s = samplers.PKSampler(labels, p=3, k=4, seed=0)
  for step in range(30):
    idx = s.indices(step)
    groups = labels[idx].reshape(3, 4)
    assert np.all(groups == groups[:, :1])  # each group one class
    assert len(np.unique(groups[:, 0])) == 3  # distinct classes
    for g, members in zip(groups[:, 0], idx.reshape(3, 4)):
      if (labels == g).sum() >= 4:
        assert len(np.unique(members)) == 4  # without replacement when possible
  seen = np.concatenate([s.indices(i) for i in range(200)])
  assert set(np.unique(labels[seen])) == {0, 1, 2, 3}


def test_sampler_errors():
  labels = np.array([0, 0, 1, 1, 1])
  with pytest.raises(ValueError, match="p=3"):
    samplers.PKSampler(labels, p=3, k=2)
  with pytest.raises(ValueError, match="k=3"):
    samplers.PKSampler(labels, p=2, k=3, allow_replacement=False)
  with pytest.raises(ValueError, match="empty classes \\[1\\]"):
    samplers.ClassBalancedSampler(np.array([0, 2]), 4, num_classes=3)
  with pytest.raises(ValueError, match="batch_size=0"):
    samplers.RandomSampler(5, 0)


def test_process_slice():
  idx = np.arange(8)
  parts = [samplers.process_slice(idx, i, 4) for i in range(4)]
  np.testing.assert_array_equal(np.concatenate(parts), idx)
  with pytest.raises(ValueError, match="process_count=3"):
    samplers.process_slice(idx, 0, 3)
