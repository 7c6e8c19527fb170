"""Baseline: ResNet classifier on the embedded digits. Args: None (full), 'demo' or 'smoke'."""

from configs import common, sizes


def get_config(arg=None):
  size = sizes.parse(arg)
  config = common.new_config("supervised_classification", size)
  config.data = dict(name="digits", data_dir="", imbalance_ratio=1.0)
  config.model = common.digits_resnet()
  config.optim = common.adam(size)
  config.train = common.train(
    size,
    steps=(1500, 300, 4),
    batch_size=(64, 64, 16),
    eval_batch_size=(256, 256, 64),
    log_every=(100, 50, 2),
    checkpoint_every=(500, 100, 2),
  )
  return config
