"""Tests of research.long_tail.core (METHODS.md M3) against independent numpy references."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references

from research.long_tail import core

MININGS = ("batch_hard", "batch_all", "soft_margin")


def random_batch(seed, batch=10, dim=4, num_classes=4):
  rs = np.random.RandomState(seed)
  return rs.randn(batch, dim).astype(np.float32), rs.randint(0, num_classes, batch)


# ----------------------------------------------------------------------------------------------
# Triplet losses.

LABEL_CASES = {
  "random": np.array([0, 1, 2, 0, 1, 2, 0, 1, 3, 3]),
  "singletons": np.array([0, 0, 0, 1, 2, 3, 4, 4, 5, 6]),  # classes 1, 2, 3, 5, 6 have 1 sample
  "pk": np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4]),
}


@pytest.mark.parametrize("mining", MININGS)
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("case", sorted(LABEL_CASES))
def test_triplet_matches_brute_force(mining, squared, case):
  emb, _ = random_batch(1)
  labels = LABEL_CASES[case]
  got = core.triplet_loss(
    jnp.asarray(emb), jnp.asarray(labels), mining=mining, margin=0.5, squared=squared
  )
  want = references.triplet_loss(emb, labels, 0.5, mining, squared)
  assert want > 0
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mining", MININGS)
def test_triplet_valid_mask_equals_dropping_rows(mining):
  emb, labels = random_batch(2, batch=12)
  valid = np.array([True] * 9 + [False] * 3)
  # Padding rows carry garbage embeddings and labels that would change the loss if used.
  emb[9:] = 100.0 * emb[9:]
  labels[9:] = labels[0]
  got = core.triplet_loss(
    jnp.asarray(emb), jnp.asarray(labels), mining=mining, margin=0.3, valid=jnp.asarray(valid)
  )
  want = references.triplet_loss(emb[:9], labels[:9], 0.3, mining)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mining", MININGS)
@pytest.mark.parametrize(
  "labels", [np.zeros(6, int), np.arange(6)], ids=["all_same_class", "all_singletons"]
)
def test_triplet_without_valid_anchor_is_zero_with_finite_grad(mining, labels):
  emb, _ = random_batch(3, batch=6)

  def loss_fn(e):
    return core.triplet_loss(e, jnp.asarray(labels), mining=mining, margin=0.3)

  loss, grad = jax.value_and_grad(loss_fn)(jnp.asarray(emb))
  assert float(loss) == 0.0
  chex.assert_tree_all_finite(grad)


@pytest.mark.parametrize("mining", MININGS)
@pytest.mark.parametrize("squared", [False, True])
def test_triplet_grad_finite_when_embeddings_coincide(mining, squared):
  emb, _ = random_batch(4, batch=6)
  emb[1] = emb[0]  # same class, distance 0: the only positive of anchors 0 and 1
  emb[2] = emb[0]  # other class, distance 0: the hardest negative of anchor 0
  emb[5] = 0.0
  labels = jnp.array([0, 0, 1, 1, 2, 2])

  def loss_fn(e):
    return core.triplet_loss(e, labels, mining=mining, margin=0.3, squared=squared)

  loss, grad = jax.value_and_grad(loss_fn)(jnp.asarray(emb))
  chex.assert_tree_all_finite((loss, grad))
  np.testing.assert_allclose(
    loss,
    references.triplet_loss(emb, np.asarray(labels), 0.3, mining, squared),
    rtol=1e-5,
    atol=1e-5,
  )
  # Identical embeddings, too: everything at distance 0.
  grad_all_same = jax.grad(loss_fn)(jnp.ones((6, 3)))
  chex.assert_tree_all_finite(grad_all_same)


def test_pairwise_distances_against_numpy():
  emb, _ = random_batch(5, batch=7, dim=5)
  want = np.sqrt(((emb[:, None].astype(np.float64) - emb[None]) ** 2).sum(-1))
  got = core.pairwise_distances(jnp.asarray(emb))
  chex.assert_shape(got, (7, 7))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    core.pairwise_distances(jnp.asarray(emb), squared=True), want**2, rtol=1e-5, atol=1e-5
  )


@pytest.mark.parametrize("mining", MININGS)
def test_triplet_jit_compiles_once(mining):
  @jax.jit
  @chex.assert_max_traces(n=1)
  def loss_fn(emb, labels, valid):
    return core.triplet_loss(emb, labels, mining=mining, margin=0.2, valid=valid)

  for seed in range(3):
    emb, labels = random_batch(seed)
    loss = loss_fn(jnp.asarray(emb), jnp.asarray(labels), jnp.arange(10) < 8 + seed)
    chex.assert_tree_all_finite(loss)
  chex.clear_trace_counter()


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"mining": "hardest"}, "mining='hardest'"),
    ({"margin": -0.1}, "margin=-0.1"),
  ],
)
def test_triplet_bad_config(kwargs, match):
  emb, labels = random_batch(0)
  with pytest.raises(ValueError, match=match):
    core.triplet_loss(jnp.asarray(emb), jnp.asarray(labels), **{"margin": 0.3, **kwargs})


# ----------------------------------------------------------------------------------------------
# Head set and label map.

COUNTS = np.array([50, 10, 30, 30, 5, 100])  # classes 2 and 3 tie at 30


@pytest.mark.parametrize(
  "kwargs, head_ids",
  [
    ({"mode": "threshold", "threshold": 30}, [0, 5]),  # strictly more than T
    ({"mode": "threshold", "threshold": 29}, [0, 2, 3, 5]),
    ({"mode": "threshold", "threshold": 4}, [0, 1, 2, 3, 4, 5]),
    ({"mode": "count", "top_n": 1}, [5]),
    ({"mode": "count", "top_n": 2}, [0, 5]),
    ({"mode": "count", "top_n": 3}, [0, 5]),  # tie at the cut: both 30s excluded
    ({"mode": "count", "top_n": 4}, [0, 2, 3, 5]),
    ({"mode": "count", "top_n": 6}, [0, 1, 2, 3, 4, 5]),
    ({"mode": "ratio", "ratio": 0.5}, [0, 5]),  # k = 3, tie at the cut
    ({"mode": "ratio", "ratio": 0.1}, [5]),  # k = ceil(0.6) = 1
    ({"mode": "ratio", "ratio": 2 / 3}, [0, 2, 3, 5]),  # k = 4
    ({"mode": "ratio", "ratio": 1.0}, [0, 1, 2, 3, 4, 5]),
  ],
)
def test_head_classes_crafted(kwargs, head_ids):
  head = core.head_classes(COUNTS, **kwargs)
  assert head.dtype == np.bool_
  np.testing.assert_array_equal(np.flatnonzero(head), head_ids)


def test_head_classes_ratio_rounding():
  counts = np.arange(10, 0, -1) * 7  # 10 distinct counts
  assert core.head_classes(counts, "ratio", ratio=0.3).sum() == 3  # 0.3 * 10 != 3.0 in floats
  assert core.head_classes(counts, "ratio", ratio=0.2).sum() == 2


def test_head_classes_count_mode_on_random_counts_with_ties():
  # Reference: among all strict cuts {count > t}, the largest one with at most top_n classes.
  rs = np.random.RandomState(0)
  for _ in range(200):
    counts = rs.randint(1, 6, size=rs.randint(2, 9))
    top_n = rs.randint(1, counts.size + 1)
    cuts = [counts > t for t in np.unique(np.append(counts, 0))]
    fitting = [cut for cut in cuts if 0 < cut.sum() <= top_n]
    if not fitting:
      with pytest.raises(ValueError, match="head set is empty"):
        core.head_classes(counts, "count", top_n=top_n)
      continue
    want = max(fitting, key=np.sum)
    np.testing.assert_array_equal(core.head_classes(counts, "count", top_n=top_n), want)


@pytest.mark.parametrize(
  "args, kwargs, match",
  [
    ((COUNTS, "threshold"), {"threshold": 100}, "head set is empty"),
    (([7, 7, 7], "count"), {"top_n": 2}, "head set is empty"),
    (([7, 7, 7], "ratio"), {"ratio": 0.5}, "head set is empty"),
    ((COUNTS, "ratio"), {"ratio": 0.0}, "ratio=0.0"),
    ((COUNTS, "ratio"), {"ratio": 1.5}, "ratio=1.5"),
    ((COUNTS, "ratio"), {}, "ratio=None"),
    ((COUNTS, "count"), {"top_n": 0}, "top_n=0"),
    ((COUNTS, "count"), {"top_n": 7}, r"top_n=7 .*\[1, 6\]"),
    ((COUNTS, "count"), {"top_n": 1.5}, "top_n=1.5"),
    ((COUNTS, "threshold"), {}, "threshold=None"),
    ((COUNTS, "median"), {}, "mode='median'"),
    (([3, -1], "threshold"), {"threshold": 0}, "non-negative integers"),
    (([], "threshold"), {"threshold": 0}, "class_counts"),
    ((np.ones((2, 2), int), "threshold"), {"threshold": 0}, "class_counts"),
  ],
)
def test_head_classes_errors(args, kwargs, match):
  with pytest.raises(ValueError, match=match):
    core.head_classes(*args, **kwargs)


def test_head_label_map():
  label_map = core.head_label_map(np.array([False, True, False, True, True]))
  np.testing.assert_array_equal(label_map, [-1, 0, -1, 1, 2])
  np.testing.assert_array_equal(label_map[np.array([4, 1, 3])], [2, 0, 1])
  with pytest.raises(ValueError, match="head_mask"):
    core.head_label_map(np.array([0, 1, 1]))


def test_log_prior():
  np.testing.assert_allclose(core.log_prior([1, 3]), [np.log(0.25), np.log(0.75)], rtol=1e-6)
  with pytest.raises(ValueError, match="count > 0"):
    core.log_prior([0, 3])


# ----------------------------------------------------------------------------------------------
# Classification losses and the dual loss.


def test_logit_adjusted_ce_against_numpy():
  rs = np.random.RandomState(0)
  logits = rs.randn(6, 4).astype(np.float32)
  labels = rs.randint(0, 4, 6)
  prior = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
  got = core.logit_adjusted_ce(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(prior), 1.5)
  np.testing.assert_allclose(got, references.cross_entropy(logits + 1.5 * prior, labels), rtol=1e-5)
  # tau = 0 is plain CE; a valid mask drops rows.
  got0 = core.logit_adjusted_ce(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(prior), 0.0)
  np.testing.assert_allclose(got0, references.cross_entropy(logits, labels), rtol=1e-5)
  masked = core.logit_adjusted_ce(
    jnp.asarray(logits),
    jnp.asarray(labels),
    jnp.asarray(prior),
    1.0,
    valid=jnp.arange(6) < 4,
  )
  np.testing.assert_allclose(
    masked, references.cross_entropy(logits[:4] + prior, labels[:4]), rtol=1e-5
  )
  with pytest.raises(ValueError, match="tau=-1"):
    core.logit_adjusted_ce(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(prior), -1.0)


@pytest.mark.parametrize("mining", MININGS)
def test_dual_loss_against_numpy(mining):
  rs = np.random.RandomState(1)
  head_logits = rs.randn(5, 3).astype(np.float32)
  head_labels = np.array([0, 2, 1, 1, -1])  # last row is padding with a non-head label
  head_valid = np.arange(5) < 4
  emb, labels = random_batch(6, batch=8)
  fn = jax.jit(
    functools.partial(core.dual_loss, lambda_ce=0.7, lambda_tri=2.0, mining=mining, margin=0.4)
  )
  loss, metrics = fn(
    jnp.asarray(head_logits),
    jnp.asarray(head_labels),
    jnp.asarray(emb),
    jnp.asarray(labels),
    head_valid=jnp.asarray(head_valid),
  )
  ce = references.cross_entropy(head_logits[:4], head_labels[:4])
  tri = references.triplet_loss(emb, labels, 0.4, mining)
  np.testing.assert_allclose(metrics["ce"], ce, rtol=1e-5)
  np.testing.assert_allclose(metrics["triplet"], tri, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(loss, 0.7 * ce + 2.0 * tri, rtol=1e-5, atol=1e-5)
  want_acc = np.mean(head_logits[:4].argmax(1) == head_labels[:4])
  np.testing.assert_allclose(metrics["head_accuracy"], want_acc)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"lambda_ce": -1.0}, "lambda_ce=-1.0"),
    ({"lambda_tri": -0.5}, "lambda_tri=-0.5"),
    ({"lambda_ce": 0.0, "lambda_tri": 0.0}, "one weight must be > 0"),
    ({"mining": "semi_hard"}, "mining='semi_hard'"),
    ({"margin": -1.0}, "margin=-1.0"),
  ],
)
def test_dual_loss_bad_config(kwargs, match):
  emb, labels = random_batch(0)
  with pytest.raises(ValueError, match=match):
    core.dual_loss(
      jnp.zeros((2, 3)),
      jnp.array([0, 1]),
      jnp.asarray(emb),
      jnp.asarray(labels),
      **{"lambda_ce": 1.0, "lambda_tri": 1.0, "mining": "batch_hard", "margin": 0.3, **kwargs},
    )


# ----------------------------------------------------------------------------------------------
# Nearest class mean.


def np_unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_class_means_and_ncm_against_numpy():
  rs = np.random.RandomState(0)
  num_classes = 5
  train = rs.randn(20, 3).astype(np.float32)
  train_labels = rs.choice([0, 1, 3, 4], 20)  # class 2 absent
  means = core.class_means(jnp.asarray(train), jnp.asarray(train_labels), num_classes)
  present = core.class_presence(jnp.asarray(train_labels), num_classes)
  chex.assert_shape(means, (num_classes, 3))
  np.testing.assert_array_equal(present, [True, True, False, True, True])
  want_means = np.zeros((num_classes, 3))
  for c in (0, 1, 3, 4):
    want_means[c] = np_unit(np_unit(train[train_labels == c].astype(np.float64)).mean(0))
  np.testing.assert_allclose(means, want_means, atol=1e-6)

  queries = rs.randn(12, 3).astype(np.float32)
  # Queries pointing away from all present means: the absent class's zero row (cosine 0) would
  # win an unmasked argmax.
  queries[:2] = -(want_means[0] + want_means[1] + want_means[3] + want_means[4])
  queries[2] = -want_means[0]
  sims = np_unit(queries.astype(np.float64)) @ want_means.T
  sims[:, 2] = -np.inf
  pred = core.ncm_predict(jnp.asarray(queries), means, present)
  assert np.all(np.asarray(pred) != 2)
  np.testing.assert_array_equal(pred, sims.argmax(1))


def test_class_means_valid_mask():
  emb = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.0, -5.0]])
  labels = jnp.array([0, 0, 1])
  valid = jnp.array([True, True, False])
  means = core.class_means(emb, labels, 2, valid=valid)
  np.testing.assert_allclose(means, [[np.sqrt(0.5), np.sqrt(0.5)], [0.0, 0.0]], atol=1e-6)
  np.testing.assert_array_equal(core.class_presence(labels, 2, valid=valid), [True, False])


# ----------------------------------------------------------------------------------------------
# Shot-group accuracy.


def test_shot_group_accuracy_hand_computed():
  counts = np.array([200, 150, 50, 30, 10, 5])  # many: 0, 1; medium: 2, 3; few: 4, 5
  labels = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])  # class 5 has no test sample
  pred = np.array([0, 0, 1, 0, 0, 1, 3, 3, 4, 5])
  out = core.shot_group_accuracy(pred, labels, counts, many=100, few=20)
  # Per class: 1, 0.5, 0, 1, 0.5, nan. Overall: 6 of 10 correct.
  np.testing.assert_allclose(out["per_class"], [1.0, 0.5, 0.0, 1.0, 0.5, np.nan])
  assert out["overall"] == pytest.approx(0.6)
  assert out["many"] == pytest.approx(0.75)
  assert out["medium"] == pytest.approx(0.5)
  assert out["few"] == pytest.approx(0.5)


def test_shot_group_accuracy_boundaries_and_empty_group():
  counts = np.array([101, 100, 20, 19])  # 100 and 20 are medium
  out = core.shot_group_accuracy(np.array([0, 0, 2, 3]), np.arange(4), counts, many=100, few=20)
  assert (out["many"], out["medium"], out["few"]) == (1.0, 0.5, 1.0)
  out = core.shot_group_accuracy(np.array([0, 1]), np.array([0, 1]), [5, 6], many=3, few=2)
  assert out["many"] == 1.0 and np.isnan(out["medium"]) and np.isnan(out["few"])


@pytest.mark.parametrize(
  "pred, labels, kwargs, match",
  [
    ([0, 1], [0], {}, "same non-empty 1-D shape"),
    ([0, 1], [0, 4], {}, r"labels must be in \[0, 3\)"),
    ([0, 1], [0, 1], {"many": 10, "few": 20}, "few=20 and many=10"),
  ],
)
def test_shot_group_accuracy_errors(pred, labels, kwargs, match):
  with pytest.raises(ValueError, match=match):
    core.shot_group_accuracy(np.array(pred), np.array(labels), [10, 20, 30], **kwargs)
