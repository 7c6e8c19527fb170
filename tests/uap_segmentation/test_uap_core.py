"""Tests of research.uap_segmentation.core (METHODS.md M1) against numpy references."""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.models.resnet import Segmenter
from research.uap_segmentation import core

IGNORE = 255
CLASS_NAMES = ["road", "sidewalk", "car", "truck"]


# ------------------------------------------------------------------------------------------
# Independent numpy references (float64 loops) and a linear per-pixel model.


def linear_apply(params, images):
  """Per-pixel linear segmentation model: logits = x @ W + b."""
  w, b = params
  return images @ w + b


def make_params(seed=0, channels=3, classes=4):
  gen = np.random.default_rng(seed)
  w = gen.normal(size=(channels, classes)).astype(np.float32) * 3.0
  b = gen.normal(size=(classes,)).astype(np.float32) * 0.3
  return w, b


def np_targeted_labels(labels, pairs, ignore=IGNORE):
  mixed = labels.copy()
  mask = np.zeros(labels.shape, bool)
  for idx in np.ndindex(labels.shape):
    for src, tgt in pairs:
      if labels[idx] == src and labels[idx] != ignore:
        mixed[idx] = tgt
        mask[idx] = True
  return mixed, mask


def np_softmax(z):
  z = z - z.max()
  e = np.exp(z)
  return e / e.sum()


def np_weighted_loss(logits, mixed, mask, w_t, w_c, ignore=IGNORE):
  """Returns (batch mean over valid pixels, per-sample means)."""
  logits = logits.astype(np.float64)
  total, count, per_sample = 0.0, 0, []
  for n in range(logits.shape[0]):
    s, c = 0.0, 0
    for i in range(logits.shape[1]):
      for j in range(logits.shape[2]):
        lab = mixed[n, i, j]
        if lab == ignore:
          continue
        ce = -np.log(np_softmax(logits[n, i, j])[lab])
        s += (w_t if mask[n, i, j] else w_c) * ce
        c += 1
    per_sample.append(s / max(c, 1))
    total, count = total + s, count + c
  return total / max(count, 1), np.array(per_sample)


def np_linear_grad(x_adv, params, mixed, mask, w_t, w_c, ignore=IGNORE):
  """Hand-derived ∇_x of sum_n mean-over-pixels(w * CE) for the linear model.

  Per pixel: d CE / d x = (softmax(x W + b) - onehot(label)) W^T, scaled by w / n_valid(n).
  """
  w, b = (np.asarray(p, np.float64) for p in params)
  grad = np.zeros(x_adv.shape)
  for n in range(x_adv.shape[0]):
    n_valid = max(int(np.sum(mixed[n] != ignore)), 1)
    for i in range(x_adv.shape[1]):
      for j in range(x_adv.shape[2]):
        lab = mixed[n, i, j]
        if lab == ignore:
          continue
        p = np_softmax(x_adv[n, i, j].astype(np.float64) @ w + b)
        p[lab] -= 1.0
        weight = w_t if mask[n, i, j] else w_c
        grad[n, i, j] = weight / n_valid * (p @ w.T)
  return grad


def np_fgsm_linear(x, r, params, mixed, mask, *, rounds, alpha, xi, w_t, w_c):
  for _ in range(rounds):
    g = np_linear_grad(x + r, params, mixed, mask, w_t, w_c)
    r = np.clip(r - alpha * np.sign(g), np.maximum(-xi, -x), np.minimum(xi, 1.0 - x))
  return r


def np_success(logits, mixed, mask):
  per_sample = []
  for n in range(logits.shape[0]):
    hits = total = 0
    for idx in np.ndindex(mask[n].shape):
      if mask[n][idx]:
        total += 1
        hits += int(np.argmax(logits[n][idx]) == mixed[n][idx])
    per_sample.append(hits / total if total else 0.0)
  return np.array(per_sample)


def np_weighted_sum(r, w):
  out = np.zeros(r.shape[1:])
  for n in range(r.shape[0]):
    out += w[n] * r[n].astype(np.float64)
  return out


def random_batch(seed, n=3, h=5, w=6, c=3, classes=4, ignore_fraction=0.1):
  gen = np.random.default_rng(seed)
  x = gen.uniform(size=(n, h, w, c)).astype(np.float32)
  labels = gen.integers(0, classes, size=(n, h, w)).astype(np.int32)
  labels[gen.uniform(size=labels.shape) < ignore_fraction] = IGNORE
  return x, labels


PAIRS = np.array([[1, 0], [3, 2]], np.int32)  # sidewalk -> road, truck -> car


def jitted(fn, *static_args, **static_kwargs):
  """One compilation per call site instead of many eager op compilations (faster on CPU)."""
  return jax.jit(functools.partial(fn, *static_args, **static_kwargs))


# ------------------------------------------------------------------------------------------
# Step 1.


def test_resolve_confusable_pairs():
  got = core.resolve_confusable_pairs([("sidewalk", "road"), ("truck", "car")], CLASS_NAMES)
  np.testing.assert_array_equal(got, PAIRS)
  assert got.dtype == np.int32


@pytest.mark.parametrize(
  "pairs, match",
  [
    ([("sidewalk", "bus")], r"'bus' is unknown; allowed class names are \['road', "),
    ([("road", "road")], "src and tgt must differ"),
    ([("truck", "car"), ("truck", "road")], "src 'truck' already has a target"),
    ([], "pairs=\\[\\] is not allowed"),
  ],
)
def test_resolve_confusable_pairs_errors(pairs, match):
  with pytest.raises(ValueError, match=match):
    core.resolve_confusable_pairs(pairs, CLASS_NAMES)


def test_partial_targeted_labels_matches_numpy_loop(rng):
  _, labels = random_batch(1, n=3)
  mixed, mask = jitted(core.partial_targeted_labels)(rng, jnp.asarray(labels), PAIRS)
  ref_mixed, ref_mask = np_targeted_labels(labels, PAIRS)
  np.testing.assert_array_equal(np.asarray(mixed), ref_mixed)
  np.testing.assert_array_equal(np.asarray(mask), ref_mask)
  assert ref_mask.any() and (~ref_mask).any()


def test_partial_targeted_labels_rho_targets_a_random_fraction(rng):
  labels = np.full((2, 16, 16), 1, np.int32)  # all sidewalk
  labels[:, :, :4] = 2  # some car pixels, never targeted
  labels[:, 0, :] = IGNORE
  targeted_labels = jitted(core.partial_targeted_labels, rho=0.3)
  mixed, mask = targeted_labels(rng, jnp.asarray(labels), PAIRS)
  mixed, mask = np.asarray(mixed), np.asarray(mask)
  src = labels == 1
  assert not mask[~src].any()
  np.testing.assert_array_equal(mixed, np.where(mask, 0, labels))
  assert abs(mask[src].mean() - 0.3) < 0.08
  other, _ = targeted_labels(jax.random.key(1), jnp.asarray(labels), PAIRS)
  assert not np.array_equal(np.asarray(other), mixed)


# ------------------------------------------------------------------------------------------
# Step 2.


@pytest.mark.parametrize("w_t, w_c", [(1.0, 1.0), (3.0, 0.5), (2.0, 0.0)])
def test_weighted_pixel_loss_matches_numpy_loop(rng, w_t, w_c):
  x, labels = random_batch(2, n=3)
  mixed, mask = np_targeted_labels(labels, PAIRS)
  mixed[2] = IGNORE  # a sample without valid pixels
  logits = np.asarray(jax.random.normal(rng, (3, 5, 6, 4))) * 2.0
  ref_mean, ref_per_sample = np_weighted_loss(logits, mixed, mask, w_t, w_c)
  args = (jnp.asarray(logits), jnp.asarray(mixed), jnp.asarray(mask))
  weights = dict(w_t=w_t, w_c=w_c, ignore_label=IGNORE)
  np.testing.assert_allclose(
    jitted(core.weighted_pixel_loss, **weights)(*args), ref_mean, rtol=1e-5
  )
  per_sample = jitted(core.weighted_pixel_loss, **weights, per_sample=True)(*args)
  np.testing.assert_allclose(per_sample, ref_per_sample, rtol=1e-5)


# ------------------------------------------------------------------------------------------
# Step 3.


def test_adversarial_grad_and_fgsm_round_match_hand_derived_sign():
  params = make_params(3)
  x, labels = random_batch(3, n=2)
  mixed, mask = np_targeted_labels(labels, PAIRS)
  r = np.random.default_rng(4).uniform(-0.05, 0.05, size=x.shape).astype(np.float32)
  logits_fn = functools.partial(linear_apply, params)
  w_t, w_c, alpha, xi = 4.0, 0.5, 0.02, 0.06

  grad_fn = jitted(core.adversarial_loss_grad, logits_fn, w_t=w_t, w_c=w_c)
  grad = grad_fn(jnp.asarray(x + r), mixed, mask)
  ref_grad = np_linear_grad(x + r, params, mixed, mask, w_t, w_c)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)

  one_round = jitted(core.fgsm_round, logits_fn, alpha=alpha, xi=xi, w_t=w_t, w_c=w_c)
  r_new = one_round(jnp.asarray(x), jnp.asarray(r), mixed, mask)
  ref = np.clip(r - alpha * np.sign(ref_grad), np.maximum(-xi, -x), np.minimum(xi, 1.0 - x))
  ignored = (mixed == IGNORE)[..., None] & np.ones(x.shape, bool)
  assert np.all(np.asarray(grad)[ignored] == 0.0)  # ignored pixels: sign 0, r unchanged
  assert np.all(np.abs(ref_grad[~ignored]) > 1e-6)  # the other signs are unambiguous
  np.testing.assert_allclose(r_new, ref, atol=1e-6)


def test_gradient_of_a_sample_does_not_depend_on_the_other_samples():
  params = make_params(5)
  x, labels = random_batch(5, n=4)
  mixed, mask = np_targeted_labels(labels, PAIRS)
  logits_fn = functools.partial(linear_apply, params)
  grad_fn = jitted(core.adversarial_loss_grad, logits_fn, w_t=2.0)
  full = grad_fn(jnp.asarray(x), mixed, mask)
  alone = grad_fn(jnp.asarray(x[1:2]), mixed[1:2], mask[1:2])
  np.testing.assert_allclose(full[1:2], alone, rtol=1e-5, atol=1e-8)


def test_iterative_fgsm_matches_numpy_rounds_and_raises_success():
  params = make_params(0)
  x, labels = random_batch(6, n=3)
  mixed, mask = np_targeted_labels(labels, PAIRS)
  kwargs = dict(rounds=4, alpha=0.04, xi=0.1, w_t=2.0, w_c=1.0)
  logits_fn = functools.partial(linear_apply, params)
  r = jitted(core.iterative_fgsm, logits_fn, **kwargs)(
    jnp.asarray(x), jnp.zeros_like(x), mixed, mask
  )
  ref = np_fgsm_linear(x, np.zeros_like(x), params, mixed, mask, **kwargs)
  np.testing.assert_allclose(r, ref, atol=1e-5)

  w, b = params
  before = np_success(x @ w + b, mixed, mask)
  after = np_success((x + ref) @ w + b, mixed, mask)
  _, per_sample = jitted(core.targeted_success)(logits_fn(x + r), mixed, mask)
  np.testing.assert_allclose(per_sample, after, atol=1e-6)
  assert after.mean() > before.mean()


def test_iterative_fgsm_on_a_segmenter_equals_unrolled_rounds_on_xla_fast_path():
  """Issue 18: the fori_loop attack equals the unrolled rounds and compiles to fast kernels.

  XLA:CPU used to run the input-gradient convolutions inside the loop with an `01oi` kernel
  layout on a slow generic path (9x slower than the unrolled rounds);
  `research/models/conv.py` now gives them the `01io` layout in and out of loops.
  """
  model = Segmenter(5, (1, 1), (4, 8), 8)
  x, labels = random_batch(8, n=2, h=8, w=8, classes=5)
  mixed, mask = np_targeted_labels(labels, PAIRS)
  params = model.init(jax.random.key(0), jnp.asarray(x[:1]))["params"]
  kwargs = dict(alpha=0.02, xi=0.05, w_t=2.0, w_c=1.0)

  def logits_fn(images):
    return model.apply({"params": params}, images)["logits"]

  def looped(x, mixed, mask):
    return core.iterative_fgsm(logits_fn, x, jnp.zeros_like(x), mixed, mask, rounds=3, **kwargs)

  def unrolled(x, mixed, mask):
    r = jnp.zeros_like(x)
    for _ in range(3):
      r = core.fgsm_round(logits_fn, x, r, mixed, mask, **kwargs)
    return r

  args = (jnp.asarray(x), jnp.asarray(mixed), jnp.asarray(mask))
  compiled = jax.jit(looped).lower(*args).compile()
  r_loop, r_unrolled = np.asarray(compiled(*args)), np.asarray(jax.jit(unrolled)(*args))
  # Rounding differs between the two programs; a gradient entry at ~0 may flip its sign.
  assert np.mean(np.abs(r_loop - r_unrolled) < 1e-6) > 0.99
  assert np.abs(r_loop).max() > 0
  layouts = set(re.findall(r"dim_labels=b01f_(\w+)->b01f", compiled.as_text()))
  assert layouts == {"01io"}, layouts


def test_clip_keeps_every_pixel_in_budget_and_image_range(rng):
  x = np.random.default_rng(7).uniform(size=(2, 4, 4, 3)).astype(np.float32)
  x[0, 0, 0] = 0.0
  x[0, 0, 1] = 1.0
  xi = 0.05
  r = np.asarray(jax.random.uniform(rng, x.shape, minval=-1.0, maxval=1.0))
  clipped = np.asarray(jitted(core.clip_perturbation, xi=xi)(jnp.asarray(r), jnp.asarray(x)))
  low, high = np.maximum(-xi, -x), np.minimum(xi, 1.0 - x)
  assert np.all(np.abs(clipped) <= xi + 1e-7)
  assert np.all((x + clipped >= -1e-7) & (x + clipped <= 1.0 + 1e-7))
  inside = (r >= low) & (r <= high)
  np.testing.assert_array_equal(clipped[inside], r[inside])  # projection leaves these alone
  on_bound = np.isclose(clipped, low, atol=1e-7) | np.isclose(clipped, high, atol=1e-7)
  assert np.all(on_bound[~inside])

  start = np.asarray(jitted(core.random_start, eps_r=1.0, xi=xi)(rng, jnp.asarray(x)))
  assert np.all(np.abs(start) <= xi + 1e-7) and np.all(x + start >= -1e-7)
  assert np.any(start != 0)

  params = make_params(8)
  _, labels = random_batch(8, n=2, h=4, w=4)
  mixed, mask = np_targeted_labels(labels, PAIRS)
  attack = jitted(
    core.iterative_fgsm, functools.partial(linear_apply, params), rounds=3, alpha=0.5, xi=xi
  )
  r_big = attack(jnp.asarray(x), jnp.asarray(start), mixed, mask)
  r_big = np.asarray(r_big)
  assert np.all(np.abs(r_big) <= xi + 1e-7)
  assert np.all((x + r_big >= -1e-7) & (x + r_big <= 1.0 + 1e-7))


def test_targeted_success_matches_numpy_loop(rng):
  _, labels = random_batch(9, n=3)
  mixed, mask = np_targeted_labels(labels, PAIRS)
  mask[2] = False  # a sample without targeted pixels has rate 0
  logits = np.asarray(jax.random.normal(rng, (3, 5, 6, 4)))
  rate, per_sample = jitted(core.targeted_success)(logits, mixed, mask)
  ref = np_success(logits, mixed, mask)
  np.testing.assert_allclose(per_sample, ref, atol=1e-6)
  hits = sum(ref[n] * mask[n].sum() for n in range(3))
  np.testing.assert_allclose(rate, hits / mask.sum(), atol=1e-6)
  assert ref[2] == 0.0


# ------------------------------------------------------------------------------------------
# Step 4.


def test_sample_weights():
  success = jnp.array([0.5, 0.0, 0.25, 1.0])
  np.testing.assert_allclose(core.sample_weights(success), [0.25] * 4)
  np.testing.assert_allclose(
    core.sample_weights(success, "success"), np.array([0.5, 0.0, 0.25, 1.0]) / 1.75, rtol=1e-6
  )
  valid = jnp.array([True, True, False, True])
  np.testing.assert_allclose(
    core.sample_weights(success, "success", valid), np.array([0.5, 0, 0, 1.0]) / 1.5, rtol=1e-6
  )
  np.testing.assert_allclose(
    core.sample_weights(success, "uniform", valid), [1 / 3, 1 / 3, 0, 1 / 3]
  )
  zeros = jnp.zeros(4)
  np.testing.assert_allclose(core.sample_weights(zeros, "success", valid), [1 / 3, 1 / 3, 0, 1 / 3])
  np.testing.assert_allclose(core.sample_weights(zeros, "success", jnp.zeros(4, bool)), [0] * 4)


def _perturbations(seed, n, shape=(4, 5, 3)):
  gen = np.random.default_rng(seed)
  r = gen.uniform(-0.1, 0.1, size=(n, *shape)).astype(np.float32)
  w = gen.uniform(size=n).astype(np.float32)
  return r, w / w.sum()


def test_dataset_perturbation_matches_numpy():
  r, w = _perturbations(10, 5)
  np.testing.assert_allclose(core.dataset_perturbation(r, w), np_weighted_sum(r, w), atol=1e-6)


@pytest.mark.parametrize("n_devices, n_samples", [(1, 5), (8, 13), (8, 16)])
def test_accumulate_with_shard_map_matches_numpy(n_devices, n_samples):
  assert jax.device_count() == 8
  r, w = _perturbations(11, n_samples)
  mesh = core.device_mesh(jax.devices()[:n_devices])
  got = core.accumulate_with_shard_map(jnp.asarray(r), jnp.asarray(w), mesh)
  np.testing.assert_allclose(got, np_weighted_sum(r, w), atol=1e-6)


def test_accumulate_with_shard_map_default_mesh_uses_all_devices():
  r, w = _perturbations(12, 9)
  got = core.accumulate_with_shard_map(jnp.asarray(r), jnp.asarray(w))
  np.testing.assert_allclose(got, np_weighted_sum(r, w), atol=1e-6)


@pytest.mark.parametrize("n_devices, n_samples", [(8, 13), (1, 3)])
def test_accumulate_with_pmap_matches_numpy(n_devices, n_samples):
  r, w = _perturbations(13, n_samples)
  got = core.accumulate_with_pmap(jnp.asarray(r), jnp.asarray(w), num_devices=n_devices)
  np.testing.assert_allclose(got, np_weighted_sum(r, w), atol=1e-6)


TRACE_CALLS = []


def counting_apply(params, images):
  TRACE_CALLS.append(1)  # runs only while tracing
  return linear_apply(params, images)


def test_universal_perturbation_sharded_matches_numpy_pipeline_and_compiles_once(rng):
  config = core.AttackConfig(rounds=3, alpha=0.04, xi=0.1, w_t=2.0, w_c=1.0)
  trace_calls = []
  for seed in (14, 15):
    params = make_params(seed)
    x, labels = random_batch(seed, n=10, h=4, w=4)
    labels[0] = np.where(np.isin(labels[0], PAIRS[:, 0]), 2, labels[0])  # no targeted pixel
    out = core.universal_perturbation_sharded(
      counting_apply,
      params,
      jax.random.fold_in(rng, seed),
      jnp.asarray(x),
      jnp.asarray(labels),
      PAIRS,
      config=config,
      mesh=core.device_mesh(),
      weight_mode="success",
    )
    trace_calls.append(len(TRACE_CALLS))

    mixed, mask = np_targeted_labels(labels, PAIRS)
    r = np_fgsm_linear(
      x, np.zeros_like(x), params, mixed, mask, rounds=3, alpha=0.04, xi=0.1, w_t=2.0, w_c=1.0
    )
    w, b = params
    success = np_success((x + r) @ w + b, mixed, mask)
    assert success.sum() > 0 and success[0] == 0
    weights = success / success.sum()
    chex.assert_shape([out.r_d, out.success, out.weights], [(4, 4, 3), (10,), (10,)])
    np.testing.assert_allclose(out.success, success, atol=1e-6)
    np.testing.assert_allclose(out.weights, weights, atol=1e-6)
    np.testing.assert_allclose(out.r_d, np_weighted_sum(r, weights), atol=1e-5)
  assert trace_calls[0] > 0 and trace_calls[1] == trace_calls[0]  # second dataset: no retrace


def test_universal_perturbation_sharded_is_independent_of_device_count(rng):
  params = make_params(15)
  x, labels = random_batch(15, n=6, h=4, w=4)
  config = core.AttackConfig(rounds=2, alpha=0.03, xi=0.08, eps_r=0.05, rho=0.5)
  run = functools.partial(
    core.universal_perturbation_sharded,
    linear_apply,
    params,
    rng,
    jnp.asarray(x),
    jnp.asarray(labels),
    PAIRS,
    config=config,
  )
  eight = run(mesh=core.device_mesh())
  one = run(mesh=core.device_mesh(jax.devices()[:1]))
  chex.assert_trees_all_close(eight, one, atol=1e-6)
  chex.assert_tree_all_finite(eight)
  np.testing.assert_allclose(jnp.sum(eight.weights), 1.0, rtol=1e-6)


# ------------------------------------------------------------------------------------------
# Steps 5-7.


def np_unified(r_ds, xi, gamma, eps_r, noise, norm):
  acc = np.zeros(r_ds.shape[1:])
  for r in r_ds.astype(np.float64):
    size = np.abs(r).max() if norm == "linf" else np.sqrt((r**2).sum())
    if size > 0:
      acc += r / size
  return np.clip(gamma * acc / len(r_ds) + eps_r * noise, -xi, xi)


@pytest.mark.parametrize(
  "norm, gamma, eps_r",
  [("linf", None, 0.0), ("linf", 0.05, 0.02), ("l2", 2.0, 0.0), ("l2", None, 0.01)],
)
def test_unified_perturbation_matches_numpy(rng, norm, gamma, eps_r):
  r_ds, _ = _perturbations(18, 3)
  r_ds[1] = 0.0  # a zero r_D contributes zero, no NaN
  xi = 0.03
  unified = jitted(core.unified_perturbation, xi=xi, gamma=gamma, eps_r=eps_r, norm=norm)
  got = unified(rng, jnp.asarray(r_ds))
  noise = np.asarray(jax.random.normal(rng, r_ds.shape[1:]))
  ref = np_unified(r_ds, xi, xi if gamma is None else gamma, eps_r, noise, norm)
  chex.assert_tree_all_finite(got)
  np.testing.assert_allclose(got, ref, atol=1e-6)
  assert np.all(np.abs(np.asarray(got)) <= xi + 1e-7)


def test_second_samples_and_mix_batches():
  x = np.random.default_rng(19).uniform(size=(5, 3, 3, 3)).astype(np.float32)
  big = np.full((3, 3, 3), 0.5, np.float32)
  big[0, 0] = -0.7
  x2 = np.asarray(core.second_samples(jnp.asarray(x), jnp.asarray(big)))
  np.testing.assert_allclose(x2, np.clip(x + big[None], 0.0, 1.0), atol=1e-7)

  y = np.arange(5 * 3 * 3).reshape(5, 3, 3)
  x_mix, y_mix = core.mix_batches(x, y, x2, y + 100)
  # B = 5, ratio 0.5: round(2.5) = 2 second samples (Python's round-half-even).
  np.testing.assert_array_equal(np.asarray(x_mix), np.concatenate([x[:3], x2[3:]]))
  np.testing.assert_array_equal(np.asarray(y_mix), np.concatenate([y[:3], y[3:] + 100]))
  x_all, _ = core.mix_batches(x, y, x2, y, ratio=1.0)
  np.testing.assert_array_equal(np.asarray(x_all), x2)


# ------------------------------------------------------------------------------------------
# Compile once and validation.


def test_steps_compile_once(rng):
  chex.clear_trace_counter()
  params = make_params(20)
  logits_fn = functools.partial(linear_apply, params)
  labels_step = jax.jit(
    functools.partial(chex.assert_max_traces(core.partial_targeted_labels, n=1), rho=0.5)
  )
  loss_step = jax.jit(
    functools.partial(chex.assert_max_traces(core.weighted_pixel_loss, n=1), w_t=2.0, w_c=1.0)
  )
  round_step = jax.jit(
    functools.partial(chex.assert_max_traces(core.fgsm_round, n=1), logits_fn, alpha=0.1, xi=0.2)
  )
  rounds_step = jax.jit(
    functools.partial(
      chex.assert_max_traces(core.iterative_fgsm, n=1), logits_fn, rounds=2, alpha=0.1, xi=0.2
    )
  )
  unified_step = jax.jit(
    functools.partial(chex.assert_max_traces(core.unified_perturbation, n=1), xi=0.1, eps_r=0.1)
  )
  for seed in (21, 22):
    key = jax.random.fold_in(rng, seed)
    x, labels = (jnp.asarray(a) for a in random_batch(seed, n=2, h=3, w=3))
    mixed, mask = labels_step(key, labels, PAIRS)
    loss_step(logits_fn(x), mixed, mask)
    r = round_step(x, jnp.zeros_like(x), mixed, mask)
    rounds_step(x, r, mixed, mask)
    unified_step(key, jnp.stack([r[0], r[1]]))


@pytest.mark.parametrize(
  "call, match",
  [
    (lambda: core.AttackConfig(xi=0.0), r"xi=0.0 is not allowed: xi must be in \(0, 1\]"),
    (lambda: core.AttackConfig(alpha=1.5), r"alpha=1.5 is not allowed"),
    (lambda: core.AttackConfig(rho=0.0), r"rho=0.0 is not allowed"),
    (lambda: core.AttackConfig(rounds=0), r"rounds=0 is not allowed"),
    (lambda: core.AttackConfig(w_t=-1.0), r"w_t=-1.0 is not allowed"),
    (lambda: core.AttackConfig(eps_r=-0.1), r"eps_r=-0.1 is not allowed"),
    (
      lambda: core.partial_targeted_labels(None, jnp.zeros((1, 2, 2), int), PAIRS, rho=1.2),
      r"rho=1.2 is not allowed",
    ),
    (
      lambda: core.fgsm_round(
        lambda z: z, jnp.zeros((1, 2, 2, 3)), jnp.zeros((1, 2, 2, 3)), None, None, alpha=0.0, xi=1
      ),
      r"alpha=0.0 is not allowed",
    ),
    (
      lambda: core.unified_perturbation(jax.random.key(0), jnp.zeros((0, 2, 2, 3)), xi=0.1),
      r"M >= 1",
    ),
    (
      lambda: core.unified_perturbation(jax.random.key(0), jnp.zeros((1, 2, 2, 3)), xi=2.0),
      r"xi=2.0 is not allowed",
    ),
    (
      lambda: core.unified_perturbation(
        jax.random.key(0), jnp.zeros((1, 2, 2, 3)), xi=0.1, norm="l1"
      ),
      r"norm='l1' is not allowed: norm must be one of \['linf', 'l2'\]",
    ),
    (lambda: core.sample_weights(jnp.zeros(2), "best"), r"mode='best' is not allowed"),
    (lambda: core.check_same_image_size([]), r"M >= 1"),
    (
      lambda: core.check_same_image_size([(4, 8, 8, 3), (2, 16, 8, 3)]),
      r"dataset 0: \(8, 8, 3\), dataset 1: \(16, 8, 3\).*resize",
    ),
    (
      lambda: core.mix_batches(jnp.zeros((2, 1)), jnp.zeros(2), jnp.zeros((2, 1)), jnp.zeros(2), 2),
      r"ratio=2.0 is not allowed",
    ),
  ],
)
def test_bad_inputs_raise_clear_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_check_same_image_size_returns_common_size():
  assert core.check_same_image_size([(4, 8, 8, 3), (8, 8, 3)]) == (8, 8, 3)


def test_traced_config_value_is_rejected():
  with pytest.raises(TypeError, match="xi must be a static Python number"):
    jax.jit(lambda xi: core.clip_perturbation(jnp.zeros(3), jnp.zeros(3), xi))(0.1)
