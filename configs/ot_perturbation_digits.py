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
    max_test_examples=sizes.pick(size, full=500, demo=256, smoke=16),
  )
  config.model = common.digits_resnet()
  config.optim = common.adam(size, warmup_steps=(20, 10, 0))
  config.train = common.train(
    size,
    steps=(1500, 150, 2),
    batch_size=(64, 32, 8),
    eval_batch_size=(256, 128, 8),
    log_every=(100, 25, 1),
    checkpoint_every=(500, 75, 2),
    loss_threshold=0.02,
    convergence_batch_size=(128, 64, 8),
  )
  config.attack = dict(
    steps=sizes.pick(size, full=10, demo=5, smoke=1),
    alpha=config.ot.alpha,
    ot_group_size=sizes.pick(size, full=64, demo=32, smoke=8),
  )
  config.eval = dict(top_k=1)
  return config
