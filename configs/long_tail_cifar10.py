"""M3 on CIFAR-10-LT with ResNet-32 (ratios 100 and 10), ready for an accelerator.

    python -m launch.main --config=configs/long_tail_cifar10.py --workdir=DIR \
      --config.data.data_dir=TFDS_DIR

Needs CIFAR-10 prepared in TFDS_DIR (`tfds build cifar10 --data_dir=TFDS_DIR
--file_format=array_record`); nothing is downloaded here. CIFAR-10-LT is built as Cao et al.
(2019) and Menon et al.'s official code do: `n_i = floor(5000 * rho^(-i / 9))`, class i
shuffled with seed 0, the first n_i kept (`catalogue.long_tailed_subset`): 12,406 training
images at rho = 100, 20,431 at rho = 10; the test set is the balanced 10,000.

Published anchors, CIFAR-10-LT rho = 100, ResNet-32, balanced test accuracy (quoted in
issue 5): CE 70.4 %, LDAM-DRW 77.0 % (Cao et al. 2019), logit-adjusted loss 77.9 %
(Menon et al. 2021, official code). For rho = 10, Cao et al. report CE 86.4 % and LDAM-DRW
88.2 % (their Table 2 error rates, not in the issue: check before citing).

Differences from those papers that matter when comparing: this ResNet-32 uses GroupNorm
(batch statistics are not needed, see research/models/resnet.py) where theirs uses
BatchNorm; the schedule here is warm-up + cosine over `train.steps` where Cao et al. use
200 epochs with step decay at 160 and 180. Augmentation is the same (pad 4 + random crop,
horizontal flip).

Shot groups use the OLTR thresholds (many > 100, few < 20): at rho = 100 eight classes are
many-shot, two medium and none few-shot; at rho = 10 all ten are many-shot, so only overall
accuracy compares with the anchors. Head set: classes with more than 100 training images.
"""

from configs import common, sizes
from research.long_tail.settings import METHODS


def cifar_lt_config(arg, *, name: str, p: int, k: int, head_threshold: int):
  """The CIFAR-LT config shared by CIFAR-10-LT and CIFAR-100-LT."""
  size = sizes.parse(arg)
  config = common.new_config("long_tail", size, num_seeds=(3, 1, 1))
  config.methods = size.pick(full=METHODS, demo=METHODS, smoke=("dual", "ce"))
  config.data = dict(
    name=name,
    data_dir="",
    imbalance_ratios=size.pick(full=(100.0, 10.0), demo=(100.0,), smoke=(100.0,)),
    imbalance_ratio=100.0,  # set per run from imbalance_ratios
    augment=True,
  )
  config.head = dict(
    mode="threshold", threshold=head_threshold, ratio=0.3, top_n=3, sampling="random", p=4
  )
  config.triplet = dict(p=p, k=k, mining="batch_hard", margin=0.2)
  config.loss = dict(lambda_ce=1.0, lambda_tri=1.0, logit_adjust_tau=1.0)
  config.eval = dict(many=100, few=20)
  batch = 2 * p * k
  # About 200 epochs of the rho = 100 training set at 128 images per step (full).
  config.train = size.table(
    schedule="joint",
    full=dict(
      steps=20_000, batch_size=batch, eval_batch_size=1000, log_every=200, checkpoint_every=2000
    ),
    demo=dict(
      steps=1_000, batch_size=batch, eval_batch_size=1000, log_every=100, checkpoint_every=500
    ),
    smoke=dict(steps=2, batch_size=16, eval_batch_size=16, log_every=1, checkpoint_every=0),
  )
  # The dual arms' head branch: half of each step's images (the other half is the PK batch).
  config.train.head_batch_size = size.pick(full=p * k, demo=p * k, smoke=8)
  # ResNet-32 (Cao et al. 2019): 3 stages of 5 basic blocks, widths 16/32/64.
  config.model = size.table(
    backbone="small",  # or "resnet18" / "resnet50" (which ignore stage_sizes and widths)
    dtype="float32",
    stem_strides=1,
    full=dict(stage_sizes=(5, 5, 5), widths=(16, 32, 64), embedding_dim=128),
    demo=dict(stage_sizes=(5, 5, 5), widths=(16, 32, 64), embedding_dim=128),
    smoke=dict(stage_sizes=(1, 1, 1), widths=(8, 8, 8), embedding_dim=16),
  )
  config.optim = common.sgd(size, learning_rate=0.1, warmup_steps=(500, 50, 0), weight_decay=2e-4)
  if size == "smoke":
    config.triplet.p, config.triplet.k = 4, 2
  return config


def get_config(arg=None):
  # 128 images per step: dual arms 64 head + 8 x 8 PK, CE arms 128; triplet only the same
  # 8 x 8 PK batch as the dual arm's whole-set branch (64).
  return cifar_lt_config(arg, name="cifar10", p=8, k=8, head_threshold=100)
