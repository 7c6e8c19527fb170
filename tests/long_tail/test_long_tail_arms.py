"""Tests of research.long_tail.arms (the arms' losses, streams and predictions) against
independent references."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import references

from configs import long_tail_digits
from research.long_tail import arms
from research.long_tail.settings import METHODS, Settings
from research.models.resnet import ResNet
from research.training import state as train_state


class TinyNet(nn.Module):
  """A linear stand-in for the ResNet: the same output dict, compiles in no time."""

  num_classes: int = 4

  @nn.compact
  def __call__(self, x, train=False):
    del train
    flat = x.reshape(x.shape[0], -1)
    emb = nn.Dense(3)(flat)
    return {"logits": nn.Dense(self.num_classes)(flat), "embedding": emb, "pooled": flat}


def tiny_setup(batch=8, num_classes=4, seed=0):
  rs = np.random.RandomState(seed)
  model = TinyNet(num_classes)
  images = rs.randint(0, 256, (batch, 2, 2, 1)).astype(np.uint8)
  params = model.init(jax.random.key(seed), jnp.zeros((1, 2, 2, 1)))["params"]
  return model, params, images, rs


def apply_np(model, params, images):
  out = model.apply({"params": params}, jnp.asarray(images, jnp.float32) / 255.0)
  return {k: np.asarray(v) for k, v in out.items()}


LAMBDA_CE, LAMBDA_TRI = 0.7, 1.3


def dual_loss(params, batch, model, head_classes, margin):
  """`arms.dual_loss_fn` with weights `LAMBDA_CE` and `LAMBDA_TRI`, batch-hard mining, key 0."""
  return arms.dual_loss_fn(
    params,
    batch,
    jax.random.key(0),
    model=model,
    head_classes=head_classes,
    lambda_ce=LAMBDA_CE,
    lambda_tri=LAMBDA_TRI,
    mining="batch_hard",
    margin=margin,
  )


def test_dual_loss_fn_matches_bruteforce():
  model, params, images, rs = tiny_setup(batch=8, num_classes=5)
  head_classes = np.array([0, 2, 3])
  head_labels = rs.randint(0, 3, 8)
  pk_labels = np.repeat([0, 1, 4, 2], 2)
  batch = {
    "head_image": images,
    "head_label": head_labels,
    "pk_image": images[::-1],
    "pk_label": pk_labels,
  }
  loss, metrics = dual_loss(params, batch, model, head_classes, margin=0.2)
  head_logits = apply_np(model, params, images)["logits"][:, head_classes]
  pk_emb = apply_np(model, params, images[::-1])["embedding"]
  ce = references.cross_entropy(head_logits, head_labels)
  expected = LAMBDA_CE * ce + LAMBDA_TRI * references.triplet_loss(pk_emb, pk_labels, 0.2)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-4)
  np.testing.assert_allclose(float(metrics["ce"]), ce, rtol=1e-5)


def test_ce_and_logit_adjusted_loss_fns_match_numpy():
  model, params, images, rs = tiny_setup()
  labels = rs.randint(0, 4, 8)
  counts = np.array([40, 20, 5, 2])
  logits = apply_np(model, params, images)["logits"]
  batch = {"image": images, "label": labels}
  plain, _ = arms.ce_loss_fn(params, batch, jax.random.key(0), model=model)
  np.testing.assert_allclose(float(plain), references.cross_entropy(logits, labels), rtol=1e-5)
  prior = np.log(counts / counts.sum())
  adjusted, _ = arms.ce_loss_fn(
    params, batch, jax.random.key(0), model=model, log_prior=prior.astype(np.float32), tau=1.5
  )
  want = references.cross_entropy(logits + 1.5 * prior, labels)
  np.testing.assert_allclose(float(adjusted), want, rtol=1e-5)


def test_triplet_loss_fn_matches_bruteforce_with_a_singleton_class():
  model, params, images, _ = tiny_setup()
  labels = np.array([0, 0, 1, 1, 1, 2, 3, 3])  # class 2 has one sample: no positive
  loss, _ = arms.triplet_loss_fn(
    params,
    {"pk_image": images, "pk_label": labels},
    jax.random.key(0),
    model=model,
    mining="batch_hard",
    margin=0.3,
  )
  emb = apply_np(model, params, images)["embedding"]
  np.testing.assert_allclose(float(loss), references.triplet_loss(emb, labels, 0.3), rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_train_step_of_each_arm_is_finite_and_counts_one_step(method):
  model, params, images, rs = tiny_setup(num_classes=4)
  settings = Settings.from_config(long_tail_digits.get_config("smoke"))
  counts = np.array([80, 50, 5, 2])
  head_mask = settings.head_mask(counts, method)
  tx = optax.sgd(0.1)
  step = arms.train_step_fn(settings, method, model, head_mask, counts, tx)
  labels = np.repeat([0, 1, 2, 3], 2)
  batch = {"image": images, "label": labels, "pk_image": images, "pk_label": labels}
  batch |= {"head_image": images, "head_label": rs.randint(0, int(head_mask.sum()), 8)}
  new, metrics = jax.jit(step)(train_state.create_train_state(params, tx), batch, jax.random.key(0))
  assert np.isfinite(float(metrics["loss"])) and int(new.step) == 1
  assert int(new.nonfinite_step) == -1


# ----------------------------------------------------------------------------------------------
# Both branches of one dual step reach the shared backbone (issue 16), checked against branch
# losses written here from scratch (softmax CE and a looped batch-hard triplet loss).


def _reference_head_ce(params, model, images, head_labels, head_classes):
  logits = model.apply({"params": params}, jnp.asarray(images, jnp.float32) / 255.0, train=True)
  logp = jax.nn.log_softmax(logits["logits"][:, head_classes])
  return -jnp.mean(logp[jnp.arange(len(head_labels)), head_labels])


def _reference_batch_hard(params, model, images, labels, margin):
  emb = model.apply({"params": params}, jnp.asarray(images, jnp.float32) / 255.0, train=True)
  emb = emb["embedding"]
  terms = []
  for a in range(len(labels)):
    pos = [p for p in range(len(labels)) if p != a and labels[p] == labels[a]]
    neg = [n for n in range(len(labels)) if labels[n] != labels[a]]
    if pos and neg:
      d_ap = jnp.max(jnp.stack([jnp.linalg.norm(emb[a] - emb[p]) for p in pos]))
      d_an = jnp.min(jnp.stack([jnp.linalg.norm(emb[a] - emb[n]) for n in neg]))
      terms.append(jax.nn.relu(d_ap - d_an + margin))
  return jnp.mean(jnp.stack(terms))


def _backbone(tree):
  """The parameters both branches share: everything but the classifier and embedding heads."""
  return {k: v for k, v in tree.items() if k not in ("classifier", "embedding")}


def _norm(tree):
  return float(optax.global_norm(tree))


def _assert_close_in_norm(actual, desired, rtol=1e-2):
  actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
  assert np.linalg.norm(actual - desired) <= rtol * np.linalg.norm(desired) + 1e-9


def dual_grad_setup():
  model = ResNet(5, stage_sizes=(1,), widths=(4,), embedding_dim=3, stem_strides=1)
  rs = np.random.RandomState(0)
  head_images = rs.randint(0, 256, (6, 8, 8, 1)).astype(np.uint8)
  pk_images = rs.randint(0, 256, (8, 8, 8, 1)).astype(np.uint8)
  params = model.init(jax.random.key(1), jnp.zeros((1, 8, 8, 1)))["params"]
  batch = {
    "head_image": head_images,
    "head_label": np.array([0, 1, 2, 0, 1, 2]),
    "pk_image": pk_images,
    "pk_label": np.repeat([0, 2, 3, 4], 2),
  }
  return model, params, batch, np.array([0, 1, 3])


def test_one_dual_step_sends_gradient_from_both_branches_into_the_backbone():
  model, params, batch, head_classes = dual_grad_setup()
  margin = 5.0  # a large margin keeps every anchor active
  g_joint = jax.grad(lambda p: dual_loss(p, batch, model, head_classes, margin)[0])(params)
  g_ce = jax.grad(
    lambda p: (
      LAMBDA_CE
      * _reference_head_ce(p, model, batch["head_image"], batch["head_label"], head_classes)
    )
  )(params)
  g_tri = jax.grad(
    lambda p: (
      LAMBDA_TRI * _reference_batch_hard(p, model, batch["pk_image"], batch["pk_label"], margin)
    )
  )(params)
  # Each branch alone moves the shared backbone (every backbone layer, not just one).
  for branch in (g_ce, g_tri):
    for layer, grads in _backbone(branch).items():
      assert _norm(grads) > 1e-6, layer
  # Each branch reaches only its own head; the joint gradient is the sum of the branches.
  assert _norm(g_ce["embedding"]) == 0.0 and _norm(g_tri["classifier"]) == 0.0
  # (float32: the core triplet loss takes distances from the Gram matrix, the reference from
  # differences; near-identical embeddings at initialisation make that cancellation cost
  # ~0.2 % of a leaf's norm. A missing branch or a wrong weight is off by >= 30 %.)
  jax.tree.map(lambda j, c, t: _assert_close_in_norm(j, c + t), g_joint, g_ce, g_tri)
  # Neither branch alone is the joint gradient on the backbone.
  diff = jax.tree.map(lambda j, c: j - c, _backbone(g_joint), _backbone(g_ce))
  assert _norm(diff) > 0.1 * _norm(_backbone(g_tri))


def test_alternating_step_is_a_head_update_then_a_pk_update():
  model, params, batch, head_classes = dual_grad_setup()
  lr, lambda_ce, lambda_tri, margin = 0.05, 0.7, 1.3, 5.0
  tx = optax.sgd(lr)
  head_loss = lambda p, b, r: arms.head_ce_loss_fn(  # noqa: E731
    p, b, r, model=model, head_classes=head_classes, lambda_ce=lambda_ce
  )
  pk_loss = lambda p, b, r: arms.triplet_loss_fn(  # noqa: E731
    p, b, r, model=model, mining="batch_hard", margin=margin, lambda_tri=lambda_tri
  )
  state = train_state.create_train_state(params, tx)
  new, metrics = arms.alternating_train_step(
    state, batch, jax.random.key(0), head_loss_fn=head_loss, pk_loss_fn=pk_loss, tx=tx
  )
  # Reference: plain gradient descent on the from-scratch losses, CE first, then triplet at
  # the parameters the CE update produced.
  g1 = jax.grad(
    lambda p: (
      lambda_ce
      * _reference_head_ce(p, model, batch["head_image"], batch["head_label"], head_classes)
    )
  )(params)
  p1 = jax.tree.map(lambda p, g: p - lr * g, params, g1)
  g2 = jax.grad(
    lambda p: (
      lambda_tri * _reference_batch_hard(p, model, batch["pk_image"], batch["pk_label"], 5.0)
    )
  )(p1)
  p2 = jax.tree.map(lambda p, g: p - lr * g, p1, g2)
  jax.tree.map(_assert_close_in_norm, new.params, p2)
  assert int(new.step) == 1 and np.isfinite(float(metrics["loss"]))
  assert {"ce", "triplet", "head_accuracy", "grad_norm"} <= set(metrics)


def test_augment_crop_flip_outputs_are_crops_of_the_padded_image():
  rs = np.random.RandomState(0)
  images = rs.rand(6, 5, 5, 2).astype(np.float32)
  out = np.asarray(arms.augment_crop_flip(jnp.asarray(images), jax.random.key(3), pad=2))
  assert out.shape == images.shape
  padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
  flips = 0
  for i in range(len(images)):
    matches = [
      (y, x, f)
      for y in range(5)
      for x in range(5)
      for f in (False, True)
      if np.array_equal(
        out[i], padded[i, y : y + 5, x : x + 5][:, ::-1] if f else padded[i, y : y + 5, x : x + 5]
      )
    ]
    assert matches
    flips += matches[0][2]
  assert 0 < flips < len(images) or len(images) < 4


def _bruteforce_ncm(train_x, train_labels, test_x, num_classes):
  unit = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
  expected = []
  for q in test_x / np.linalg.norm(test_x, axis=1, keepdims=True):
    best, best_sim = None, -np.inf
    for c in range(num_classes):
      if (train_labels == c).any():
        mean = unit[train_labels == c].mean(0)
        sim = q @ mean / np.linalg.norm(mean)
        if sim > best_sim:
          best, best_sim = c, sim
    expected.append(best)
  return np.array(expected)


def test_every_rule_matches_bruteforce():
  rs = np.random.RandomState(1)
  train_labels = np.arange(30) % 5
  train_labels[train_labels == 3] = 2  # class 3 absent from training: never predicted
  train_out = {"embedding": rs.randn(30, 4), "pooled": rs.randn(30, 6)}
  test_out = {"embedding": rs.randn(12, 4), "pooled": rs.randn(12, 6), "logits": rs.randn(12, 5)}
  pred = arms.predictions(train_out, test_out, train_labels, 5)
  assert set(pred) == set(arms.PREDICTION_RULES)
  for rule, feature in (("ncm", "embedding"), ("ncm_pooled", "pooled")):
    want = _bruteforce_ncm(train_out[feature], train_labels, test_out[feature], 5)
    np.testing.assert_array_equal(pred[rule], want)
    assert 3 not in pred[rule]
  np.testing.assert_array_equal(pred["softmax"], test_out["logits"].argmax(1))


def test_head_softmax_accuracy_by_loop():
  rs = np.random.RandomState(2)
  logits, labels = rs.randn(40, 6), rs.randint(0, 6, 40)
  head_mask = np.array([True, False, True, True, False, False])
  correct = total = 0
  for row, y in zip(logits, labels):
    if head_mask[y]:
      total += 1
      best = max((c for c in range(6) if head_mask[c]), key=lambda c: row[c])
      correct += best == y
  assert arms.head_softmax_accuracy(logits, labels, head_mask) == pytest.approx(correct / total)


def test_dual_streams_draw_head_batches_and_pk_batches():
  settings = Settings.from_config(long_tail_digits.get_config("demo"))
  labels = np.repeat(np.arange(10), [124, 96, 74, 57, 44, 34, 26, 20, 16, 12])
  train = {"image": np.arange(len(labels))[:, None], "label": labels}
  head_mask = settings.head_mask(np.bincount(labels))
  np.testing.assert_array_equal(np.flatnonzero(head_mask), [0, 1, 2, 3, 4])
  streams = arms.streams(settings, "dual", train, head_mask, seed=0)
  head_arrays, head_sampler = streams["head_"]
  _, pk_sampler = streams["pk_"]
  for step in range(5):
    idx = head_sampler.indices(step)
    original = labels[head_arrays["image"][idx, 0]]
    assert len(idx) == 32 and head_mask[original].all()
    np.testing.assert_array_equal(np.flatnonzero(head_mask)[head_arrays["label"][idx]], original)
    pk = labels[pk_sampler.indices(step)].reshape(8, 4)
    assert len(set(pk[:, 0])) == 8 and (pk == pk[:, :1]).all()


def test_triplet_only_draws_the_dual_arms_pk_batches_and_all_head_covers_every_class():
  settings = Settings.from_config(long_tail_digits.get_config("demo"))
  labels = np.repeat(np.arange(10), [124, 74, 44, 26, 16, 9, 5, 3, 2, 1])
  train = {"image": np.arange(len(labels))[:, None], "label": labels}
  counts = np.bincount(labels)
  dual = arms.streams(settings, "dual", train, settings.head_mask(counts, "dual"), seed=3)
  triplet = arms.streams(settings, "triplet", train, settings.head_mask(counts, "triplet"), 3)
  assert set(triplet) == {"pk_"} and triplet["pk_"][1].batch_size == 8 * 4
  for step in range(3):
    np.testing.assert_array_equal(triplet["pk_"][1].indices(step), dual["pk_"][1].indices(step))
  all_head_mask = settings.head_mask(counts, "dual_all_head")
  assert all_head_mask.all() and settings.head_mask(counts, "dual").sum() == 3
  all_head = arms.streams(settings, "dual_all_head", train, all_head_mask, seed=3)
  head_arrays, _ = all_head["head_"]
  np.testing.assert_array_equal(head_arrays["label"], labels)  # head index = class id
