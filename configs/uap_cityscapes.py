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
  # A wider network (smoke keeps uap_street's), trained longer, on Cityscapes.
  config.model.widths = size.pick(
    full=(32, 64, 128), demo=(16, 32, 64), smoke=tuple(config.model.widths)
  )
  config.train.update(
    size.table(
      full=dict(steps=4000, batch_size=16, eval_batch_size=16),
      demo=dict(steps=300, batch_size=16, eval_batch_size=16),
      smoke=dict(steps=2, batch_size=8, eval_batch_size=8),
    )
  )
  config.data = size.table(
    name="cityscapes",
    data_dir="",
    num_datasets=3,
    test_fraction=0.2,
    full=dict(resize=(128, 256), train_images=0, heldout_images=0),
    demo=dict(resize=(64, 128), train_images=300, heldout_images=100),
    smoke=dict(resize=(32, 64), train_images=12, heldout_images=4),
  )
  config.attack.images_per_dataset = size.pick(full=64, demo=32, smoke=4)
  config.adv_train.steps = size.pick(full=1000, demo=100, smoke=2)
  config.report.overlay_images = size.pick(full=3, demo=2, smoke=1)
  return config
