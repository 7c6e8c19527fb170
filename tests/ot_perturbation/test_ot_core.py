"""Tests of the pure M5 core against independent references (POT, numpy, finite differences)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import ot
import pytest

from research.ot_perturbation import core

EPS = 8.0 / 255.0
_SINKHORN_FIELDS = (
  "epsilon",
  "cost",
  "relative_epsilon",
  "max_iterations",
  "min_iterations",
  "inner_iterations",
  "threshold",
)
# Jitted once per setting (eager Sinkhorn dispatches op by op and is slow on the CPU here).
_fmd = jax.jit(core.feature_matching_distance, static_argnames=_SINKHORN_FIELDS)
_perturb = jax.jit(core.perturbed_images, static_argnames=("kind", "eps"))


def _features(seed, n, d, scale=1.0):
  return scale * np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def _numpy_cost(f, g, kind):
  f, g = np.asarray(f, np.float64), np.asarray(g, np.float64)
  out = np.zeros((len(f), len(g)))
  for i in range(len(f)):
    for j in range(len(g)):
      if kind == "cosine":
        out[i, j] = 1 - f[i] @ g[j] / (np.linalg.norm(f[i]) * np.linalg.norm(g[j]))
      else:
        out[i, j] = np.sum((f[i] - g[j]) ** 2)
  return out


# ------------------------------------------------------------------ perturbations (step 2)


@pytest.mark.parametrize("kind", core.PERTURBATION_KINDS)
def test_perturbed_images_stay_in_eps_ball_and_unit_range(rng, kind):
  x = jax.random.uniform(jax.random.key(1), (3, 6, 5, 3))
  x = x.at[0].set(0.0).at[1, :, :, 0].set(1.0)  # images touching both bounds
  x_pert = _perturb(rng, x, kind=kind, eps=0.1)
  chex.assert_shape(x_pert, x.shape)
  assert float(jnp.max(jnp.abs(x_pert - x))) <= 0.1 + 1e-6
  assert float(jnp.min(x_pert)) >= 0.0 and float(jnp.max(x_pert)) <= 1.0
  assert float(jnp.max(jnp.abs(x_pert[2] - x[2]))) > 0.01  # it does perturb


def test_uniform_perturbation_covers_the_ball(rng):
  x = jnp.full((4, 8, 8, 3), 0.5)
  delta = np.asarray(_perturb(rng, x, eps=0.1) - x).ravel()
  # U(-0.1, 0.1): mean 0, std 0.1/sqrt(3), both tails reached.
  assert abs(delta.mean()) < 0.01
  assert abs(delta.std() - 0.1 / np.sqrt(3)) < 0.005
  assert delta.min() < -0.09 and delta.max() > 0.09


def test_photometric_perturbation_is_uniform_over_a_constant_image(rng):
  # On a constant image, brightness/contrast move every pixel by the same amount.
  x = jnp.full((3, 5, 5, 3), 0.4)
  x_pert = _perturb(rng, x, kind="photometric", eps=0.05)
  per_image = np.asarray(x_pert).reshape(3, -1)
  np.testing.assert_allclose(per_image, per_image[:, :1].repeat(per_image.shape[1], 1), atol=1e-7)
  assert np.ptp(per_image[:, 0]) > 0  # different images get different shifts


def test_gaussian_perturbation_differs_from_uniform(rng):
  x = jnp.full((2, 16, 16, 3), 0.5)
  delta = np.abs(np.asarray(_perturb(rng, x, kind="gaussian", eps=0.1) - x))
  # N(0, 0.1^2) clipped to 0.1: P(|z| >= 1 sigma) ~ 0.317 of the pixels sit on the boundary.
  assert 0.25 < np.mean(delta >= 0.1 - 1e-6) < 0.39


def test_candidate_perturbations_are_independent(rng):
  x = jnp.full((2, 4, 4, 1), 0.5)
  cands = core.candidate_perturbations(rng, x, 3, eps=0.1)
  chex.assert_shape(cands, (3, 2, 4, 4, 1))
  assert not np.allclose(cands[0], cands[1])


# ------------------------------------------------------------------ OT distance (step 4)


@pytest.mark.parametrize("kind", core.COST_KINDS)
def test_cost_matrix_matches_numpy_loops(kind):
  f, g = _features(0, 4, 3), _features(1, 5, 3)
  np.testing.assert_allclose(core.cost_matrix(f, g, kind), _numpy_cost(f, g, kind), atol=1e-5)


@pytest.mark.parametrize("kind,epsilon", [("cosine", 0.05), ("sqeuclidean", 0.5)])
def test_feature_matching_distance_matches_pot(kind, epsilon):
  f, g = _features(2, 5, 4), _features(3, 6, 4)
  dist, aux = _fmd(
    jnp.asarray(f),
    jnp.asarray(g),
    epsilon=epsilon,
    cost=kind,
    relative_epsilon=None,
    max_iterations=3000,
    threshold=1e-5,
  )
  cost = _numpy_cost(f, g, kind)
  a, b = np.full(5, 1 / 5), np.full(6, 1 / 6)
  plan_ref = ot.sinkhorn(a, b, cost, epsilon, numItermax=100000, stopThr=1e-12)
  dist_ref = ot.sinkhorn2(a, b, cost, epsilon, numItermax=100000, stopThr=1e-12)
  np.testing.assert_allclose(aux["plan"], plan_ref, atol=2e-5)
  np.testing.assert_allclose(dist, dist_ref, rtol=1e-4)
  np.testing.assert_allclose(dist, np.sum(plan_ref * cost), rtol=1e-4)
  assert bool(aux["converged"]) and bool(aux["finite"])
  assert 0 < int(aux["n_iters"]) <= 3000


def test_relative_epsilon_follows_the_cost_scale():
  # Features at scale 1e-3: squared distances ~1e-6, far below an absolute epsilon of 0.05.
  f = _features(4, 6, 3, scale=1e-3)
  g = f[::-1] + _features(5, 6, 3, scale=1e-5)
  cost = _numpy_cost(f, g, "sqeuclidean")
  dist, aux = _fmd(
    jnp.asarray(f), jnp.asarray(g), cost="sqeuclidean", epsilon=0.05, max_iterations=1000
  )
  np.testing.assert_allclose(aux["epsilon"], 0.05 * cost.mean(), rtol=1e-3)
  a = np.full(6, 1 / 6)
  dist_ref = ot.sinkhorn2(a, a, cost, 0.05 * cost.mean(), numItermax=100000, stopThr=1e-12)
  np.testing.assert_allclose(dist, dist_ref, rtol=1e-3)
  # The plan finds the reversal permutation, unlike the near-uniform absolute-epsilon plan.
  assert np.all(np.argmax(aux["plan"], axis=1) == np.arange(6)[::-1])
  dist_abs, _ = _fmd(
    jnp.asarray(f), jnp.asarray(g), cost="sqeuclidean", epsilon=0.05, relative_epsilon=None
  )
  np.testing.assert_allclose(dist_abs, cost.mean(), rtol=1e-3)
  assert float(dist) < 0.2 * float(dist_abs)


def test_identical_features_do_not_nan():
  f = jnp.ones((4, 3))
  dist, aux = _fmd(f, f)
  assert bool(aux["finite"]) and abs(float(dist)) < 1e-6


def test_fixed_iterations_under_vmap_and_jit():
  f = jnp.asarray(_features(6, 4, 3))
  gs = jnp.asarray(np.stack([_features(s, 4, 3) for s in (7, 8, 9)]))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def batched(gs):
    return jax.vmap(
      lambda g: core.feature_matching_distance(f, g, max_iterations=50, min_iterations=50)
    )(gs)

  dists, aux = batched(gs)
  dists_again, _ = batched(gs + 0.0)
  chex.assert_shape(dists, (3,))
  np.testing.assert_array_equal(aux["n_iters"], [50, 50, 50])
  for i in range(3):
    single, _ = _fmd(f, gs[i], max_iterations=50, min_iterations=50)
    np.testing.assert_allclose(dists[i], single, rtol=1e-5)
  np.testing.assert_allclose(dists, dists_again)


def _numpy_sinkhorn_distance(cost, epsilon, iterations):
  """``<P, C>`` after exactly ``iterations`` log-domain Sinkhorn iterations (g, then f)."""
  n, m = cost.shape
  f, g = np.zeros(n), np.zeros(m)

  def lse(x, axis):
    top = x.max(axis=axis, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=axis, keepdims=True))).squeeze(axis)

  for _ in range(iterations):
    g = -epsilon * np.log(m) - epsilon * lse((f[:, None] - cost) / epsilon, axis=0)
    f = -epsilon * np.log(n) - epsilon * lse((g[None, :] - cost) / epsilon, axis=1)
  return np.sum(np.exp((f[:, None] + g[None, :] - cost) / epsilon) * cost)


@pytest.mark.parametrize("iterations", [1, 7, 14, 15, 23, 40])
@pytest.mark.parametrize("inner", ["experiment", 1])
def test_fixed_iteration_count_is_exact(iterations, inner):
  """Issue 15 item 4: a fixed count runs exactly that many iterations (15 used to run 14)."""
  if inner == "experiment":  # the inner block size research/ot_perturbation/experiment.py picks
    block = min(10, iterations)
    inner = block if iterations % block == 0 else 1
  f, g = _features(20, 8, 4), _features(21, 9, 4)
  dist, aux = _fmd(
    jnp.asarray(f),
    jnp.asarray(g),
    epsilon=0.02,  # relative to the mean cosine cost: converges slowly enough to count
    max_iterations=iterations,
    min_iterations=iterations,
    inner_iterations=inner,
    threshold=1.0,  # converged from the first check: only the fixed count may stop it
  )
  cost = _numpy_cost(f, g, "cosine")
  epsilon = 0.02 * cost.mean()
  want = _numpy_sinkhorn_distance(cost, epsilon, iterations)
  one_fewer = _numpy_sinkhorn_distance(cost, epsilon, iterations - 1)
  assert int(aux["n_iters"]) == iterations
  assert abs(want - one_fewer) > 2e-4 * want  # the check below tells the counts apart
  np.testing.assert_allclose(dist, want, rtol=5e-5)
  assert bool(aux["converged"])  # the marginal error of the last iterate is below 1.0


@pytest.mark.parametrize("iterations", [3, 25])
def test_fixed_count_solver_equals_autodiff_through_ott(iterations):
  """The written-out backward of the fixed count equals jax.grad through ott's iterations."""
  from ott.geometry import geometry
  from ott.problems.linear import linear_problem
  from ott.solvers.linear import sinkhorn

  f = jnp.asarray(_features(30, 12, 5))
  g = jnp.asarray(_features(31, 10, 5))

  def ott_distance(g):
    costs = core.cost_matrix(f, g)
    epsilon = 0.05 * jax.lax.stop_gradient(costs.mean())
    solver = sinkhorn.Sinkhorn(  # one block of exactly `iterations`, ott's while_loop backward
      min_iterations=0, max_iterations=iterations, inner_iterations=iterations, implicit_diff=None
    )
    out = solver(linear_problem.LinearProblem(geometry.Geometry(costs, epsilon=epsilon)))
    return jnp.sum(out.matrix * costs), out.matrix

  def ours(g):
    dist, aux = core.feature_matching_distance(
      f, g, max_iterations=iterations, min_iterations=iterations, inner_iterations=1
    )
    return dist, aux["plan"]

  (d_ref, plan_ref), grad_ref = jax.jit(jax.value_and_grad(ott_distance, has_aux=True))(g)
  (d, plan), grad = jax.jit(jax.value_and_grad(ours, has_aux=True))(g)
  np.testing.assert_allclose(d, d_ref, rtol=1e-5)
  np.testing.assert_allclose(plan, plan_ref, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(grad, grad_ref, rtol=1e-4, atol=1e-5 * np.abs(grad_ref).max())
  assert np.abs(grad_ref).max() > 1e-3


@pytest.mark.parametrize("kind", core.COST_KINDS)
def test_gradient_matches_central_finite_differences(kind):
  with jax.enable_x64(True):
    f = jnp.asarray(_features(10, 4, 3), jnp.float64)
    g = jnp.asarray(_features(11, 5, 3), jnp.float64)

    def dist(g):
      return _fmd(
        f,
        g,
        cost=kind,
        epsilon=0.1,
        relative_epsilon=None,
        max_iterations=200,
        min_iterations=200,
      )[0]

    dist = jax.jit(dist)
    grad = np.asarray(jax.jit(jax.grad(dist))(g))
    h = 1e-6
    fd = np.zeros_like(grad)
    for idx in np.ndindex(*g.shape):
      step = jnp.zeros_like(g).at[idx].set(h)
      fd[idx] = (float(dist(g + step)) - float(dist(g - step))) / (2 * h)
    np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=1e-7)
    assert np.abs(grad).max() > 1e-3


def test_gradient_with_early_stopping_is_finite():
  f = jnp.asarray(_features(12, 4, 3))
  g = jnp.asarray(_features(13, 4, 3))
  grad = jax.jit(jax.grad(lambda g: _fmd(f, g)[0]))(g)
  chex.assert_tree_all_finite(grad)


def test_non_finite_features_flag_in_jit_and_error_on_host():
  f = jnp.asarray(_features(14, 4, 3)).at[0, 0].set(jnp.nan)
  _, aux = _fmd(f, f)
  assert not bool(aux["finite"])
  with pytest.raises(ValueError, match="non-finite entries"):
    core.check_finite("features", f)
  core.check_finite("features", jnp.ones(3))


@pytest.mark.parametrize(
  "kwargs,match",
  [
    ({"epsilon": 0.0}, "epsilon=0.0"),
    ({"epsilon": -1.0}, "epsilon=-1.0"),
    ({"cost": "l1"}, "cost='l1'"),
    ({"relative_epsilon": "std"}, "relative_epsilon='std'"),
    ({"max_iterations": 55}, "max_iterations=55"),
    ({"min_iterations": 500}, "min_iterations=500"),
  ],
)
def test_bad_sinkhorn_settings_raise(kwargs, match):
  f = jnp.ones((2, 3))
  with pytest.raises(ValueError, match=match):
    core.feature_matching_distance(f, f, **kwargs)


def test_empty_or_mismatched_sets_raise(rng):
  with pytest.raises(ValueError, match="empty"):
    core.feature_matching_distance(jnp.ones((0, 3)), jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="dimensions must match"):
    core.feature_matching_distance(jnp.ones((2, 3)), jnp.ones((2, 4)))
  with pytest.raises(ValueError, match="empty"):
    core.perturbed_images(rng, jnp.ones((0, 4, 4, 3)))
  with pytest.raises(ValueError, match="kind='blur'"):
    core.perturbed_images(rng, jnp.ones((1, 4, 4, 3)), kind="blur")
  with pytest.raises(ValueError, match="eps=-0.1"):
    core.perturbed_images(rng, jnp.ones((1, 4, 4, 3)), eps=-0.1)


# ------------------------------------------------------------------ target set (step 5)


def _toy_features_fn():
  w = jnp.asarray(np.random.default_rng(20).normal(size=(4 * 4 * 3, 6)), jnp.float32)

  def features_fn(images):
    return jnp.tanh(images.reshape(images.shape[0], -1) @ w)

  return features_fn


def _toy_ot_attack(rng, seed, alpha, steps):
  """Jitted `ot_attack` on the toy features from a start within `EPS` of a random set.

  Returns:
    `(features_fn, x, x_init, x_adv, aux)`.
  """
  features_fn = _toy_features_fn()
  x = jax.random.uniform(jax.random.key(seed), (4, 4, 4, 3))
  x_init = _perturb(rng, x, eps=EPS)
  x_adv, aux = jax.jit(
    lambda x, x0: core.ot_attack(features_fn, x, x0, eps=EPS, alpha=alpha, steps=steps)
  )(x, x_init)
  return features_fn, x, x_init, x_adv, aux


def test_ot_attack_stays_in_bounds_and_increases_distance(rng):
  features_fn, x, _, x_adv, aux = _toy_ot_attack(rng, 3, alpha=EPS / 4, steps=6)
  chex.assert_shape(x_adv, x.shape)
  chex.assert_shape(aux["distances"], (7,))
  assert float(jnp.max(jnp.abs(x_adv - x))) <= EPS + 1e-6
  assert float(jnp.min(x_adv)) >= 0.0 and float(jnp.max(x_adv)) <= 1.0
  assert bool(aux["finite"])
  distances = np.asarray(aux["distances"])
  assert distances[-1] > 2 * distances[0]
  # D of the returned set, recomputed from scratch, is the last recorded distance.
  d_final, _ = _fmd(features_fn(x), features_fn(x_adv))
  np.testing.assert_allclose(distances[-1], d_final, rtol=1e-5)


def test_ot_attack_one_step_is_a_projected_signed_gradient_step(rng):
  features_fn, x, x_init, x_adv, _ = _toy_ot_attack(rng, 4, alpha=EPS / 2, steps=1)
  f_clean = features_fn(x)
  grad = jax.jit(jax.grad(lambda xp: _fmd(f_clean, features_fn(xp))[0]))(x_init)
  expected = np.clip(
    np.clip(np.asarray(x_init) + EPS / 2 * np.sign(grad), x - EPS, x + EPS), 0.0, 1.0
  )
  np.testing.assert_allclose(x_adv, expected, atol=1e-7)


def test_best_of_candidates_picks_the_largest_distance(rng):
  features_fn = _toy_features_fn()
  x = jax.random.uniform(jax.random.key(5), (4, 4, 4, 3), minval=0.2, maxval=0.8)
  noise = jax.random.uniform(rng, (3, *x.shape), minval=-1.0, maxval=1.0)
  scales = jnp.asarray([0.01, 0.15, 0.03])[:, None, None, None, None]
  candidates = jnp.clip(x + scales * noise, 0.0, 1.0)
  x_best, aux = jax.jit(lambda x, c: core.best_of_candidates(features_fn, x, c))(x, candidates)
  assert int(aux["index"]) == 1  # the candidate moved furthest
  np.testing.assert_array_equal(x_best, candidates[1])
  for i in range(3):
    d, _ = _fmd(features_fn(x), features_fn(candidates[i]))
    np.testing.assert_allclose(aux["distances"][i], d, rtol=1e-5)


def test_attack_bad_arguments_raise(rng):
  features_fn = _toy_features_fn()
  x = jnp.ones((2, 4, 4, 3)) * 0.5
  with pytest.raises(ValueError, match="alpha=0.0"):
    core.ot_attack(features_fn, x, x, eps=EPS, alpha=0.0, steps=1)
  with pytest.raises(ValueError, match="steps=-1"):
    core.ot_attack(features_fn, x, x, eps=EPS, alpha=0.01, steps=-1)
  with pytest.raises(ValueError, match="x_init has shape"):
    core.ot_attack(features_fn, x, x[:1], eps=EPS, alpha=0.01, steps=1)
  with pytest.raises(ValueError, match="candidates has shape"):
    core.best_of_candidates(features_fn, x, x)


# ------------------------------------------------------------------ loss and convergence (6, 7)


def _mse_task_loss(params, images, targets):
  pred = images.reshape(images.shape[0], -1) @ params
  loss = jnp.mean((pred - targets) ** 2)
  return loss, {"mse": loss}


def test_combined_loss_is_clean_plus_perturbed():
  params = jnp.asarray(_features(30, 12, 1))
  x = jnp.asarray(np.random.default_rng(31).uniform(size=(3, 2, 2, 3)), jnp.float32)
  x_t = x + 0.05
  y = jnp.asarray(_features(32, 3, 1))
  loss, metrics = core.combined_loss(_mse_task_loss, params, x, x_t, y)
  xn, xtn, pn, yn = (np.asarray(a, np.float64) for a in (x, x_t, params, y))
  loss1 = np.mean((xn.reshape(3, -1) @ pn - yn) ** 2)
  loss2 = np.mean((xtn.reshape(3, -1) @ pn - yn) ** 2)
  np.testing.assert_allclose(loss, loss1 + loss2, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss1"], loss1, rtol=1e-5)
  np.testing.assert_allclose(metrics["perturbed/mse"], loss2, rtol=1e-5)
  only, only_metrics = core.combined_loss(_mse_task_loss, params, x, x_t, y, perturbed_only=True)
  np.testing.assert_allclose(only, loss2, rtol=1e-5)
  assert "loss1" not in only_metrics
  # No gradient flows into the target images.
  grad_xt = jax.grad(lambda xt: core.combined_loss(_mse_task_loss, params, x, xt, y)[0])(x_t)
  np.testing.assert_array_equal(grad_xt, 0.0)


def test_convergence_rule():
  assert bool(core.converged(jnp.float32(0.5), 0.5))  # "at or below"
  assert not bool(core.converged(jnp.float32(0.51), 0.5))
  assert not bool(core.converged(jnp.float32(jnp.nan), 0.5))
  rule = core.ConvergenceRule(loss_threshold=0.5, max_steps=10)
  assert core.stop_reason(0.5, 3, rule) == "converged"
  assert core.stop_reason(0.7, 3, rule) is None
  assert core.stop_reason(0.7, 10, rule) == "step_limit"
  assert core.stop_reason(0.4, 10, rule) == "converged"
  with pytest.raises(FloatingPointError, match="not finite"):
    core.stop_reason(float("nan"), 4, rule)
  with pytest.raises(ValueError, match="max_steps=0"):
    core.ConvergenceRule(loss_threshold=0.5, max_steps=0)


def test_pgd_attack_on_a_linear_loss_matches_numpy(rng):
  # loss(x) = sum(w * x): every ascent step moves by alpha * sign(w), then projects.
  x = jax.random.uniform(jax.random.key(7), (2, 4, 4, 3))
  w = np.random.default_rng(0).normal(size=(2, 4, 4, 3)).astype(np.float32)
  x_init = _perturb(rng, x, eps=EPS)
  x_adv = jax.jit(
    lambda x, x0: core.pgd_attack(
      lambda xp: jnp.sum(w * xp), x, x0, eps=EPS, alpha=EPS / 3, steps=4
    )
  )(x, x_init)
  expected = np.asarray(x_init)
  for _ in range(4):
    expected = np.clip(expected + EPS / 3 * np.sign(w), np.asarray(x) - EPS, np.asarray(x) + EPS)
    expected = np.clip(expected, 0.0, 1.0)
  np.testing.assert_allclose(x_adv, expected, atol=1e-6)
  assert float(jnp.max(jnp.abs(x_adv - x))) <= EPS + 1e-6


def test_ot_attack_reports_sinkhorn_convergence(rng):
  features_fn = _toy_features_fn()
  x = jax.random.uniform(jax.random.key(8), (4, 4, 4, 3))
  config = core.SinkhornConfig(max_iterations=30, min_iterations=30)
  _, aux = jax.jit(
    lambda x, x0: core.ot_attack(
      features_fn, x, x0, eps=EPS, alpha=EPS, steps=1, sinkhorn_config=config
    )
  )(x, _perturb(rng, x, eps=EPS))
  assert int(aux["n_iters"]) == 30  # the fixed iteration count
  assert aux["converged"].dtype == jnp.bool_


@pytest.mark.parametrize("kwargs", [dict(steps=-1), dict(alpha=0.0), dict(eps=2.0)])
def test_pgd_attack_bad_arguments_raise(rng, kwargs):
  x = jnp.zeros((1, 2, 2, 1))
  args = dict(eps=EPS, alpha=EPS, steps=1) | kwargs
  with pytest.raises(ValueError, match=next(iter(kwargs))):
    core.pgd_attack(jnp.sum, x, x, **args)
