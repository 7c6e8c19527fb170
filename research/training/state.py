"""Train state and optimizer construction."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from research import config_checks


@flax.struct.dataclass
class TrainState:
  """Everything a step updates; a pytree, so it checkpoints and shards as one.

  Attributes:
    step: int32 scalar, the number of updates applied.
    params: model parameters.
    opt_state: optimizer state.
    nonfinite_step: int32 scalar, the first step whose loss, gradients or updated parameters
      were not finite (-1 if none).
  """

  step: jnp.ndarray
  params: Any
  opt_state: Any
  nonfinite_step: jnp.ndarray


def create_train_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
  """A fresh state at step 0 for `params`."""
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    nonfinite_step=jnp.full((), -1, jnp.int32),
  )


def make_optimizer(config: Any, total_steps: int) -> optax.GradientTransformation:
  """Optimizer from `config` (fields: name, learning_rate, momentum, weight_decay, schedule).

  Args:
    config: ConfigDict with `name` in {sgd, adam, adamw}, `learning_rate` > 0, `schedule` in
      {constant, cosine}, `warmup_steps` >= 0, `momentum` (sgd) and `weight_decay` (decoupled
      for adamw, L2-coupled via `add_decayed_weights` for sgd).
    total_steps: length of the cosine schedule.

  Returns:
    an optax transformation.
  """
  name = config_checks.check_choice(config, "name", ("sgd", "adam", "adamw"))
  lr = config_checks.check_float(config, "learning_rate", 0.0, exclusive_minimum=True)
  schedule_name = config_checks.check_choice(config, "schedule", ("constant", "cosine"))
  warmup = config_checks.check_int(config, "warmup_steps", 0)
  wd = config_checks.check_float(config, "weight_decay", 0.0)
  if schedule_name == "cosine":
    schedule = optax.warmup_cosine_decay_schedule(
      0.0, lr, warmup, max(total_steps, warmup + 1), end_value=0.0
    )
  else:
    schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)], [warmup]
    )
  if name == "sgd":
    momentum = config_checks.check_float(config, "momentum", 0.0, 1.0)
    return optax.chain(
      optax.add_decayed_weights(wd, mask=_kernels_only),
      optax.sgd(schedule, momentum=momentum or None, nesterov=momentum > 0),
    )
  if name == "adamw":
    return optax.adamw(schedule, weight_decay=wd, mask=_kernels_only)
  return optax.adam(schedule)


def _kernels_only(params: Any) -> Any:
  """Weight-decay mask: kernels (ndim > 1) only, not biases or norm scales."""
  return jax.tree.map(lambda p: p.ndim > 1, params)
