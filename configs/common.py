"""Config blocks every experiment shares: the optimizer and the `train` block.

A value given as a `(full, demo, smoke)` tuple is picked by size; any other value is used at
every size.
"""

from configs import sizes


def by_size(size, value):
  """`value` itself, or its entry for `size` when it is a `(full, demo, smoke)` tuple."""
  if isinstance(value, tuple) and len(value) == 3:
    return sizes.pick(size, full=value[0], demo=value[1], smoke=value[2])
  return value


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


def train(size, *, batch_size, eval_batch_size, log_every, checkpoint_every, **fields):
  """The `train` block: batch sizes, logging, checkpointing, plus experiment-specific fields."""
  block = dict(
    batch_size=batch_size,
    eval_batch_size=eval_batch_size,
    log_every=log_every,
    checkpoint_every=checkpoint_every,
    **fields,
  )
  return {name: by_size(size, value) for name, value in block.items()}
