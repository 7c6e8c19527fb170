"""M2 norm-ranked selection loop on CIFAR-10 from a TFDS data_dir. Args: None, 'demo', 'smoke'.

Set `config.data.data_dir` to the directory where `tfds build cifar10 --data_dir=DIR
--file_format=array_record` was run.
"""

import ml_collections

from configs import common, norm_selection_digits, sizes


def get_config(arg=None):
  size = sizes.parse(arg)
  config = norm_selection_digits.get_config(arg)
  config.data.name = "cifar10"
  config.data.max_train_examples = size.pick(full=0, demo=2000, smoke=0)
  config.data.max_test_examples = size.pick(full=0, demo=500, smoke=0)
  config.model = ml_collections.ConfigDict(common.cifar_resnet())
  config.train.steps_per_round = size.pick(full=2000, demo=100, smoke=2)
  config.train.batch_size = size.pick(full=128, demo=64, smoke=8)
  config.selection.m = size.pick(full=100, demo=10, smoke=1)
  config.selection.max_remaining_per_class = size.pick(full=100, demo=10, smoke=0)
  config.selection.max_rounds = size.pick(full=10, demo=4, smoke=2)
  return config
