"""Baseline: ResNet classifier on the embedded digits. Args: None (full), 'demo' or 'smoke'."""

import ml_collections

from configs import common, sizes


def get_config(arg=None):
  size = sizes.parse(arg)
  config = ml_collections.ConfigDict()
  config.experiment = "supervised_classification"
  config.seed = 0
  config.data = dict(name="digits", data_dir="", imbalance_ratio=1.0)
  config.model = dict(stage_sizes=(1, 1, 1), widths=(16, 32, 64), embedding_dim=32, stem_strides=1)
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
