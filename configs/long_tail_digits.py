"""M3 on digits-LT: head-set CE + whole-set PK triplet vs its controls. Arg: None|demo|smoke.

Digits-LT is the embedded scikit-learn digits training split cut to the exponential profile
`n_i = floor(n_max * rho^(-i / (C - 1)))` with n_max = 124 (the smallest class), per-class
shuffle with seed 0 (`digits.long_tailed_indices`):

  rho = 10: 124 96 74 57 44 34 26 20 16 12  (503 images)
  rho = 50: 124 80 51 33 21 14  9  5  3  2  (342 images)
  rho = 100: 124 74 44 26 16  9  5  3  2  1  (304 images)

`data.imbalance_ratios` lists the ratios to run (full and demo: 10, 50 and 100; override with
`--config.data.imbalance_ratios='(50.0,)'`). The test split is balanced (50 per class, 500
images; the digits' smallest class has 174 images and the training cut takes 124, so a larger
balanced test split would need a smaller n_max).

Shot groups: the OLTR thresholds (many > 100, few < 20 for n_max = 1280 on ImageNet-LT, or
n_max = 5000 on CIFAR-LT) would leave digits without many-shot classes, so they are adapted to
digits' class sizes: many > 50, few < 20 (rho = 10: 4 / 4 / 2 classes; rho = 50: 3 / 2 / 5;
rho = 100: 2 / 2 / 6). Head set: classes with more than 40 training images (rho = 10: classes
0-4; rho = 50 and 100: 0-2). Images per step: the dual arms 64 (32 head + 8 x 4 PK), the CE
baselines 64, triplet-only 32 (the same 8 x 4 PK batch as the dual arm's whole-set branch, so
dual - triplet is the head branch alone). `train.schedule` ('joint' | 'alternating') is the
schedule of `dual` and `dual_all_head`; the arm `dual_alternating` is the alternating control.

Arms (`methods`): `dual`, `dual_all_head` (every class in the head: isolates the head split),
`dual_alternating`, `ce`, `ce_balanced`, `logit_adjusted`, `triplet`. None of the values here
was tuned on the test split (lambda = 1, margin 0.2, head threshold 40 are untuned defaults).
"""

from configs import common, sizes
from research.long_tail.settings import METHODS


def get_config(arg=None):
  size = sizes.parse(arg)
  # Seeds: the paired few-shot difference needs about 2 * std / sqrt(n) < 3 points (the report
  # computes the SE obtained and the seeds a 3-point difference would need).
  config = common.new_config("long_tail", size, num_seeds=(10, 5, 1))
  config.methods = size.pick(full=METHODS, demo=METHODS, smoke=("dual", "ce"))
  config.data = dict(
    name="digits",
    data_dir="",
    imbalance_ratios=size.pick(full=(10.0, 50.0, 100.0), demo=(10.0, 50.0, 100.0), smoke=(10.0,)),
    imbalance_ratio=10.0,  # set per run from imbalance_ratios
    augment=False,
  )
  config.head = dict(mode="threshold", threshold=40, ratio=0.3, top_n=3, sampling="random", p=4)
  config.triplet = dict(
    p=size.pick(full=8, demo=8, smoke=4),
    k=size.pick(full=4, demo=4, smoke=2),
    mining="batch_hard",
    margin=0.2,
  )
  config.loss = dict(lambda_ce=1.0, lambda_tri=1.0, logit_adjust_tau=1.0)
  config.eval = dict(many=50, few=20)
  config.train = size.table(
    schedule="joint",
    full=dict(steps=1500, batch_size=64, eval_batch_size=256, log_every=100, checkpoint_every=500),
    demo=dict(steps=300, batch_size=64, eval_batch_size=256, log_every=50, checkpoint_every=150),
    smoke=dict(steps=3, batch_size=16, eval_batch_size=64, log_every=3, checkpoint_every=0),
  )
  # The dual arms' head branch: half of each step's images (the other half is the PK batch).
  config.train.head_batch_size = size.pick(full=32, demo=32, smoke=8)
  config.model = common.digits_resnet()
  config.optim = common.adam(size)
  return config
