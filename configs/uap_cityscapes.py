"""M1 on Cityscapes from a prepared TFDS `data_dir` (`cityscapes/semantic_segmentation`).

Args: None (full), 'demo' or 'smoke'. Set `--config.data.data_dir=DIR`. Images (1024 x 2048)
are resized while reading to `data.resize`; the M datasets are `data.num_datasets` contiguous
chunks of the train split (a held-out fraction of each is the held-out images) and the
validation cities, which the train split lacks, are the held-out domain.
"""

from configs import sizes, uap_street


def get_config(arg=None):
  size = sizes.parse(arg)
  config = uap_street.get_config(arg)
  config.data = dict(
    name="cityscapes",
    data_dir="",
    resize=sizes.pick(size, full=(128, 256), demo=(64, 128), smoke=(32, 64)),
    num_datasets=3,
    train_images=sizes.pick(size, full=0, demo=300, smoke=12),
    heldout_images=sizes.pick(size, full=0, demo=100, smoke=4),
    test_fraction=0.2,
  )
  config.model.widths = sizes.pick(
    size, full=(32, 64, 128), demo=(16, 32, 64), smoke=tuple(config.model.widths)
  )
  config.train.steps = sizes.pick(size, full=4000, demo=300, smoke=2)
  config.train.batch_size = sizes.pick(size, full=16, demo=16, smoke=8)
  config.train.eval_batch_size = sizes.pick(size, full=16, demo=16, smoke=8)
  config.attack.images_per_dataset = sizes.pick(size, full=64, demo=32, smoke=4)
  config.adv_train.steps = sizes.pick(size, full=1000, demo=100, smoke=2)
  config.report.overlay_images = sizes.pick(size, full=3, demo=2, smoke=1)
  return config
