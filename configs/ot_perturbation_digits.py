"""M5, classification variant on the embedded digits. Args: None (full), 'demo' or 'smoke'."""

from configs import common, ot_perturbation_street, sizes


def get_config(arg=None):
  size = sizes.parse(arg)
  config = ot_perturbation_street.method_config(
    "classification", (3, 1, 1), eps=0.1, alpha=(0.05, 0.1, 0.1), ascent_steps=(2, 1, 1), size=size
  )
  config.data = dict(
    name="digits",
    data_dir="",
    imbalance_ratio=1.0,
    max_test_examples=size.pick(full=500, demo=256, smoke=16),
  )
  config.train = size.table(
    full=dict(steps=1500, batch_size=64, eval_batch_size=256, log_every=100, checkpoint_every=500),
    demo=dict(steps=150, batch_size=32, eval_batch_size=128, log_every=25, checkpoint_every=75),
    smoke=dict(steps=2, batch_size=8, eval_batch_size=8, log_every=1, checkpoint_every=2),
  )
  config.model = common.digits_resnet()
  config.optim = common.adam(size, warmup_steps=(20, 10, 0))
  config.attack = size.table(
    alpha=config.ot.alpha,
    full=dict(steps=10, ot_group_size=64),
    demo=dict(steps=5, ot_group_size=32),
    smoke=dict(steps=1, ot_group_size=8),
  )
  config.eval = dict(top_k=1)
  config.train.loss_threshold = 0.02  # step 7, as in configs/ot_perturbation_street.py
  config.train.convergence_batch_size = size.pick(full=128, demo=64, smoke=8)
  return config
