"""The supervised training phase and evaluation that both baselines (and their users) share."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from research.training import fit, parallel, predict, state, steps


def fit_supervised(
  config: ml_collections.ConfigDict,
  run: fit.Run,
  model: nn.Module,
  loss_fn: Callable,
  train: dict[str, np.ndarray],
  sampler: Any,
  keys: Sequence[str],
  *,
  name: str = "train",
) -> fit.FitResult:
  """One `fit` phase of `model` under `loss_fn` with `config.optim` and `config.train`.

  Args:
    config: needs `seed` (initial parameters, then `fold_in(key, 1)` for the loop), `optim`
      and `train` (steps, batch_size, log_every, checkpoint_every).
    run: the run context.
    model: the Flax module.
    loss_fn: `loss_fn(params, batch, rng, *, model) -> (loss, metrics)` (e.g.
      `steps.classification_loss`).
    train: the training split, {feature: [N, ...]}.
    sampler: index sampler of the batches (`research.data.samplers`).
    keys: features of a training batch.
    name: the phase name; checkpoints in `<workdir>/<name>_checkpoints`.

  Returns:
    the phase's `FitResult`.
  """
  parallel.check_batch_divisible(config.train.batch_size, run.mesh, "train.batch_size")
  rng = jax.random.key(config.seed)
  tx = state.make_optimizer(config.optim, config.train.steps)
  step = parallel.compile_train_step(
    functools.partial(steps.train_step, loss_fn=functools.partial(loss_fn, model=model), tx=tx),
    run.mesh,
  )
  return fit.fit(
    run,
    fit.Phase.from_train_config(name, config.train),
    params=fit.init_params(model, rng, train["image"][0]),
    tx=tx,
    step_fn=step,
    batch_fn=fit.sampled_batch_fn(train, sampler, run.mesh, keys),
    rng=jax.random.fold_in(rng, 1),
  )


def predict_confusion(
  eval_step: Callable,
  model: nn.Module,
  params: Any,
  arrays: dict[str, np.ndarray],
  num_classes: int,
  batch_size: int,
  run: fit.Run,
  keys: Sequence[str],
  collect: Sequence[str],
) -> predict.Predictions:
  """`predict` of `eval_step(params, batch, *, model, num_classes)` with a summed `confusion`."""
  parallel.check_batch_divisible(batch_size, run.mesh, "train.eval_batch_size")
  compiled = parallel.compile_eval_step(
    functools.partial(eval_step, model=model, num_classes=num_classes)
  )
  return predict.predict(
    compiled,
    params,
    arrays,
    batch_size=batch_size,
    mesh=run.mesh,
    keys=keys,
    collect=collect,
    sum_over_batches=("confusion",),
  )
