"""Transport weights in the M5 core: zero-weight (padding) rows take no part in D or the attack."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.ot_perturbation import core

FIXED = core.SinkhornConfig(max_iterations=30, min_iterations=30, inner_iterations=1)
TESTED = core.SinkhornConfig(max_iterations=400, threshold=1e-6, inner_iterations=10)


def _features(n=5, dim=6, seed=0):
  rng = np.random.default_rng(seed)
  f = rng.normal(size=(n, dim)).astype(np.float32)
  g = (f + 0.7 * rng.normal(size=(n, dim))).astype(np.float32)
  return jnp.asarray(f), jnp.asarray(g)


@pytest.mark.parametrize("config", [FIXED, TESTED], ids=["fixed_count", "convergence_tested"])
def test_zero_weight_rows_are_out_of_the_problem(config):
  f, g = _features()
  real = 3
  # Padding rows as a last batch has them: copies of the last real row.
  f_pad = jnp.concatenate([f[:real], jnp.repeat(f[real - 1 : real], 2, axis=0)])
  g_pad = jnp.concatenate([g[:real], jnp.repeat(g[real - 1 : real], 2, axis=0)])
  weights = jnp.array([1.0, 1.0, 1.0, 0.0, 0.0])

  def distance(g_, f_, w):
    return core.feature_matching_distance(f_, g_, config, weights=w)

  (d_pad, aux_pad), grad_pad = jax.value_and_grad(distance, has_aux=True)(g_pad, f_pad, weights)
  (d_real, aux_real), grad_real = jax.value_and_grad(
    lambda g_: core.feature_matching_distance(f[:real], g_, config), has_aux=True
  )(g[:real])
  np.testing.assert_allclose(d_pad, d_real, rtol=1e-5)
  np.testing.assert_allclose(aux_pad["plan"][:real, :real], aux_real["plan"], rtol=1e-4, atol=1e-7)
  np.testing.assert_array_equal(aux_pad["plan"][real:], 0.0)
  np.testing.assert_array_equal(aux_pad["plan"][:, real:], 0.0)
  np.testing.assert_allclose(aux_pad["epsilon"], aux_real["epsilon"], rtol=1e-6)
  np.testing.assert_allclose(grad_pad[:real], grad_real, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(grad_pad[real:], 0.0)
  assert bool(aux_pad["finite"])
  # Without weights the copies take mass and change the real rows' plan (what was wrong).
  d_uniform, _ = core.feature_matching_distance(f_pad, g_pad, config)
  assert abs(float(d_uniform) - float(d_real)) > 1e-4


def test_unit_weights_match_the_uniform_fixed_count_solver():
  f, g = _features(n=6, seed=1)

  def distance(g_, weights):
    return core.feature_matching_distance(f, g_, FIXED, weights=weights)[0]

  d_uniform, grad_uniform = jax.value_and_grad(distance)(g, None)
  d_weighted, grad_weighted = jax.value_and_grad(distance)(g, jnp.full(6, 3.0))
  np.testing.assert_allclose(d_weighted, d_uniform, rtol=1e-5)
  np.testing.assert_allclose(grad_weighted, grad_uniform, rtol=1e-4, atol=1e-6)


def test_ot_attack_moves_real_images_as_if_alone_and_leaves_padding_at_its_start():
  rng = np.random.default_rng(2)
  w_proj = jnp.asarray(rng.normal(size=(4 * 4 * 3, 5)).astype(np.float32))

  def features_fn(x):
    return jnp.tanh(x.reshape(x.shape[0], -1) @ w_proj)

  x = jnp.asarray(rng.uniform(size=(3, 4, 4, 3)).astype(np.float32))
  x_pad = jnp.concatenate([x, jnp.repeat(x[-1:], 3, axis=0)])
  start = core.perturbed_images(jax.random.key(0), x_pad, eps=0.05)
  weights = jnp.array([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
  kwargs = dict(eps=0.05, alpha=0.02, steps=3, sinkhorn_config=FIXED)
  got, aux = core.ot_attack(features_fn, x_pad, start, weights=weights, **kwargs)
  alone, _ = core.ot_attack(features_fn, x, start[:3], **kwargs)
  np.testing.assert_allclose(got[:3], alone, atol=1e-6)
  np.testing.assert_allclose(got[3:], start[3:], atol=1e-7)
  assert bool(aux["finite"])


def test_non_finite_features_clear_the_finite_flag():
  def features_fn(x):
    return x.reshape(x.shape[0], -1) * jnp.nan

  x = jnp.full((2, 2, 2, 1), 0.5)
  _, aux = core.ot_attack(
    features_fn,
    x,
    x,
    eps=0.1,
    alpha=0.05,
    steps=1,
    sinkhorn_config=FIXED,
    weights=jnp.array([1.0, 0.0]),
  )
  assert not bool(aux["finite"])


def test_weights_of_the_wrong_shape_raise():
  f, g = _features(n=4)
  with pytest.raises(ValueError, match="weights has shape"):
    core.feature_matching_distance(f, g, FIXED, weights=jnp.ones(3))
