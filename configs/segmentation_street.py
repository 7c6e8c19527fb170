"""Baseline: segmenter on the embedded street scenes. Args: None (full), 'demo' or 'smoke'."""

from configs import common, sizes


def get_config(arg=None):
  size = sizes.parse(arg)
  config = common.new_config("supervised_segmentation", size)
  config.data = size.table(
    name="street_scenes",
    data_dir="",
    train_domains=("day", "dusk", "fog"),
    heldout_domains=("night",),
    full=dict(image_size=64, train_per_domain=400, test_per_domain=100),
    demo=dict(image_size=32, train_per_domain=200, test_per_domain=50),
    smoke=dict(image_size=32, train_per_domain=8, test_per_domain=8),
  )
  config.train = size.table(
    full=dict(steps=2000, batch_size=32, eval_batch_size=64, log_every=100, checkpoint_every=500),
    demo=dict(steps=300, batch_size=32, eval_batch_size=64, log_every=50, checkpoint_every=100),
    smoke=dict(steps=3, batch_size=8, eval_batch_size=8, log_every=1, checkpoint_every=2),
  )
  # backbone: 'small' (of `stage_sizes` and `widths`), 'resnet18' or 'resnet50'; dtype:
  # 'float32' or 'bfloat16' (compute).
  config.model = dict(
    backbone="small", dtype="float32", stage_sizes=(1, 1, 1), widths=(16, 32, 64), decoder_width=32
  )
  config.optim = common.adam(size)
  return config
