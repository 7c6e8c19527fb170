"""Baseline: segmenter on the embedded street scenes. Args: None (full), 'demo' or 'smoke'."""

from configs import common, sizes


def get_config(arg=None):
  size = sizes.parse(arg)
  config = common.new_config("supervised_segmentation", size)
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
  config.optim = common.adam(size)
  config.train = common.train(
    size,
    steps=(2000, 300, 3),
    batch_size=(32, 32, 8),
    eval_batch_size=(64, 64, 8),
    log_every=(100, 50, 1),
    checkpoint_every=(500, 100, 2),
  )
  return config
