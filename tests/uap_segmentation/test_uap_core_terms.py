"""M1 core, the patent's own terms (issue 16): claim 5's in-round random term, the dependent
claim's partner pixels, and the per-device body under `jax.pmap` and `jax.shard_map`.

References are independent float64 numpy loops over a per-pixel linear model (its input
gradient is derived by hand), not the code's own output.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.uap_segmentation import core

IGNORE = 255
PAIRS = np.array([[1, 0], [3, 2]], np.int32)  # sidewalk -> road, truck -> car
ONE_PAIR = PAIRS[:1]  # classes 2 and 3 are then outside every pair


def linear_apply(params, images):
  w, b = params
  return images @ w + b


def make_params(seed):
  gen = np.random.default_rng(seed)
  return (
    gen.normal(size=(3, 4)).astype(np.float32) * 3.0,
    gen.normal(size=(4,)).astype(np.float32) * 0.3,
  )


def random_batch(seed, n=3, h=4, w=5):
  gen = np.random.default_rng(seed)
  x = gen.uniform(size=(n, h, w, 3)).astype(np.float32)
  labels = gen.integers(0, 4, size=(n, h, w)).astype(np.int32)
  labels[gen.uniform(size=labels.shape) < 0.1] = IGNORE
  return x, labels


def np_softmax(z):
  e = np.exp(z - z.max())
  return e / e.sum()


def np_grad(x_adv, params, mixed, mask, w_t, w_c):
  """∇_x of sum_n mean-over-valid-pixels(w * CE) for logits = x W + b, by hand."""
  w, b = (np.asarray(p, np.float64) for p in params)
  grad = np.zeros(x_adv.shape)
  for n in range(x_adv.shape[0]):
    n_valid = max(int(np.sum(mixed[n] != IGNORE)), 1)
    for i, j in np.ndindex(x_adv.shape[1:3]):
      lab = mixed[n, i, j]
      if lab == IGNORE:
        continue
      p = np_softmax(x_adv[n, i, j].astype(np.float64) @ w + b)
      p[lab] -= 1.0
      grad[n, i, j] = (w_t if mask[n, i, j] else w_c) / n_valid * (p @ w.T)
  return grad


def np_partner_labels(labels, pairs):
  """The dependent claim: src -> tgt (targeted); tgt pixels keep their label; others ignored."""
  mixed = np.full_like(labels, IGNORE)
  mask = np.zeros(labels.shape, bool)
  for idx in np.ndindex(labels.shape):
    for src, tgt in pairs:
      if labels[idx] == src:
        mixed[idx], mask[idx] = tgt, True
      elif labels[idx] == tgt:
        mixed[idx] = tgt
  return mixed, mask


# ------------------------------------------------------------------------------------------
# Claim 5: r_i = Clip_xi(r_{i-1} - alpha sign(grad) + eps r_random), a fresh draw each round.


def test_round_noise_is_fresh_each_round_and_per_sample(rng):
  keys = core.round_keys(rng, 4)
  first, second = (np.asarray(core.round_noise(keys, i, (3, 2, 3), jnp.float32)) for i in (0, 1))
  assert first.shape == (4, 3, 2, 3)
  assert not np.allclose(first, second)  # a fresh draw each round
  assert 0.5 < np.std(np.concatenate([first.ravel(), second.ravel()])) < 1.5
  # Sample b's draw depends only on its own key: a sub-batch sees the same numbers.
  np.testing.assert_array_equal(core.round_noise(keys[1:], 1, (3, 2, 3), jnp.float32), second[1:])


@pytest.mark.parametrize("eps_round", [0.0, 0.02])
def test_iterative_fgsm_with_in_round_noise_matches_numpy(rng, eps_round):
  params = make_params(3)
  x, labels = random_batch(3)
  mixed, mask = core.partial_targeted_labels(None, jnp.asarray(labels), PAIRS)
  keys = core.round_keys(rng, len(x))
  alpha, xi, rounds = 0.01, 0.05, 3
  got = core.iterative_fgsm(
    functools.partial(linear_apply, params),
    jnp.asarray(x),
    jnp.zeros_like(x),
    mixed,
    mask,
    rounds=rounds,
    alpha=alpha,
    xi=xi,
    w_t=2.0,
    w_c=1.0,
    eps_round=eps_round,
    keys=keys,
  )
  mixed, mask = np.asarray(mixed), np.asarray(mask)  # for the numpy reference
  r = np.zeros(x.shape)
  for i in range(rounds):
    noise = np.asarray(core.round_noise(keys, i, x.shape[1:], jnp.float32), np.float64)
    step = r - alpha * np.sign(np_grad(x + r, params, mixed, mask, 2.0, 1.0)) + eps_round * noise
    r = np.clip(step, np.maximum(-xi, -x), np.minimum(xi, 1.0 - x))
  np.testing.assert_allclose(got, r, atol=1e-5)
  if eps_round:  # the term is really inside the rounds: without it the result differs
    r0 = np.zeros(x.shape)
    for _ in range(rounds):
      step = r0 - alpha * np.sign(np_grad(x + r0, params, mixed, mask, 2.0, 1.0))
      r0 = np.clip(step, np.maximum(-xi, -x), np.minimum(xi, 1.0 - x))
    assert np.max(np.abs(np.asarray(got) - r0)) > 1e-3


def test_in_round_noise_needs_keys():
  x = jnp.zeros((1, 2, 2, 3))
  with pytest.raises(ValueError, match="eps_round=0.1 needs keys"):
    core.iterative_fgsm(
      functools.partial(linear_apply, make_params(0)),
      x,
      x,
      jnp.zeros((1, 2, 2), jnp.int32),
      jnp.zeros((1, 2, 2), bool),
      rounds=1,
      alpha=0.1,
      xi=0.1,
      eps_round=0.1,
    )


# ------------------------------------------------------------------------------------------
# The dependent claim: correct-label pixels only of the pair's partner class.


def test_partner_correct_pixels_match_numpy(rng):
  _, labels = random_batch(5, n=4)
  mixed, mask = core.partial_targeted_labels(
    rng, jnp.asarray(labels), ONE_PAIR, correct_pixels="partner"
  )
  ref_mixed, ref_mask = np_partner_labels(labels, ONE_PAIR)
  np.testing.assert_array_equal(mixed, ref_mixed)
  np.testing.assert_array_equal(mask, ref_mask)
  all_mixed, all_mask = core.partial_targeted_labels(rng, jnp.asarray(labels), ONE_PAIR)
  np.testing.assert_array_equal(all_mask, mask)  # the targeted pixels are the same
  assert np.sum(np.asarray(all_mixed) != IGNORE) > np.sum(np.asarray(mixed) != IGNORE)


def test_partner_option_reaches_the_attack(rng):
  """Through `AttackConfig`: the partner attack equals numpy's rounds on the partner labels."""
  params = make_params(6)
  x, labels = random_batch(6, n=3)
  config = core.AttackConfig(rounds=2, alpha=0.02, xi=0.05, correct_pixels="partner")
  out = core.universal_perturbation_sharded(
    linear_apply,
    params,
    rng,
    jnp.asarray(x),
    jnp.asarray(labels),
    ONE_PAIR,
    config=config,
    mesh=core.device_mesh(jax.devices()[:1]),
  )
  mixed, mask = np_partner_labels(labels, ONE_PAIR)
  r = np.zeros(x.shape)
  for _ in range(2):
    step = r - 0.02 * np.sign(np_grad(x + r, params, mixed, mask, 1.0, 1.0))
    r = np.clip(step, np.maximum(-0.05, -x), np.minimum(0.05, 1.0 - x))
  np.testing.assert_allclose(out.r_d, r.mean(0), atol=1e-5)


@pytest.mark.parametrize(
  "field, value, match",
  [
    ("eps_round", -0.1, "eps_round=-0.1 is not allowed"),
    ("correct_pixels", "some", "correct_pixels='some' is not allowed"),
  ],
)
def test_attack_config_rejects_bad_new_fields(field, value, match):
  with pytest.raises(ValueError, match=match):
    core.AttackConfig(**{field: value})


# ------------------------------------------------------------------------------------------
# The per-device body under jax.pmap and jax.shard_map.


@pytest.mark.parametrize("n_devices, n_samples", [(4, 5), (8, 11), (3, 3)])
def test_pmap_driver_equals_shard_map_driver_with_padding(rng, n_devices, n_samples):
  params = make_params(7)
  x, labels = random_batch(7, n=n_samples)
  labels[0] = np.where(np.isin(labels[0], PAIRS[:, 0]), 2, labels[0])  # zero success: weight 0
  config = core.AttackConfig(rounds=2, alpha=0.03, xi=0.06, eps_r=0.02, eps_round=0.01)
  args = (linear_apply, params, rng, jnp.asarray(x), jnp.asarray(labels), PAIRS)
  mesh = core.device_mesh(jax.devices()[:n_devices])
  sharded = core.universal_perturbation_sharded(
    *args, config=config, mesh=mesh, weight_mode="success"
  )
  pmapped = core.universal_perturbation_pmap(
    *args, config=config, weight_mode="success", num_devices=n_devices
  )
  chex.assert_shape(
    [pmapped.r_d, pmapped.success, pmapped.weights], [(4, 5, 3), (n_samples,), (n_samples,)]
  )
  chex.assert_trees_all_close(pmapped, sharded, atol=1e-6)
  assert pmapped.weights[0] == 0.0 and np.isclose(np.sum(pmapped.weights), 1.0, atol=1e-6)
  # One device, no padding: the same numbers, so neither the split nor the padding matters.
  single = core.universal_perturbation_pmap(
    *args, config=config, weight_mode="success", num_devices=1
  )
  chex.assert_trees_all_close(single, sharded, atol=1e-6)
  # The success weights are the success rates normalised (not uniform).
  np.testing.assert_allclose(sharded.weights, sharded.success / np.sum(sharded.success), atol=1e-6)
