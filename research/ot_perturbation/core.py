"""Pure functions of M5: optimal-transport-matched perturbation training.

METHODS.md M5 (seed 004, patent CN112215298A). The pieces, in the order of the patent steps:

- step 2: :func:`perturbed_images` (and :func:`candidate_perturbations`) build perturbed sets.
- step 4: :func:`cost_matrix` and :func:`feature_matching_distance`, the entropic-OT feature
  matching distance ``D = <P*, C>`` between the standard and the perturbed vector sets.
- step 5: :func:`ot_attack` (signed ascent on ``D``, the default) and
  :func:`best_of_candidates` (the option) build the target perturbed set.
- step 6: :func:`combined_loss`, ``loss1 + loss2``.
- step 7: :func:`converged`, :class:`ConvergenceRule` and :func:`stop_reason`.

Everything that runs per step is jit-compatible with fixed shapes; config-like arguments are
validated up front (outside jit) with one ``ValueError``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ott.geometry import costs, geometry
from ott.problems.linear import linear_problem
from ott.solvers.linear import sinkhorn

from research import field_checks

PERTURBATION_KINDS = ("uniform", "gaussian", "photometric")
COST_KINDS = ("cosine", "sqeuclidean")
RELATIVE_EPSILON_KINDS = (None, "mean")

Array = jax.Array
FeaturesFn = Callable[[Array], Array]
TaskLossFn = Callable[[Any, Array, Any], tuple[Array, Mapping[str, Array]]]


# --------------------------------------------------------------------------------------------
# Validation helpers (host side).


def _is_concrete_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_in_range(name: str, value: Any, low: float, high: float, allowed: str) -> None:
  """Raises if a concrete number lies outside ``[low, high]``; traced values are not checked."""
  if _is_concrete_number(value) and not (low <= value <= high and math.isfinite(value)):
    raise ValueError(f"{name}={value} is not allowed: {name} must be {allowed}")


def _check_positive(name: str, value: Any) -> None:
  if _is_concrete_number(value) and not (value > 0 and math.isfinite(value)):
    raise ValueError(f"{name}={value} is not allowed: {name} must be a finite number > 0")


def _check_choice(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
  if value not in allowed:
    raise ValueError(f"{name}={value!r} is not allowed: {name} must be one of {allowed}")


def _check_image_set(name: str, x: Array) -> None:
  if x.ndim != 4:
    raise ValueError(f"{name} has shape {x.shape}: it must be an image batch [B, H, W, C]")
  if x.shape[0] == 0:
    raise ValueError(f"{name} has shape {x.shape}: the image set is empty (B=0)")


def _check_feature_set(name: str, f: Array) -> None:
  if f.ndim != 2:
    raise ValueError(f"{name} has shape {f.shape}: it must be a vector set [N, D]")
  if f.shape[0] == 0:
    raise ValueError(f"{name} has shape {f.shape}: the vector set is empty (N=0)")


def check_finite(name: str, value: Any) -> None:
  """Host-side check that an array (features, costs, a distance) has only finite entries.

  Use outside jit, e.g. on ``aux['finite']``'s inputs or on fetched features; inside jit use
  the ``finite`` flag returned by :func:`feature_matching_distance`.

  Args:
    name: what the array is, for the message.
    value: array of any shape.

  Raises:
    ValueError: naming the array and how many of its entries are NaN or infinite.
  """
  arr = np.asarray(value)
  bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
  if bad:
    raise ValueError(
      f"{name} has {bad} non-finite entries out of {arr.size}: features and costs must be "
      "finite (check the model output and the perturbation radius)"
    )


# --------------------------------------------------------------------------------------------
# Step 2: perturbed image sets.


def _project(x_clean: Array, x_pert: Array, eps: float | Array) -> Array:
  """Projection onto the L-inf ball of radius ``eps`` around ``x_clean``, then onto [0, 1]."""
  return jnp.clip(jnp.clip(x_pert, x_clean - eps, x_clean + eps), 0.0, 1.0)


def perturbed_images(
  rng: Array, x: Array, *, kind: str = "uniform", eps: float | Array = 8.0 / 255.0
) -> Array:
  """Perturbed image set of METHODS.md M5 step 2.

  Kinds (the patent's "determine the perturbed image set corresponding to the sample set"):

  - ``'uniform'`` (default): random start ``x + U(-eps, eps)`` per pixel and channel.
  - ``'gaussian'``: ``x + eps * N(0, 1)``, then projected onto the eps ball.
  - ``'photometric'``: per-image brightness shift ``b ~ U(-eps, eps)`` and contrast factor
    ``1 + c, c ~ U(-eps, eps)`` about the image mean, ``m + (1 + c) (x - m) + b``, then
    projected onto the eps ball (so the eps bound holds for every kind).

  Every kind is clipped to [0, 1] at the end.

  Args:
    rng: PRNG key.
    x: clean images ``[B, H, W, C]`` in [0, 1].
    kind: one of ``PERTURBATION_KINDS``.
    eps: L-inf radius in the [0, 1] image scale (e.g. 8/255), >= 0.

  Returns:
    Perturbed images ``[B, H, W, C]`` with ``|x' - x| <= eps`` and values in [0, 1].
  """
  _check_choice("kind", kind, PERTURBATION_KINDS)
  _check_in_range("eps", eps, 0.0, 1.0, "a number in [0, 1]")
  _check_image_set("x", x)
  if kind == "uniform":
    noise = jax.random.uniform(rng, x.shape, x.dtype, minval=-eps, maxval=eps)
    x_pert = x + noise
  elif kind == "gaussian":
    x_pert = x + eps * jax.random.normal(rng, x.shape, x.dtype)
  else:
    b_key, c_key = jax.random.split(rng)
    per_image = (x.shape[0], 1, 1, 1)
    brightness = jax.random.uniform(b_key, per_image, x.dtype, minval=-eps, maxval=eps)
    contrast = jax.random.uniform(c_key, per_image, x.dtype, minval=-eps, maxval=eps)
    mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
    x_pert = mean + (1.0 + contrast) * (x - mean) + brightness
  return _project(x, x_pert, eps)


def candidate_perturbations(
  rng: Array, x: Array, num_candidates: int, *, kind: str = "uniform", eps: float = 8.0 / 255.0
) -> Array:
  """``num_candidates`` independent perturbed sets for :func:`best_of_candidates`.

  Args:
    rng: PRNG key.
    x: clean images ``[B, H, W, C]`` in [0, 1].
    num_candidates: number of candidate sets, >= 1.
    kind: perturbation kind, see :func:`perturbed_images`.
    eps: L-inf radius.

  Returns:
    Candidates ``[num_candidates, B, H, W, C]``.
  """
  if not isinstance(num_candidates, int) or num_candidates < 1:
    raise ValueError(
      f"num_candidates={num_candidates} is not allowed: num_candidates must be an int >= 1"
    )
  keys = jax.random.split(rng, num_candidates)
  return jax.vmap(lambda k: perturbed_images(k, x, kind=kind, eps=eps))(keys)


# --------------------------------------------------------------------------------------------
# Step 4: cost matrix, optimal transport plan and feature matching distance.


def _cost_fn(kind: str) -> costs.CostFn:
  _check_choice("cost", kind, COST_KINDS)
  return costs.Cosine() if kind == "cosine" else costs.SqEuclidean()


def cost_matrix(f: Array, g: Array, kind: str = "cosine") -> Array:
  """Transport cost matrix ``C_ij = c(f_i, g_j)`` of METHODS.md M5 step 4.

  ``'cosine'``: ``1 - <f_i, g_j> / (|f_i| |g_j| + 1e-8)`` (ott's ``costs.Cosine``, range
  [0, 2]); ``'sqeuclidean'``: ``|f_i - g_j|^2``. This is exactly the matrix the ott geometry in
  :func:`feature_matching_distance` uses. Note: the cosine gradient is NaN at an all-zero
  feature vector (the norm is not differentiable there).

  Args:
    f: standard vector set ``[N, D]``.
    g: perturbed vector set ``[M, D]``.
    kind: one of ``COST_KINDS``.

  Returns:
    ``[N, M]`` cost matrix.
  """
  cost_fn = _cost_fn(kind)
  _check_feature_set("f", f)
  _check_feature_set("g", g)
  return cost_fn.all_pairs(f, g)


@dataclasses.dataclass(frozen=True)
class SinkhornConfig:
  """Entropic-OT settings for :func:`feature_matching_distance` (METHODS.md M5 step 4).

  Attributes:
    epsilon: entropic regularisation; absolute when ``relative_epsilon is None``, otherwise a
      multiplier of the mean cost (``epsilon * mean(C)``, the mean held constant under
      differentiation, as ott's ``relative_epsilon='mean'`` does). Relative is the default so
      the regularisation follows the scale of the features: an absolute epsilon far above the
      costs gives a uniform plan, one far below them stalls or NaNs in float32.
    cost: one of ``COST_KINDS``; cosine distance is the METHODS.md default.
    relative_epsilon: ``'mean'`` or ``None`` (absolute).
    min_epsilon: floor on the effective relative epsilon, so a degenerate all-zero cost matrix
      (identical features) does not divide by zero; far below any meaningful cost scale.
    max_iterations: Sinkhorn iteration cap; a multiple of ``inner_iterations``.
    min_iterations: Sinkhorn runs at least this many iterations; set it equal to
      ``max_iterations`` for a fixed iteration count (e.g. under ``vmap``, where the batch
      otherwise runs until its slowest member converges).
    inner_iterations: iterations between two convergence checks.
    threshold: marginal-error tolerance of ott's convergence test.
  """

  epsilon: float = 0.05
  cost: str = "cosine"
  relative_epsilon: str | None = "mean"
  min_epsilon: float = 1e-12
  max_iterations: int = 200
  min_iterations: int = 0
  inner_iterations: int = 10
  threshold: float = 1e-3

  def __post_init__(self):
    """Validates every field with one clear ``ValueError``."""
    _check_positive("epsilon", self.epsilon)
    _check_choice("cost", self.cost, COST_KINDS)
    _check_choice("relative_epsilon", self.relative_epsilon, RELATIVE_EPSILON_KINDS)
    _check_in_range("min_epsilon", self.min_epsilon, 0.0, math.inf, "a finite number >= 0")
    _check_positive("threshold", self.threshold)
    field_checks.check_positive_int_fields(self, ("max_iterations", "inner_iterations"))
    if self.max_iterations % self.inner_iterations:
      raise ValueError(
        f"max_iterations={self.max_iterations} is not allowed: max_iterations must be a "
        f"multiple of inner_iterations={self.inner_iterations}"
      )
    if not isinstance(self.min_iterations, int) or not (
      0 <= self.min_iterations <= self.max_iterations
    ):
      raise ValueError(
        f"min_iterations={self.min_iterations} is not allowed: min_iterations must be an int "
        f"in [0, max_iterations={self.max_iterations}]"
      )


def _fixed_count_potentials(costs_: Array, epsilon: Array, iterations: int) -> tuple[Array, Array]:
  """Potentials after each of ``iterations`` log-domain Sinkhorn iterations, from zero.

  Uniform marginals ``a = 1/N``, ``b = 1/M``. Each iteration updates ``g`` then ``f``, as
  ott's ``Sinkhorn.lse_step`` does (same potentials, same plan):
  ``g_j = eps log b_j - eps LSE_i((f_i - C_ij) / eps)``,
  ``f_i = eps log a_i - eps LSE_j((g_j - C_ij) / eps)``.

  Args:
    costs_: ``[N, M]`` cost matrix.
    epsilon: scalar entropic regularisation.
    iterations: static number of iterations, >= 1.

  Returns:
    ``f_history [iterations, N]`` and ``g_history [iterations, M]``: the potentials after
    every iteration (the last rows are the final ones).
  """
  n, m = costs_.shape
  log_a, log_b = -np.log(n), -np.log(m)

  def iteration(f, _):
    g = epsilon * log_b - epsilon * jax.nn.logsumexp((f[:, None] - costs_) / epsilon, axis=0)
    f = epsilon * log_a - epsilon * jax.nn.logsumexp((g[None, :] - costs_) / epsilon, axis=1)
    return f, (f, g)

  _, (f_history, g_history) = jax.lax.scan(
    iteration, jnp.zeros(n, costs_.dtype), None, length=iterations
  )
  return f_history, g_history


def _plan(f: Array, g: Array, costs_: Array, epsilon: Array) -> Array:
  """``exp((f_i + g_j - C_ij) / eps)`` ``[N, M]``."""
  return jnp.exp((f[:, None] + g[None, :] - costs_) / epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fixed_count_distance(
  costs_: Array, epsilon: Array, iterations: int
) -> tuple[Array, Array, Array]:
  """``<P, C>`` after exactly ``iterations`` Sinkhorn iterations, with a written-out backward.

  Returns ``(D, f [N], g [M])``; the potentials are for reporting only (their cotangents are
  ignored: pass them through ``stop_gradient``).

  The backward pass is the exact reverse-mode derivative of the iterations of
  :func:`_fixed_count_potentials` with respect to ``C`` (what ``jax.grad`` through them gives,
  to float rounding), written out so that each iteration costs two passes over ``[N, M]``
  that recompute its softmax weights from the stored potentials: no ``[N, M]`` residual per
  iteration. ``epsilon`` gets no gradient (it is a constant or held constant).
  """
  return _fixed_count_forward(costs_, epsilon, iterations)[0]


def _fixed_count_forward(costs_, epsilon, iterations):
  f_history, g_history = _fixed_count_potentials(costs_, epsilon, iterations)
  plan = _plan(f_history[-1], g_history[-1], costs_, epsilon)
  outputs = (jnp.sum(plan * costs_), f_history[-1], g_history[-1])
  return outputs, (costs_, epsilon, f_history, g_history, plan)


def _fixed_count_backward(iterations, residuals, cotangents):
  """Reverse pass through the iterations, last to first.

  With ``S_ij = N exp((f_i + g_j - C_ij) / eps)`` (the softmax weights of an ``f`` update)
  and ``T_ij = M exp((f'_i + g_j - C_ij) / eps)`` (those of the ``g`` update before it, ``f'``
  the previous ``f``): ``dg_j -= sum_i df_i S_ij`` and ``dC += df S``; then
  ``df'_i = -sum_j dg_j T_ij`` and ``dC += dg T``.
  """
  del iterations
  d_distance = cotangents[0]
  costs_, epsilon, f_history, g_history, plan = residuals
  n, m = costs_.shape
  weighted = plan * costs_
  d_costs = d_distance * (plan - weighted / epsilon)
  df = d_distance * jnp.sum(weighted, axis=1) / epsilon
  dg = d_distance * jnp.sum(weighted, axis=0) / epsilon  # only the last g reaches D directly
  f_before = jnp.concatenate([jnp.zeros((1, n), costs_.dtype), f_history[:-1]])

  def reverse_iteration(carry, potentials):
    df, dg, d_costs = carry
    f, g, f_previous = potentials
    s_weights = n * _plan(f, g, costs_, epsilon)
    dg = dg - jnp.sum(df[:, None] * s_weights, axis=0)
    d_costs = d_costs + df[:, None] * s_weights
    t_weights = m * _plan(f_previous, g, costs_, epsilon)
    df = -jnp.sum(dg[None, :] * t_weights, axis=1)
    d_costs = d_costs + dg[None, :] * t_weights
    return (df, jnp.zeros_like(dg), d_costs), None

  (_, _, d_costs), _ = jax.lax.scan(
    reverse_iteration, (df, dg, d_costs), (f_history, g_history, f_before), reverse=True
  )
  return d_costs, None


_fixed_count_distance.defvjp(_fixed_count_forward, _fixed_count_backward)


def _ott_sinkhorn(
  costs_: Array, epsilon: Array, config: SinkhornConfig, marginal: Array | None = None
) -> Any:
  """Runs ott's convergence-tested ``Sinkhorn`` on the precomputed ``[N, M]`` cost matrix.

  A ``Geometry`` on the cost matrix itself: a PointCloud geometry would recompute it, and its
  gradient, in every iteration.

  Args:
    costs_: ``[N, M]`` transport costs.
    epsilon: entropic regularisation (absolute).
    config: the threshold and iteration counts of the solver.
    marginal: optional ``[N]`` weights used as both marginals (``N == M``); None: uniform.

  Returns:
    ott's ``SinkhornOutput`` (``matrix``, ``converged``, ``n_iters``, ``errors``, ...).
  """
  geom = geometry.Geometry(cost_matrix=costs_, epsilon=epsilon)
  solver = sinkhorn.Sinkhorn(
    threshold=config.threshold,
    inner_iterations=config.inner_iterations,
    min_iterations=config.min_iterations,
    max_iterations=config.max_iterations,
    implicit_diff=None,
  )
  return solver(linear_problem.LinearProblem(geom, a=marginal, b=marginal))


def _weighted_distance(
  costs_: Array, epsilon: Array, weights: Array, config: SinkhornConfig
) -> tuple[Array, Array, Array, Array, Array]:
  """``<P, C>`` between the marginals ``a = b = weights / sum(weights)``; zero weights allowed.

  ``weights [N]`` must have at least one positive entry (the caller's job; inside jit it
  cannot be checked).

  A row (column) of zero weight gets no transport mass: it is left out of every log-sum-exp
  and its plan row (column) is exactly 0, so it changes neither the plan of the other rows nor
  any gradient (padding rows of a last batch, METHODS.md M5). Fixed count
  (``min_iterations == max_iterations``): exactly ``max_iterations`` log-domain iterations
  (``g`` then ``f``, as :func:`_fixed_count_potentials`) differentiated by autodiff through
  them; the potentials of zero-weight entries stay finite, so no ``-inf`` reaches a gradient.
  Otherwise: ott's convergence-tested ``Sinkhorn`` on ``LinearProblem(geom, a, b)``.

  Returns:
    ``(D, plan [N, M], converged, n_iters, errors [checks, 1])``.
  """
  n, m = costs_.shape
  valid = weights > 0
  marginal = jnp.where(valid, weights, 0.0) / jnp.sum(jnp.where(valid, weights, 0.0))
  if config.min_iterations != config.max_iterations:
    out = _ott_sinkhorn(costs_, epsilon, config, marginal=marginal)
    return jnp.sum(out.matrix * costs_), out.matrix, out.converged, out.n_iters, out.errors
  log_w = jnp.log(jnp.where(valid, marginal, 1.0))

  def iteration(potentials, _):
    f, _ = potentials
    g = epsilon * log_w - epsilon * jax.nn.logsumexp(
      jnp.where(valid[:, None], (f[:, None] - costs_) / epsilon, -jnp.inf), axis=0
    )
    f = epsilon * log_w - epsilon * jax.nn.logsumexp(
      jnp.where(valid[None, :], (g[None, :] - costs_) / epsilon, -jnp.inf), axis=1
    )
    return (f, g), None

  zeros = jnp.zeros(n, costs_.dtype)
  (f, g), _ = jax.lax.scan(iteration, (zeros, zeros), None, length=config.max_iterations)
  plan = jnp.where(valid[:, None] & valid[None, :], _plan(f, g, costs_, epsilon), 0.0)
  error = jnp.sum(jnp.abs(jnp.sum(jax.lax.stop_gradient(plan), axis=0) - marginal))
  return (
    jnp.sum(plan * costs_),
    plan,
    error < config.threshold,
    jnp.asarray(config.max_iterations),
    error[None, None],
  )


def feature_matching_distance(
  f: Array,
  g: Array,
  config: SinkhornConfig | None = None,
  *,
  weights: Array | None = None,
  **overrides: Any,
) -> tuple[Array, dict[str, Array]]:
  """Feature matching distance ``D = <P*, C>`` of METHODS.md M5 step 4.

  ``C = cost_matrix(f, g)``; ``P*`` is the entropic optimal transport plan between the uniform
  measures on ``f`` and ``g`` (log-domain Sinkhorn). ``D`` is the transport cost of that plan,
  ``sum(P* * C)`` — not ott's ``reg_ot_cost``, which adds the entropic term. POT's
  ``ot.sinkhorn2`` returns the same quantity.

  Two solvers, one per iteration mode, both differentiated by unrolling (``jax.grad``
  differentiates the iterations actually run, so the gradient is exact for the computed ``D``
  even before convergence, and needs no linear solve: balanced implicit systems are
  ill-conditioned):

  - a fixed count (``min_iterations == max_iterations``, what the experiment and ``vmap`` use):
    exactly ``max_iterations`` iterations of ott's update (``g`` then ``f``) under ``lax.scan``
    with a written-out backward pass (``_fixed_count_distance``), 5-8x faster on CPU than
    autodiff through ott's loop at N = 512 (``launch/bench_ot.py``). ``converged`` tests ott's
    marginal error of the last iterate against ``threshold``; ``errors`` holds that one error.
  - convergence-tested (otherwise): ott-jax ``Geometry`` on the precomputed ``C`` ->
    ``LinearProblem`` -> ``Sinkhorn`` with ``implicit_diff=None``, which checks the error every
    ``inner_iterations`` and stores the potentials there for the backward pass.

  With ``relative_epsilon='mean'`` the epsilon scale is held constant (``stop_gradient``), as
  in ott. The returned ``plan`` carries a gradient only in the convergence-tested mode.

  Args:
    f: standard vector set ``[N, D]`` (features of the clean images).
    g: perturbed vector set ``[M, D]`` (features of the perturbed images).
    config: :class:`SinkhornConfig`; ``None`` uses the defaults.
    weights: optional ``[N]`` non-negative transport weights of both sets (``N = M``; row
      ``i`` of ``f`` and of ``g`` are one image), at least one positive: the marginals become
      ``weights / sum(weights)`` instead of uniform, and a zero-weight row (a padding row of a
      last batch) takes no part in the problem (:func:`_weighted_distance`).
    **overrides: fields of :class:`SinkhornConfig` to replace, e.g. ``epsilon=0.1``.

  Returns:
    ``(D, aux)``: ``D`` a scalar; ``aux`` holds ``plan [N, M]``, ``cost_matrix [N, M]``,
    ``epsilon`` (effective, absolute), ``converged`` (bool), ``n_iters`` (int), ``errors``
    (the marginal errors per check, ``[checks, 1]``) and ``finite`` (bool: features, costs
    and ``D`` are all finite — check it inside jit; outside use :func:`check_finite`).
  """
  config = dataclasses.replace(config or SinkhornConfig(), **overrides)
  _check_feature_set("f", f)
  _check_feature_set("g", g)
  if f.shape[1] != g.shape[1]:
    raise ValueError(
      f"f has shape {f.shape} and g has shape {g.shape}: the feature dimensions must match"
    )
  if weights is not None and (jnp.shape(weights) != (f.shape[0],) or f.shape[0] != g.shape[0]):
    raise ValueError(
      f"weights has shape {jnp.shape(weights)}: it must be [N] with N = M (f {f.shape}, g "
      f"{g.shape})"
    )
  cost_fn = _cost_fn(config.cost)
  costs_ = cost_fn.all_pairs(f, g)  # The same matrix the geometry builds.
  epsilon = jnp.asarray(config.epsilon, dtype=jnp.result_type(f, g))
  if config.relative_epsilon == "mean":
    if weights is None:
      scale = jax.lax.stop_gradient(jnp.mean(costs_))
    else:  # the mean over the pairs of positive-weight rows (the product of the marginals)
      w = jnp.where(jnp.asarray(weights) > 0, jnp.asarray(weights, costs_.dtype), 0.0)
      scale = jax.lax.stop_gradient(w @ costs_ @ w / jnp.sum(w) ** 2)
    epsilon = jnp.maximum(epsilon * scale, config.min_epsilon)
  if weights is not None:
    distance, plan, converged, n_iters, errors = _weighted_distance(
      costs_, epsilon, jnp.asarray(weights, costs_.dtype), config
    )
  elif config.min_iterations == config.max_iterations:
    distance, f_last, g_last = _fixed_count_distance(costs_, epsilon, config.max_iterations)
    plan = _plan(*jax.lax.stop_gradient((f_last, g_last, costs_)), epsilon)
    error = jnp.sum(jnp.abs(jnp.sum(plan, axis=0) - 1.0 / costs_.shape[1]))  # ott's L1 error
    converged, n_iters, errors = error < config.threshold, config.max_iterations, error[None, None]
  else:
    out = _ott_sinkhorn(costs_, epsilon, config)
    plan = out.matrix
    distance = jnp.sum(plan * costs_)
    converged, n_iters, errors = out.converged, out.n_iters, out.errors
  finite = (
    jnp.all(jnp.isfinite(f))
    & jnp.all(jnp.isfinite(g))
    & jnp.all(jnp.isfinite(costs_))
    & jnp.isfinite(distance)
  )
  aux = {
    "plan": plan,
    "cost_matrix": costs_,
    "epsilon": epsilon,
    "converged": converged,
    "n_iters": jnp.asarray(n_iters, jnp.int32),
    "errors": errors,
    "finite": finite,
  }
  return distance, aux


# --------------------------------------------------------------------------------------------
# Step 5: target perturbed set.


def _feature_distance_to(
  features_fn: FeaturesFn, f_clean: Array, config: SinkhornConfig, weights: Array | None = None
) -> Callable[[Array], Array]:
  """``x' -> D(f_clean, features_fn(x'))``, the quantity the ascent maximises."""

  def distance(x_pert: Array) -> Array:
    return feature_matching_distance(f_clean, features_fn(x_pert), config, weights=weights)[0]

  return distance


def _check_ascent(x_clean: Array, x_init: Array, eps, alpha, steps) -> None:
  """Checks the arguments of a signed ascent (`ot_attack`, `pgd_attack`); raises ValueError."""
  _check_image_set("x_clean", x_clean)
  if x_init.shape != x_clean.shape:
    raise ValueError(
      f"x_init has shape {x_init.shape}: it must match x_clean's shape {x_clean.shape}"
    )
  _check_in_range("eps", eps, 0.0, 1.0, "a number in [0, 1]")
  _check_positive("alpha", alpha)
  if not isinstance(steps, int) or steps < 0:
    raise ValueError(f"steps={steps} is not allowed: steps must be an int >= 0")


def ot_attack(
  features_fn: FeaturesFn,
  x_clean: Array,
  x_init: Array,
  *,
  eps: float | Array,
  alpha: float | Array,
  steps: int,
  sinkhorn_config: SinkhornConfig | None = None,
  weights: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
  """Target perturbed set by signed ascent on ``D`` (METHODS.md M5 step 5, default).

  ``steps`` times: ``x' <- clip(Proj_eps(x' + alpha * sign(grad_{x'} D(F, f(x')))), 0, 1)``,
  with the standard vector set ``F = f(x_clean)`` held constant (``stop_gradient``).

  Args:
    features_fn: pure function ``images [B, H, W, C] -> features [B, D]`` (a closure over the
      model parameters, e.g. pooled backbone features).
    x_clean: clean images ``[B, H, W, C]`` in [0, 1].
    x_init: starting perturbed images ``[B, H, W, C]`` (e.g. :func:`perturbed_images`).
    eps: L-inf radius, >= 0.
    alpha: step size, > 0.
    steps: number of ascent steps, >= 0 (Python int; the loop is a ``scan``).
    sinkhorn_config: settings of :func:`feature_matching_distance`.
    weights: optional ``[B]`` transport weights (see :func:`feature_matching_distance`): a
      zero-weight image (a padding row) takes no part in ``D``, gets a zero gradient and so
      is not moved from its start.

  Returns:
    ``(x_target, aux)``: ``x_target [B, H, W, C]`` inside the eps ball and [0, 1]; ``aux``
    holds ``distances [steps + 1]`` (``D`` at every iterate, the starting one included; the
    last is the returned set's), ``finite`` (bool, every ``D`` finite) and the Sinkhorn
    ``converged`` flag and ``n_iters`` of the returned set's ``D``.
  """
  _check_ascent(x_clean, x_init, eps, alpha, steps)
  config = sinkhorn_config or SinkhornConfig()
  f_clean = jax.lax.stop_gradient(features_fn(x_clean))
  distance_and_grad = jax.value_and_grad(
    _feature_distance_to(features_fn, f_clean, config, weights)
  )

  def ascent_step(x_pert, _):
    distance, grad = distance_and_grad(x_pert)
    x_next = _project(x_clean, x_pert + alpha * jnp.sign(grad), eps)
    return x_next, distance

  x_start = _project(x_clean, x_init, eps)
  x_target, distances = jax.lax.scan(ascent_step, x_start, None, length=steps)
  final_distance, final_aux = feature_matching_distance(
    f_clean, features_fn(x_target), config, weights=weights
  )
  distances = jnp.concatenate([distances, final_distance[None]])
  return jax.lax.stop_gradient(x_target), {
    "distances": distances,
    "finite": jnp.all(jnp.isfinite(distances)) & final_aux["finite"],
    "converged": final_aux["converged"],
    "n_iters": final_aux["n_iters"],
  }


def best_of_candidates(
  features_fn: FeaturesFn,
  x_clean: Array,
  candidates: Array,
  *,
  sinkhorn_config: SinkhornConfig | None = None,
) -> tuple[Array, dict[str, Array]]:
  """Target perturbed set: the candidate with the largest ``D`` (METHODS.md M5 step 5, option).

  Candidates are scored one after another (``lax.map``), so memory is that of one set.

  Args:
    features_fn: pure function ``images [B, H, W, C] -> features [B, D]``.
    x_clean: clean images ``[B, H, W, C]``.
    candidates: ``[n, B, H, W, C]`` candidate perturbed sets (e.g.
      :func:`candidate_perturbations`).
    sinkhorn_config: settings of :func:`feature_matching_distance`.

  Returns:
    ``(x_target, aux)``: the chosen set ``[B, H, W, C]``; ``aux`` holds ``distances [n]``,
    ``index`` (the argmax) and ``finite``.
  """
  _check_image_set("x_clean", x_clean)
  if candidates.ndim != 5 or candidates.shape[1:] != x_clean.shape or candidates.shape[0] == 0:
    raise ValueError(
      f"candidates has shape {candidates.shape}: it must be [n >= 1, *x_clean.shape] with "
      f"x_clean.shape={x_clean.shape}"
    )
  config = sinkhorn_config or SinkhornConfig()
  f_clean = jax.lax.stop_gradient(features_fn(x_clean))
  distances = jax.lax.map(_feature_distance_to(features_fn, f_clean, config), candidates)
  # A NaN distance must never win the argmax.
  index = jnp.argmax(jnp.where(jnp.isfinite(distances), distances, -jnp.inf))
  return jax.lax.stop_gradient(candidates[index]), {
    "distances": distances,
    "index": index,
    "finite": jnp.all(jnp.isfinite(distances)),
  }


def pgd_attack(
  loss_fn: Callable[[Array], Array],
  x_clean: Array,
  x_init: Array,
  *,
  eps: float | Array,
  alpha: float | Array,
  steps: int,
) -> Array:
  """PGD on a task loss (Madry et al. 2018): the baseline attack and adversarial training.

  ``steps`` times ``x' <- clip(Proj_eps(x' + alpha * sign(grad_{x'} loss(x'))), 0, 1)``, the same
  update as :func:`ot_attack` but ascending the task (detection or classification) loss with the
  true labels instead of ``D``.

  Args:
    loss_fn: pure ``images [B, H, W, C] -> scalar loss`` (a closure over parameters, targets).
    x_clean: clean images ``[B, H, W, C]`` in [0, 1].
    x_init: start ``[B, H, W, C]`` (e.g. :func:`perturbed_images`, the uniform random start).
    eps: L-inf radius, in [0, 1].
    alpha: step size, > 0.
    steps: number of ascent steps, >= 0.

  Returns:
    Adversarial images ``[B, H, W, C]`` inside the eps ball and [0, 1] (no gradient).
  """
  _check_ascent(x_clean, x_init, eps, alpha, steps)
  grad_fn = jax.grad(loss_fn)

  def ascent_step(x_adv, _):
    return _project(x_clean, x_adv + alpha * jnp.sign(grad_fn(x_adv)), eps), None

  x_adv, _ = jax.lax.scan(ascent_step, _project(x_clean, x_init, eps), None, length=steps)
  return jax.lax.stop_gradient(x_adv)


# --------------------------------------------------------------------------------------------
# Step 6: training loss.


def combined_loss(
  task_loss_fn: TaskLossFn,
  params: Any,
  x_clean: Array,
  x_target: Array,
  targets: Any,
  *,
  perturbed_only: bool = False,
) -> tuple[Array, dict[str, Array]]:
  """Training loss of METHODS.md M5 step 6: ``loss1 + loss2``.

  ``loss1`` is the task (detection or classification) loss on the clean set, ``loss2`` the same
  loss on the target perturbed set with the clean labels / boxes. ``x_target`` is data: no
  gradient flows into it.

  Args:
    task_loss_fn: pure ``(params, images, targets) -> (loss, metrics)``, e.g. a closure that
      applies the detector and calls ``detection_loss``.
    params: model parameters (the argument to differentiate).
    x_clean: clean images ``[B, H, W, C]``.
    x_target: target perturbed images ``[B, H, W, C]``.
    targets: labels of the clean images, used for both sets.
    perturbed_only: train on ``loss2`` alone (``loss1`` is then not computed).

  Returns:
    ``(loss, metrics)``: metrics ``loss``, ``loss2`` (and ``loss1`` unless ``perturbed_only``)
    plus the task metrics prefixed ``clean/`` and ``perturbed/``.
  """
  x_target = jax.lax.stop_gradient(x_target)
  loss2, task_metrics2 = task_loss_fn(params, x_target, targets)
  metrics = {"loss2": loss2, **{f"perturbed/{k}": v for k, v in task_metrics2.items()}}
  if perturbed_only:
    loss = loss2
  else:
    loss1, task_metrics1 = task_loss_fn(params, x_clean, targets)
    metrics.update({"loss1": loss1, **{f"clean/{k}": v for k, v in task_metrics1.items()}})
    loss = loss1 + loss2
  metrics["loss"] = loss
  return loss, metrics


# --------------------------------------------------------------------------------------------
# Step 7: convergence.


def converged(loss: Array, threshold: float | Array) -> Array:
  """Convergence test of METHODS.md M5 step 7: target loss ``<= threshold`` (and finite).

  Args:
    loss: scalar target loss ``loss1 + loss2``.
    threshold: preset loss threshold.

  Returns:
    Boolean scalar; jit-compatible.
  """
  return jnp.isfinite(loss) & (loss <= threshold)


@dataclasses.dataclass(frozen=True)
class ConvergenceRule:
  """Stopping rule of METHODS.md M5 step 7.

  Attributes:
    loss_threshold: the preset loss threshold; loss at or below it means converged.
    max_steps: step limit, >= 1: training also stops after this many steps.
  """

  loss_threshold: float
  max_steps: int

  def __post_init__(self):
    """Validates the fields with one clear ``ValueError``."""
    if not _is_concrete_number(self.loss_threshold) or math.isnan(self.loss_threshold):
      raise ValueError(
        f"loss_threshold={self.loss_threshold} is not allowed: loss_threshold must be a number"
      )
    if not isinstance(self.max_steps, int) or self.max_steps < 1:
      raise ValueError(f"max_steps={self.max_steps} is not allowed: max_steps must be an int >= 1")


def stop_reason(loss: Any, step: int, rule: ConvergenceRule) -> str | None:
  """Host-side decision after a training step (METHODS.md M5 step 7).

  Args:
    loss: the target loss of the step just taken (scalar, fetched to host).
    step: number of training steps taken so far (1 after the first step).
    rule: the :class:`ConvergenceRule`.

  Returns:
    ``'converged'`` when ``loss <= rule.loss_threshold`` (store the model), ``'step_limit'``
    when ``step >= rule.max_steps`` without convergence, else ``None`` (go back to step 6 and
    regenerate the target set).

  Raises:
    FloatingPointError: when the loss is NaN or infinite.
  """
  value = float(loss)
  if not math.isfinite(value):
    raise FloatingPointError(
      f"loss={value} at step {step} is not finite: training stopped (keep the last good checkpoint)"
    )
  if value <= rule.loss_threshold:
    return "converged"
  if step >= rule.max_steps:
    return "step_limit"
  return None
