"""M2 norm-ranked selection loop on the embedded digits. Args: None (full), 'demo' or 'smoke'."""

from configs import common, sizes


def get_config(arg=None):
  size = sizes.parse(arg)
  config = common.new_config("norm_selection", size, num_seeds=(5, 3, 1))
  config.data = dict(
    name="digits", data_dir="", imbalance_ratio=1.0, max_train_examples=0, max_test_examples=0
  )
  config.model = common.digits_resnet()
  config.optim = common.adam(size, warmup_steps=10)
  config.train = dict(
    # Every round (and every strategy) trains this many steps with one compiled step function.
    steps_per_round=sizes.pick(size, full=300, demo=100, smoke=3),
    batch_size=sizes.pick(size, full=64, demo=64, smoke=16),
    eval_batch_size=sizes.pick(size, full=256, demo=256, smoke=64),
    log_every=sizes.pick(size, full=300, demo=100, smoke=3),
  )
  config.selection = dict(
    m=sizes.pick(size, full=5, demo=5, smoke=4),  # samples per class and round (step 3 / 7)
    a=None,  # from the upper side of the mean; None: ceil(m / 2)
    mean_over="original",  # class mean norm over its "original" set (patent) or current "pool"
    norm_order="2",  # "1", "2" or "inf" (step 2)
    channel_weights=None,  # None: luminance for RGB, uniform otherwise
    grouping="labels",  # "labels" or "kmeans" (step 1; k-means of pixel vectors)
    num_clusters=None,  # needed for grouping="kmeans"
    warm_start=True,  # step 7: warm start (True) or from scratch (False)
    # Stop conditions (step 6); None disables one.
    max_remaining_per_class=sizes.pick(size, full=5, demo=5, smoke=0),
    max_remaining_fraction=None,
    label_budget=None,
    max_rounds=sizes.pick(size, full=8, demo=5, smoke=2),
  )
  # The loops run: "norm" (the method) and "random" (the ablation: the same loop, steps 4-7 with
  # correct samples removed, but m per class drawn at random), same seeds and training.
  config.loop = dict(draw_rules=("norm", "random"))
  # Equal-budget baselines: they never read a pool label. The full-data ceiling trains as many
  # rounds of steps_per_round as the seed's longest loop.
  config.baselines = (
    "random",
    "class_balanced_random",
    "max_entropy",
    "moderate_coreset",
  )
  config.full_data = True
  return config
