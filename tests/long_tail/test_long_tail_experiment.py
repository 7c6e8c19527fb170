"""Tests of research.long_tail.experiment (METHODS.md M3) and its configs."""

import itertools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from scipy.special import logsumexp
from sklearn.decomposition import PCA

from configs import long_tail_cifar10, long_tail_cifar100, long_tail_digits
from research import config_checks
from research.data import catalogue
from research.long_tail import experiment
from research.supervised import classification


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


def ref_ce(logits, labels):
  logits = np.asarray(logits, np.float64)
  return float(np.mean(logsumexp(logits, 1) - logits[np.arange(len(labels)), labels]))


def ref_batch_hard(emb, labels, margin):
  """Brute force over all (a, p, n) triplets: per anchor the worst hinge, mean over anchors."""
  emb = np.asarray(emb, np.float64)
  d = np.sqrt(((emb[:, None] - emb[None]) ** 2).sum(-1))
  per_anchor = []
  for a in range(len(labels)):
    hinge = [
      max(d[a, p] - d[a, n] + margin, 0.0)
      for p, n in itertools.product(range(len(labels)), repeat=2)
      if p != a and labels[p] == labels[a] and labels[n] != labels[a]
    ]
    if hinge:
      per_anchor.append(max(hinge))
  return float(np.mean(per_anchor)) if per_anchor else 0.0


def apply_np(model, params, images):
  out = model.apply({"params": params}, jnp.asarray(images, jnp.float32) / 255.0)
  return {k: np.asarray(v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------
# End to end.


def test_smoke_run_writes_report_and_rows(tmp_path):
  config = long_tail_digits.get_config("smoke")
  summary = experiment.train_and_evaluate(config, str(tmp_path))
  assert [r["metric"].split(" (")[0] for r in summary["rows"]] == [
    "few-shot accuracy",
    "overall accuracy",
  ]
  for row in summary["rows"]:
    assert 0.0 <= row["value"] <= 1.0 and 0.0 <= row["baseline_value"] <= 1.0
  stats = summary["metrics"]["rho10"]
  assert set(stats) == {"dual", "ce"} and "head_softmax" in stats["dual"]
  assert json.loads((tmp_path / "summary.json").read_text())["experiment"] == "long_tail"
  text = (tmp_path / "report.md").read_text()
  assert "many / medium / few classes" in text and "4 / 4 / 2" in text
  assert (tmp_path / "plots" / "per_class_accuracy_rho10.png").exists()
  assert (tmp_path / "plots" / "embeddings_rho10.png").exists()


def test_cifar10_config_runs_end_to_end_on_mock_data(tmp_path):
  """The CIFAR data path, augmentation and ResNet config, on tfds mock data.

  The mock labels are random, so the long-tailed cut (which needs class 0 to be the largest)
  is replaced by the balanced set (ratio 1) and the head threshold by 0.
  """
  config = long_tail_cifar10.get_config("smoke")
  config.data.imbalance_ratios = (1.0,)
  config.head.threshold = 0
  config.methods = ("dual",)
  with tfds.testing.mock_data(num_examples=48, policy=tfds.testing.MockPolicy.USE_CODE):
    summary = experiment.train_and_evaluate(config, str(tmp_path))
  assert 0.0 <= summary["metrics"]["rho1"]["dual"]["overall"]["mean"] <= 1.0
  assert summary["rows"] == []  # no baseline to compare with


@pytest.mark.parametrize("module,num_classes", [(long_tail_cifar10, 10), (long_tail_cifar100, 100)])
def test_cifar_configs_data_path_on_mock_data(module, num_classes):
  for size in (None, "demo", "smoke"):
    experiment.validate(module.get_config(size))
  config = module.get_config()
  assert tuple(config.model.stage_sizes) == (5, 5, 5) and tuple(config.model.widths) == (16, 32, 64)
  assert set(config.data.imbalance_ratios) == {100.0, 10.0} and config.data.augment
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
    data = classification.load_classification_data(experiment.config_for_ratio(config, 1.0))
  assert data["num_classes"] == num_classes
  assert data["train"]["image"].shape == (24, 32, 32, 3)
  assert data["train"]["image"].dtype == np.uint8


@pytest.mark.parametrize(
  "num_classes,ratio,total",
  [(10, 100, 12406), (10, 10, 20431), (100, 100, 10847), (100, 10, 19573)],
)
def test_cifar_lt_sizes_match_cao_et_al(num_classes, ratio, total):
  """Training-set sizes of CIFAR-LT as published (Cao et al. 2019 code)."""
  labels = np.repeat(np.arange(num_classes), 50_000 // num_classes)
  counts = np.bincount(labels[catalogue.long_tailed_subset(labels, ratio)])
  assert counts.sum() == total
  assert counts[0] == 50_000 // num_classes and counts[-1] == 50_000 // num_classes // ratio


def test_digits_budget_is_equal_across_methods():
  config = long_tail_digits.get_config()
  assert {experiment.images_per_step(config, m) for m in config.methods} == {64}


# ----------------------------------------------------------------------------------------------
# Config validation.


@pytest.mark.parametrize(
  "field,value,match",
  [
    ("triplet.k", 1, "triplet.k=1"),
    ("triplet.p", 1, "triplet.p=1"),
    ("head.mode", "best", "head.mode='best'"),
    ("data.imbalance_ratios", (0.5,), "imbalance_ratios"),
    ("methods", ("ce",), "methods"),
    ("loss.lambda_ce", -1.0, "lambda_ce=-1.0"),
    ("train.batch_size", 10, "batch_size=10"),
  ],
)
def test_validate_names_the_field(field, value, match):
  config = long_tail_digits.get_config("smoke")
  section, key = field.split(".") if "." in field else (None, field)
  (config[section] if section else config)[key] = value
  with pytest.raises(config_checks.ConfigError, match=match):
    experiment.validate(config)


def test_head_ratio_outside_unit_interval_is_rejected():
  config = long_tail_digits.get_config("smoke")
  config.head.mode, config.head.ratio = "ratio", 1.5
  with pytest.raises(config_checks.ConfigError, match="head.ratio=1.5"):
    experiment.validate(config)


def test_p_larger_than_classes_and_empty_head_set_are_rejected():
  config = long_tail_digits.get_config("smoke")
  config.triplet.p = 11
  with pytest.raises(config_checks.ConfigError, match="triplet.p=11 .* number of classes"):
    experiment.check_p_fits(config, 10, 3)
  config.head.threshold = 1000
  with pytest.raises(ValueError, match="head set is empty"):
    experiment.head_mask_from_config(config, np.array([124, 50, 12]))


# ----------------------------------------------------------------------------------------------
# Pure functions against independent references.


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
  loss, metrics = experiment.dual_loss_fn(
    params,
    batch,
    jax.random.key(0),
    model=model,
    head_classes=head_classes,
    lambda_ce=0.7,
    lambda_tri=1.3,
    mining="batch_hard",
    margin=0.2,
  )
  head_logits = apply_np(model, params, images)["logits"][:, head_classes]
  pk_emb = apply_np(model, params, images[::-1])["embedding"]
  expected = 0.7 * ref_ce(head_logits, head_labels) + 1.3 * ref_batch_hard(pk_emb, pk_labels, 0.2)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-4)
  np.testing.assert_allclose(float(metrics["ce"]), ref_ce(head_logits, head_labels), rtol=1e-5)


def test_ce_and_logit_adjusted_loss_fns_match_numpy():
  model, params, images, rs = tiny_setup()
  labels = rs.randint(0, 4, 8)
  counts = np.array([40, 20, 5, 2])
  logits = apply_np(model, params, images)["logits"]
  batch = {"image": images, "label": labels}
  plain, _ = experiment.ce_loss_fn(params, batch, jax.random.key(0), model=model)
  np.testing.assert_allclose(float(plain), ref_ce(logits, labels), rtol=1e-5)
  prior = np.log(counts / counts.sum())
  adjusted, _ = experiment.ce_loss_fn(
    params, batch, jax.random.key(0), model=model, log_prior=prior.astype(np.float32), tau=1.5
  )
  np.testing.assert_allclose(float(adjusted), ref_ce(logits + 1.5 * prior, labels), rtol=1e-5)


def test_triplet_loss_fn_matches_bruteforce_with_a_singleton_class():
  model, params, images, _ = tiny_setup()
  labels = np.array([0, 0, 1, 1, 1, 2, 3, 3])  # class 2 has one sample: no positive
  loss, _ = experiment.triplet_loss_fn(
    params,
    {"pk_image": images, "pk_label": labels},
    jax.random.key(0),
    model=model,
    mining="batch_hard",
    margin=0.3,
  )
  emb = apply_np(model, params, images)["embedding"]
  np.testing.assert_allclose(float(loss), ref_batch_hard(emb, labels, 0.3), rtol=1e-4)


def test_augment_crop_flip_outputs_are_crops_of_the_padded_image():
  rs = np.random.RandomState(0)
  images = rs.rand(6, 5, 5, 2).astype(np.float32)
  out = np.asarray(experiment.augment_crop_flip(jnp.asarray(images), jax.random.key(3), pad=2))
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


def test_ncm_prediction_matches_bruteforce():
  rs = np.random.RandomState(1)
  train_emb, test_emb = rs.randn(30, 4), rs.randn(12, 4)
  train_labels = np.arange(30) % 5
  train_labels[train_labels == 3] = 2  # class 3 absent from training: never predicted
  pred = experiment.predict(
    "dual", {"embedding": train_emb}, {"embedding": test_emb}, train_labels, 5
  )
  unit = train_emb / np.linalg.norm(train_emb, axis=1, keepdims=True)
  expected = []
  for q in test_emb / np.linalg.norm(test_emb, axis=1, keepdims=True):
    best, best_sim = None, -np.inf
    for c in range(5):
      if (train_labels == c).any():
        mean = unit[train_labels == c].mean(0)
        sim = q @ mean / np.linalg.norm(mean)
        if sim > best_sim:
          best, best_sim = c, sim
    expected.append(best)
  np.testing.assert_array_equal(pred, expected)
  logits = rs.randn(12, 5)
  np.testing.assert_array_equal(
    experiment.predict("ce", {}, {"logits": logits}, train_labels, 5), logits.argmax(1)
  )


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
  assert experiment.head_softmax_accuracy(logits, labels, head_mask) == pytest.approx(
    correct / total
  )


def test_pca_2d_matches_sklearn_up_to_sign():
  x = np.random.RandomState(3).randn(50, 6) * np.arange(1, 7)
  ours = experiment.pca_2d(x)
  ref = PCA(2).fit_transform(x)
  np.testing.assert_allclose(np.abs(ours), np.abs(ref), atol=1e-8)


def test_dual_streams_draw_head_batches_and_pk_batches():
  config = long_tail_digits.get_config("demo")
  labels = np.repeat(np.arange(10), [124, 96, 74, 57, 44, 34, 26, 20, 16, 12])
  train = {"image": np.arange(len(labels))[:, None], "label": labels}
  counts = np.bincount(labels)
  head_mask = experiment.head_mask_from_config(config, counts)
  np.testing.assert_array_equal(np.flatnonzero(head_mask), [0, 1, 2, 3, 4])
  streams = experiment._streams(config, "dual", train, head_mask, seed=0)
  head_arrays, head_sampler = streams["head_"]
  pk_arrays, pk_sampler = streams["pk_"]
  for step in range(5):
    idx = head_sampler.indices(step)
    original = labels[head_arrays["image"][idx, 0]]
    assert len(idx) == 32 and head_mask[original].all()
    np.testing.assert_array_equal(np.flatnonzero(head_mask)[head_arrays["label"][idx]], original)
    pk = labels[pk_sampler.indices(step)].reshape(8, 4)
    assert len(set(pk[:, 0])) == 8 and (pk == pk[:, :1]).all()
