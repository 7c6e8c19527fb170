"""M2 norm-ranked selection loop on the embedded digits. Args: None (full), 'demo' or 'smoke'."""

from configs import common, sizes


def get_config(arg=None):
  size = sizes.parse(arg)
  config = common.new_config("norm_selection", size, num_seeds=(5, 3, 1))
  config.data = dict(
    name="digits", data_dir="", imbalance_ratio=1.0, max_train_examples=0, max_test_examples=0
  )
  # Every round (and every strategy) trains `steps_per_round` steps with one compiled step
  # function.
  config.train = size.table(
    full=dict(steps_per_round=300, batch_size=64, eval_batch_size=256, log_every=300),
    demo=dict(steps_per_round=100, batch_size=64, eval_batch_size=256, log_every=100),
    smoke=dict(steps_per_round=3, batch_size=16, eval_batch_size=64, log_every=3),
  )
  config.model = common.digits_resnet()
  config.optim = common.adam(size, warmup_steps=10)
  config.selection = dict(
    m=size.pick(full=5, demo=5, smoke=4),  # samples per class and round (step 3 / 7)
    a=None,  # from the upper side of the mean; None: ceil(m / 2)
    mean_over="original",  # class mean norm over its "original" set (patent) or current "pool"
    norm_order="2",  # "1", "2" or "inf" (step 2)
    channel_weights=None,  # None: luminance for RGB, uniform otherwise
    grouping="labels",  # "labels" or "kmeans" (step 1; k-means of pixel vectors)
    num_clusters=None,  # needed for grouping="kmeans"
    warm_start=True,  # step 7: warm start (True) or from scratch (False)
    # Stop conditions (step 6); None disables one.
    max_remaining_per_class=size.pick(full=5, demo=5, smoke=0),
    max_remaining_fraction=None,
    label_budget=None,
    max_rounds=size.pick(full=8, demo=5, smoke=2),
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
