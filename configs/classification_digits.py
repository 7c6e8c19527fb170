"""Baseline: ResNet classifier on the embedded digits. Args: None (full), 'demo' or 'smoke'."""

import ml_collections

from configs import sizes


def get_config(arg=None):
  size = sizes.parse(arg)
  config = ml_collections.ConfigDict()
  config.experiment = "supervised_classification"
  config.seed = 0
  config.data = dict(name="digits", data_dir="", imbalance_ratio=1.0)
  config.model = dict(stage_sizes=(1, 1, 1), widths=(16, 32, 64), embedding_dim=32, stem_strides=1)
  config.optim = dict(
    name="adam",
    learning_rate=3e-3,
    schedule="cosine",
    warmup_steps=20,
    weight_decay=0.0,
    momentum=0.9,
  )
  config.train = dict(
    steps=sizes.pick(size, full=1500, demo=300, smoke=4),
    batch_size=sizes.pick(size, full=64, demo=64, smoke=16),
    eval_batch_size=sizes.pick(size, full=256, demo=256, smoke=64),
    log_every=sizes.pick(size, full=100, demo=50, smoke=2),
    checkpoint_every=sizes.pick(size, full=500, demo=100, smoke=2),
  )
  return config
