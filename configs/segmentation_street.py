"""Baseline: segmenter on the embedded street scenes. Args: None (full), 'demo' or 'smoke'."""

import ml_collections

from configs import sizes


def get_config(arg=None):
  size = sizes.parse(arg)
  config = ml_collections.ConfigDict()
  config.experiment = "supervised_segmentation"
  config.seed = 0
  config.data = dict(
    name="street_scenes",
    data_dir="",
    image_size=sizes.pick(size, full=64, demo=32, smoke=32),
    train_per_domain=sizes.pick(size, full=400, demo=200, smoke=8),
    test_per_domain=sizes.pick(size, full=100, demo=50, smoke=8),
    train_domains=("day", "dusk", "fog"),
    heldout_domains=("night",),
  )
  config.model = dict(stage_sizes=(1, 1, 1), widths=(16, 32, 64), decoder_width=32)
  config.optim = dict(
    name="adam",
    learning_rate=3e-3,
    schedule="cosine",
    warmup_steps=20,
    weight_decay=0.0,
    momentum=0.9,
  )
  config.train = dict(
    steps=sizes.pick(size, full=2000, demo=300, smoke=3),
    batch_size=sizes.pick(size, full=32, demo=32, smoke=8),
    eval_batch_size=sizes.pick(size, full=64, demo=64, smoke=8),
    log_every=sizes.pick(size, full=100, demo=50, smoke=1),
    checkpoint_every=sizes.pick(size, full=500, demo=100, smoke=2),
  )
  return config
