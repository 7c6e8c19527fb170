"""Config blocks every experiment shares: the header, the ResNets and the optimizers.

A value given to them as a `(full, demo, smoke)` tuple is picked by size; any other value is
used at every size. Blocks of several sized fields are `size.table`s (configs/sizes.py).
"""

import ml_collections

from configs import sizes


def by_size(size, value):
  """`value` itself, or its entry for `size` when it is a `(full, demo, smoke)` tuple."""
  if isinstance(value, tuple) and len(value) == 3:
    return sizes.pick(size, full=value[0], demo=value[1], smoke=value[2])
  return value


def new_config(experiment, size, num_seeds=None):
  """A new config holding the fields every experiment starts with.

  Args:
    experiment: the experiment's name (`config.experiment`).
    size: one of `sizes.SIZES`.
    num_seeds: seeds to run, an int or a `(full, demo, smoke)` tuple; None leaves
      `config.num_seeds` unset.

  Returns:
    A `ConfigDict` with `experiment`, `seed` (0) and, when given, `num_seeds`.
  """
  config = ml_collections.ConfigDict()
  config.experiment = experiment
  config.seed = 0
  if num_seeds is not None:
    config.num_seeds = by_size(size, num_seeds)
  return config


def digits_resnet():
  """The small ResNet of the embedded-digits configs: 3 stages of 1 block, widths 16/32/64.

  `backbone` ('small', 'resnet18' or 'resnet50'; the named ones ignore `stage_sizes`, `widths`
  and `stem_strides`) and `dtype` ('float32' or 'bfloat16') are read by
  `research.models.resnet`, as in every config's `model` block.
  """
  return dict(
    backbone="small",
    dtype="float32",
    stage_sizes=(1, 1, 1),
    widths=(16, 32, 64),
    embedding_dim=32,
    stem_strides=1,
  )


def cifar_resnet():
  """The ResNet of the CIFAR-10 variants of the digits configs: 3 stages of 2 blocks."""
  return dict(digits_resnet(), stage_sizes=(2, 2, 2), widths=(32, 64, 128), embedding_dim=64)


def adam(size, learning_rate=3e-3, warmup_steps=20, schedule="cosine"):
  """Adam with a warmed-up cosine (or constant) schedule and no weight decay."""
  return dict(
    name="adam",
    learning_rate=by_size(size, learning_rate),
    schedule=schedule,
    warmup_steps=by_size(size, warmup_steps),
    weight_decay=0.0,
    momentum=0.9,
  )


def sgd(size, learning_rate, warmup_steps, weight_decay, momentum=0.9, schedule="cosine"):
  """SGD with Nesterov momentum, L2 weight decay on kernels and a warmed-up schedule."""
  return dict(
    name="sgd",
    learning_rate=by_size(size, learning_rate),
    schedule=schedule,
    warmup_steps=by_size(size, warmup_steps),
    weight_decay=weight_decay,
    momentum=momentum,
  )
