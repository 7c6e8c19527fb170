"""M3 on digits-LT: head-set CE + whole-set PK triplet vs four baselines. Arg: None|demo|smoke.

Digits-LT is the embedded scikit-learn digits training split cut to the exponential profile
`n_i = floor(n_max * rho^(-i / (C - 1)))` with n_max = 124 (the smallest class), per-class
shuffle with seed 0 (`digits.long_tailed_indices`):

  rho = 10: 124 96 74 57 44 34 26 20 16 12  (503 images)
  rho = 50: 124 80 51 33 21 14  9  5  3  2  (342 images)

`data.imbalance_ratios` lists the ratios to run (full: 10 and 50; demo: 10 only; override with
`--config.data.imbalance_ratios='(50.0,)'`). The test split is balanced (50 per class).

Shot groups: the OLTR thresholds (many > 100, few < 20 for n_max = 1280 on ImageNet-LT, or
n_max = 5000 on CIFAR-LT) would leave digits without many-shot classes, so they are adapted to
digits' class sizes: many > 50, few < 20 (rho = 10: 4 / 4 / 2 classes; rho = 50: 3 / 2 / 5).
Head set: classes with more than 40 training images (rho = 10: classes 0-4; rho = 50: 0-2).
Every method sees 64 images per step (dual: 32 head + 8 x 4 PK; triplet only: 8 x 8 PK).
"""

import ml_collections

from configs import sizes

METHODS = ("dual", "ce", "ce_balanced", "logit_adjusted", "triplet")


def get_config(arg=None):
  size = sizes.parse(arg)
  config = ml_collections.ConfigDict()
  config.experiment = "long_tail"
  config.seed = 0
  config.num_seeds = sizes.pick(size, full=3, demo=2, smoke=1)
  config.methods = sizes.pick(size, full=METHODS, demo=METHODS, smoke=("dual", "ce"))
  config.data = dict(
    name="digits",
    data_dir="",
    imbalance_ratios=sizes.pick(size, full=(10.0, 50.0), demo=(10.0,), smoke=(10.0,)),
    imbalance_ratio=10.0,  # set per run from imbalance_ratios
    augment=False,
  )
  config.head = dict(mode="threshold", threshold=40, ratio=0.3, top_n=3, sampling="random", p=4)
  config.triplet = dict(
    p=sizes.pick(size, full=8, demo=8, smoke=4),
    k=sizes.pick(size, full=4, demo=4, smoke=2),
    mining="batch_hard",
    margin=0.2,
  )
  config.loss = dict(lambda_ce=1.0, lambda_tri=1.0, logit_adjust_tau=1.0)
  config.eval = dict(many=50, few=20)
  config.model = dict(stage_sizes=(1, 1, 1), widths=(16, 32, 64), embedding_dim=32, stem_strides=1)
  config.optim = dict(
    name="adam",
    learning_rate=3e-3,
    schedule="cosine",
    warmup_steps=20,
    weight_decay=0.0,
    momentum=0.9,
  )
  config.train = dict(
    steps=sizes.pick(size, full=1500, demo=300, smoke=3),
    batch_size=sizes.pick(size, full=64, demo=64, smoke=16),
    head_batch_size=sizes.pick(size, full=32, demo=32, smoke=8),
    eval_batch_size=sizes.pick(size, full=256, demo=256, smoke=64),
    log_every=sizes.pick(size, full=100, demo=50, smoke=3),
    checkpoint_every=sizes.pick(size, full=500, demo=150, smoke=0),
  )
  return config
