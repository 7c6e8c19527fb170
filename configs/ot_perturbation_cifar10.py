"""M5, classification variant on CIFAR-10 (TFDS catalogue). Args: None, 'demo' or 'smoke'."""

import ml_collections

from configs import common, ot_perturbation_digits, sizes


def get_config(arg=None):
  size = sizes.parse(arg)
  config = ot_perturbation_digits.get_config(arg)
  config.data.name = "cifar10"
  config.data.max_test_examples = size.pick(full=10000, demo=512, smoke=16)
  config.model = ml_collections.ConfigDict(common.cifar_resnet())
  config.train.steps = size.pick(full=20000, demo=200, smoke=2)
  config.train.batch_size = size.pick(full=128, demo=32, smoke=8)
  config.ot.eps = 8.0 / 255.0
  config.ot.alpha = 2.0 / 255.0
  config.ot.ascent_steps = size.pick(full=2, demo=1, smoke=1)
  config.attack.steps = size.pick(full=10, demo=5, smoke=1)
  config.attack.alpha = 2.0 / 255.0
  config.attack.ot_group_size = size.pick(full=128, demo=32, smoke=8)
  return config
