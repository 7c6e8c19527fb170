"""Tests of research.norm_selection.core against independent brute-force references."""

import math

import chex
import jax
import numpy as np
import pytest
import scipy.stats

from research.norm_selection import core

# ----------------------------------------------------------------------------------------------
# Brute-force references (Python loops and sorts, written from METHODS.md M2 step 3).


def reference_select(norms, labels, mask, m, a=None, mean_mask=None):
  """Per-class dict: the chosen set, and the upper / lower picks in their draw orders.

  The class mean is over `mean_mask` (default: every sample of the class, its original set).
  """
  a = math.ceil(m / 2) if a is None else a
  out = {}
  for c in sorted(set(labels.tolist())):
    idx = [i for i in range(len(norms)) if labels[i] == c and mask[i]]
    if not idx:
      out[c] = ([], [])
      continue
    over = [i for i in range(len(norms)) if labels[i] == c and (mean_mask is None or mean_mask[i])]
    mu = sum(float(norms[i]) for i in over) / len(over)
    up = sorted([i for i in idx if norms[i] >= mu], key=lambda i: (norms[i], i))
    lo = sorted([i for i in idx if norms[i] < mu], key=lambda i: (-norms[i], i))
    n_up, n_lo = a, m - a
    if len(up) < n_up:
      n_up, n_lo = len(up), m - len(up)
    elif len(lo) < n_lo:
      n_up, n_lo = m - len(lo), len(lo)
    out[c] = (up[:n_up], lo[:n_lo])
  return out


def interleave(up, lo):
  merged = []
  for i in range(max(len(up), len(lo))):
    merged += up[i : i + 1] + lo[i : i + 1]
  return merged


def split_by_class(indices, labels):
  per_class = {}
  for i in indices.tolist():
    per_class.setdefault(int(labels[i]), []).append(i)
  return per_class


def random_problem(seed, num=60, num_classes=4, ties=False):
  gen = np.random.default_rng(seed)
  labels = gen.integers(0, num_classes, num)
  labels[:num_classes] = np.arange(num_classes)  # every class present
  if ties:
    norms = gen.integers(0, 4, num) / 4.0  # exact binary fractions: many ties, exact means
  else:
    norms = gen.random(num).astype(np.float32)
  mask = gen.random(num) < 0.8
  return norms, labels, mask


# ----------------------------------------------------------------------------------------------
# select_per_class


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 30])
@pytest.mark.parametrize("mean_over", ["original", "pool"])
def test_select_per_class_matches_reference(seed, ties, m, mean_over):
  norms, labels, mask = random_problem(seed, ties=ties)
  gen = np.random.default_rng(seed + 100)
  mean_mask = None if mean_over == "original" else mask
  for a in [None, 0, m, int(gen.integers(0, m + 1))]:
    got = core.select_per_class(norms, labels, mask, m, a, mean_mask=mean_mask)
    ref = reference_select(norms, labels, mask, m, a, mean_mask)
    assert got.dtype == np.int64
    assert len(set(got.tolist())) == got.size
    assert np.all(mask[got])
    # Class-major output, and within each class the alternating upper/lower draw order.
    assert np.all(np.diff(labels[got]) >= 0)
    per_class = split_by_class(got, labels)
    for c, (up, lo) in ref.items():
      assert per_class.get(c, []) == interleave(up, lo), (c, a)
      num_cand = int(np.sum(mask & (labels == c)))
      assert len(per_class.get(c, [])) == min(m, num_cand)


@pytest.mark.parametrize("seed", range(4))
def test_select_per_class_prefix_is_rule_with_smaller_m(seed):
  norms, labels, mask = random_problem(seed, ties=seed % 2 == 0)
  m = 9
  per_class = split_by_class(core.select_per_class(norms, labels, mask, m), labels)
  for k in range(1, m + 1):
    ref = reference_select(norms, labels, mask, k)
    for c, (up, lo) in ref.items():
      assert set(per_class.get(c, [])[:k]) == set(up + lo)


def test_select_per_class_hand_cases():
  # Class 0: mean 2.5, upper side {3} only -> the lower side fills, ties by index.
  # Class 1: all equal -> all on the upper side (norm >= mean), lowest indices first.
  # Class 2: two samples < m -> both.
  norms = np.array([0.0, 0.0, 0.0, 10.0, 0.5, 0.5, 0.5, 0.5, 3.0, 1.0])
  labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
  got = core.select_per_class(norms, labels, np.ones(10, bool), m=3, a=2)
  np.testing.assert_array_equal(got, [3, 0, 1, 4, 5, 6, 8, 9])
  # Lower side short: class 0 with a=0 wants 3 from below (3 available), fine; with m=4, a=0
  # it takes the only upper sample too.
  got = core.select_per_class(norms[:4], labels[:4], np.ones(4, bool), m=4, a=0)
  assert sorted(got.tolist()) == [0, 1, 2, 3]


def test_select_per_class_mean_is_over_the_original_set_by_default():
  norms = np.array([1.0, 2.0, 3.0, 100.0])
  labels = np.zeros(4, int)
  # With all candidates the mean is 26.5: upper {3}.
  assert core.select_per_class(norms, labels, np.ones(4, bool), m=1).tolist() == [3]
  mask = np.array([True, True, True, False])
  # Sample 3 drawn already: the class set's mean stays 26.5 (nothing above it is left, the
  # lower side fills from its top: 3); over the current pool the mean is 2 (upper {2, 3}: 2).
  assert core.select_per_class(norms, labels, mask, m=1).tolist() == [2]
  assert core.select_per_class(norms, labels, mask, m=1, mean_mask=mask).tolist() == [1]
  with pytest.raises(ValueError, match=r"mean_mask with no sample of classes \[0\]"):
    core.select_per_class(norms, labels, mask, m=1, mean_mask=np.zeros(4, bool))


def test_select_per_class_random_ties_keep_the_rule():
  norms, labels, mask = random_problem(3, num=80, ties=True)
  by_index = core.select_per_class(norms, labels, mask, 5)
  outcomes = set()
  for seed in range(4):
    got = core.select_per_class(norms, labels, mask, 5, rng=jax.random.key(seed))
    assert np.all(mask[got]) and len(set(got.tolist())) == got.size
    # Same norms per class as the index tie-break (the rule is unchanged), maybe other samples.
    for c in range(4):
      same = sorted(norms[got][labels[got] == c]) == sorted(norms[by_index][labels[by_index] == c])
      assert same
    outcomes.add(tuple(got.tolist()))
  assert len(outcomes) > 1


def test_select_per_class_empty_pool_and_absent_class():
  norms = np.arange(6.0)
  labels = np.array([0, 0, 0, 2, 2, 2])
  assert core.select_per_class(norms, labels, np.zeros(6, bool), 2).size == 0
  got = core.select_per_class(norms, labels, np.ones(6, bool), 2)  # class 1 absent: nothing
  assert sorted(labels[got].tolist()) == [0, 0, 2, 2]


# ----------------------------------------------------------------------------------------------
# norm_values


@pytest.mark.parametrize("p", [1, 2, np.inf, "inf", float("inf"), 2.0])
def test_norm_values_against_numpy(p):
  gen = np.random.default_rng(0)
  images = gen.random((5, 4, 3, 3)).astype(np.float32)
  ord_ = np.inf if p == "inf" else p
  v = images[..., 0] * 0.299 + images[..., 1] * 0.587 + images[..., 2] * 0.114
  expected = [np.linalg.norm(v[i].ravel(), ord=ord_) for i in range(5)]
  got = core.norm_values(images, p=p)
  chex.assert_shape(got, (5,))
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)


@pytest.mark.parametrize("p", [1, 2, "inf"])
def test_norm_values_custom_weights_single_channel_and_chunks(p):
  gen = np.random.default_rng(1)
  ord_ = np.inf if p == "inf" else p
  images = gen.random((7, 3, 2, 3)).astype(np.float32)
  for weights in ([0.2, -0.5, 1.3], [-0.3, -0.6, -0.1]):  # negative v: |v| matters
    v = np.einsum("nhwc,c->nhw", images.astype(np.float64), np.asarray(weights))
    expected = [np.linalg.norm(v[i].ravel(), ord=ord_) for i in range(7)]
    np.testing.assert_allclose(core.norm_values(images, weights, p=p), expected, rtol=1e-5)
    chunked = core.norm_values(images, weights, p=p, chunk_size=3)  # chunks 3, 3, 1 (padded)
    np.testing.assert_allclose(chunked, expected, rtol=1e-5)

  gray = gen.random((4, 5, 5, 1)).astype(np.float32)
  expected = [np.linalg.norm(gray[i].ravel(), ord=ord_) for i in range(4)]
  np.testing.assert_allclose(core.norm_values(gray, p=p), expected, rtol=1e-5)


def test_norm_values_default_weights():
  np.testing.assert_allclose(core.channel_weights_for(3), [0.299, 0.587, 0.114])
  np.testing.assert_allclose(core.channel_weights_for(1), [1.0])
  np.testing.assert_allclose(core.channel_weights_for(4), [0.25] * 4)


def test_norm_values_jits():
  images = np.random.default_rng(2).random((3, 2, 2, 3)).astype(np.float32)
  got = jax.jit(core.norm_values, static_argnames="p")(images, p=1)
  np.testing.assert_allclose(got, core.norm_values(images, p=1), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# k-means and grouping


def blobs(seed=0, per=15):
  gen = np.random.default_rng(seed)
  centres = np.array([[0.0, 0.0], [30.0, 0.0], [0.0, 30.0], [30.0, 30.0]])
  truth = np.repeat(np.arange(4), per)
  return centres[truth] + gen.normal(scale=0.5, size=(truth.size, 2)), truth


def assert_same_partition(assign, truth):
  table = np.zeros((truth.max() + 1, assign.max() + 1), int)
  np.add.at(table, (truth, assign), 1)
  assert table.shape[0] == table.shape[1]
  assert np.all(np.count_nonzero(table, axis=0) == 1)
  assert np.all(np.count_nonzero(table, axis=1) == 1)


@pytest.mark.parametrize("seed", range(3))
def test_kmeans_recovers_separated_clusters(seed):
  x, truth = blobs(seed)
  assign = np.asarray(core.kmeans(jax.random.key(seed), x, 4, n_init=1))
  chex.assert_shape(assign, (truth.size,))
  assert_same_partition(assign, truth)


def inertia(x, assign):
  return sum(((x[assign == j] - x[assign == j].mean(0)) ** 2).sum() for j in np.unique(assign))


@pytest.mark.parametrize("seed", range(3))
def test_kmeans_matches_scikit_learn_on_separable_blobs(seed):
  sklearn_datasets = pytest.importorskip("sklearn.datasets")
  sklearn_cluster = pytest.importorskip("sklearn.cluster")
  x, truth = sklearn_datasets.make_blobs(
    n_samples=300, centers=6, n_features=5, cluster_std=0.5, center_box=(-20, 20), random_state=seed
  )
  ours, centroids = core.kmeans(jax.random.key(seed), x, 6, return_centroids=True)
  ours = np.asarray(ours)
  theirs = sklearn_cluster.KMeans(6, n_init=10, random_state=seed).fit(x)
  assert_same_partition(ours, theirs.labels_)  # the same clustering up to relabelling
  assert_same_partition(ours, truth)
  assert inertia(x, ours) == pytest.approx(theirs.inertia_, rel=1e-4)
  # The same centroids, matched through the shared partition.
  match = {int(a): int(b) for a, b in zip(ours, theirs.labels_, strict=True)}
  for j in range(6):
    np.testing.assert_allclose(centroids[j], theirs.cluster_centers_[match[j]], atol=1e-3)


@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_kmeans_reaches_a_lloyd_fixed_point(init):
  # Overlapping blobs: the seeding alone is not a fixed point, Lloyd's iterations must get there.
  gen = np.random.default_rng(3)
  x = np.concatenate([gen.normal(loc=c, size=(20, 2)) for c in ([0, 0], [2.5, 0], [0, 2.5])])
  assign = np.asarray(core.kmeans(jax.random.key(0), x, 3, init=init))
  means = np.stack([x[assign == j].mean(axis=0) for j in range(3)])
  nearest = np.argmin(((x[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
  np.testing.assert_array_equal(nearest, assign)


def test_kmeans_random_init_and_group_ids():
  x, truth = blobs(7)
  assign = np.asarray(core.kmeans(jax.random.key(1), x, 4, init="random"))
  assert assign.min() >= 0 and assign.max() < 4
  again = np.asarray(core.kmeans(jax.random.key(1), x, 4, init="random"))
  np.testing.assert_array_equal(assign, again)
  groups = core.group_ids(embeddings=x, num_clusters=4, rng=jax.random.key(0))
  assert groups.dtype == np.int64
  assert_same_partition(groups, truth)
  np.testing.assert_array_equal(core.group_ids(truth), truth)
  assert np.all(np.asarray(core.kmeans(jax.random.key(0), x, 1)) == 0)


# ----------------------------------------------------------------------------------------------
# Baselines


def test_select_random():
  mask = np.zeros(30, bool)
  mask[::3] = True
  got = core.select_random(mask, 4, jax.random.key(0))
  assert got.size == 4 and len(set(got.tolist())) == 4 and np.all(mask[got])
  np.testing.assert_array_equal(got, core.select_random(mask, 4, jax.random.key(0)))
  draws = {tuple(core.select_random(mask, 4, jax.random.key(s)).tolist()) for s in range(5)}
  assert len(draws) > 1
  everything = core.select_random(mask, 100, jax.random.key(0))
  assert sorted(everything.tolist()) == np.flatnonzero(mask).tolist()


def test_select_class_balanced_random():
  norms, labels, mask = random_problem(0, num=50, num_classes=3)
  del norms
  for m in [1, 4, 40]:
    got = core.select_class_balanced_random(labels, mask, m, jax.random.key(m))
    assert len(set(got.tolist())) == got.size and np.all(mask[got])
    assert np.all(np.diff(labels[got]) >= 0)
    for c in range(3):
      assert np.sum(labels[got] == c) == min(m, np.sum(mask & (labels == c)))


def test_select_max_entropy_against_scipy():
  gen = np.random.default_rng(0)
  probs = gen.dirichlet(np.ones(5), size=40)
  probs[5] = probs[9]  # an exact tie: the lower index first
  probs[11] = [1.0, 0, 0, 0, 0]  # zero entropy, 0 log 0 = 0
  mask = gen.random(40) < 0.7
  mask[[5, 9, 11]] = True
  entropy = scipy.stats.entropy(probs, axis=1)
  ranked = sorted(np.flatnonzero(mask).tolist(), key=lambda i: (-entropy[i], i))
  for k in [1, 6, 100]:
    got = core.select_max_entropy(probs, mask, k)
    assert got.tolist() == ranked[:k]


def reference_moderate(features, labels, mask, m):
  chosen = {}
  for c in sorted(set(labels.tolist())):
    idx = [i for i in range(len(labels)) if labels[i] == c and mask[i]]
    if not idx:
      continue
    centre = features[idx].mean(axis=0)
    dist = {i: float(np.sqrt(np.sum((features[i] - centre) ** 2))) for i in idx}
    values = sorted(dist.values())
    n = len(values)
    median = values[n // 2] if n % 2 else 0.5 * (values[n // 2 - 1] + values[n // 2])
    chosen[c] = set(sorted(idx, key=lambda i: (abs(dist[i] - median), i))[:m])
  return chosen


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("m", [1, 3, 50])
def test_select_moderate_coreset_against_reference(seed, m):
  gen = np.random.default_rng(seed)
  labels = gen.integers(0, 3, 45)
  features = gen.normal(size=(45, 4)) + labels[:, None] * 3.0
  mask = gen.random(45) < 0.8
  got = core.select_moderate_coreset(features, labels, mask, m)
  assert len(set(got.tolist())) == got.size and np.all(mask[got])
  assert np.all(np.diff(labels[got]) >= 0)
  per_class = split_by_class(got, labels)
  for c, ref in reference_moderate(features, labels, mask, m).items():
    assert set(per_class[c]) == ref


# ----------------------------------------------------------------------------------------------
# Bad inputs


def test_bad_inputs_raise_clear_errors():
  norms, labels, mask = random_problem(0, num=20, num_classes=3)
  with pytest.raises(ValueError, match="m=0 is not allowed"):
    core.select_per_class(norms, labels, mask, 0)
  with pytest.raises(ValueError, match="m=-2 is not allowed"):
    core.select_per_class(norms, labels, mask, -2)
  with pytest.raises(ValueError, match="a=4 is not allowed"):
    core.select_per_class(norms, labels, mask, 3, a=4)
  with pytest.raises(ValueError, match="a=-1 is not allowed"):
    core.select_per_class(norms, labels, mask, 3, a=-1)
  with pytest.raises(ValueError, match=r"class ids \[3\] have no samples"):
    core.select_per_class(norms, labels, mask, 3, num_classes=4)
  with pytest.raises(ValueError, match="must be < num_classes=2"):
    core.select_per_class(norms, labels, mask, 3, num_classes=2)
  with pytest.raises(ValueError, match="norms with non-finite"):
    core.select_per_class(np.where(mask, norms, np.nan), labels, mask, 3)
  with pytest.raises(ValueError, match="norms with shape"):
    core.select_per_class(norms[:5], labels, mask, 3)
  with pytest.raises(ValueError, match="candidate_mask"):
    core.select_per_class(norms, labels, mask.astype(int), 3)
  with pytest.raises(ValueError, match="labels of dtype"):
    core.select_per_class(norms, labels - 1, mask, 3)
  with pytest.raises(ValueError, match="num_select=0"):
    core.select_random(mask, 0, jax.random.key(0))
  with pytest.raises(ValueError, match="probs with negative"):
    core.select_max_entropy(-np.ones((20, 2)), mask, 2)

  images = np.zeros((2, 3, 3, 3), np.float32)
  for p in [3, "l2", 0, True, -np.inf]:
    with pytest.raises(ValueError, match="p must be one of 1, 2, inf"):
      core.norm_values(images, p=p)
  with pytest.raises(ValueError, match="channel_weights must have length C=3"):
    core.norm_values(images, channel_weights=[1.0, 1.0])
  with pytest.raises(ValueError, match="images must be floats"):
    core.norm_values(images.astype(np.uint8))
  with pytest.raises(ValueError, match=r"images must be a \[N, H, W, C\]"):
    core.norm_values(images[0])

  with pytest.raises(ValueError, match="num_clusters=None is not allowed"):
    core.group_ids(None, embeddings=np.zeros((4, 2)), rng=jax.random.key(0))
  with pytest.raises(ValueError, match="k-means grouping needs both"):
    core.group_ids(None, num_clusters=2)
  with pytest.raises(ValueError, match="k=5 is not allowed"):
    core.kmeans(jax.random.key(0), np.zeros((4, 2)), 5)
  with pytest.raises(ValueError, match="init='best' is not allowed"):
    core.kmeans(jax.random.key(0), np.zeros((4, 2)), 2, init="best")
  with pytest.raises(ValueError, match="n_init=0 is not allowed"):
    core.kmeans(jax.random.key(0), np.zeros((4, 2)), 2, n_init=0)
  with pytest.raises(ValueError, match="max_iterations=0 is not allowed"):
    core.kmeans(jax.random.key(0), np.zeros((4, 2)), 2, max_iterations=0)
  with pytest.raises(ValueError, match="mean_mask with shape"):
    core.select_per_class(norms, labels, mask, 3, mean_mask=mask[:4])
