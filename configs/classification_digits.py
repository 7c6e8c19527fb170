"""Baseline: ResNet classifier on the embedded digits. Args: None (full), 'demo' or 'smoke'."""

from configs import common, sizes


def get_config(arg=None):
  size = sizes.parse(arg)
  config = common.new_config("supervised_classification", size)
  config.data = dict(name="digits", data_dir="", imbalance_ratio=1.0)
  config.train = size.table(
    full=dict(steps=1500, batch_size=64, eval_batch_size=256, log_every=100, checkpoint_every=500),
    demo=dict(steps=300, batch_size=64, eval_batch_size=256, log_every=50, checkpoint_every=100),
    smoke=dict(steps=4, batch_size=16, eval_batch_size=64, log_every=2, checkpoint_every=2),
  )
  config.model = common.digits_resnet()
  config.optim = common.adam(size)
  return config
