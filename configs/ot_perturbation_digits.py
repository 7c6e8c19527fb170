"""M5, classification variant on the embedded digits. Args: None (full), 'demo' or 'smoke'."""

import ml_collections

from configs import sizes


def get_config(arg=None):
  size = sizes.parse(arg)
  config = ml_collections.ConfigDict()
  config.experiment = "ot_perturbation"
  config.task = "classification"
  config.seed = 0
  config.trainings = ("clean", "ot", "pgd")
  config.num_seeds = sizes.pick(size, full=3, demo=1, smoke=1)
  config.data = dict(
    name="digits",
    data_dir="",
    imbalance_ratio=1.0,
    max_test_examples=sizes.pick(size, full=500, demo=256, smoke=16),
  )
  config.model = dict(stage_sizes=(1, 1, 1), widths=(16, 32, 64), embedding_dim=32, stem_strides=1)
  config.optim = dict(
    name="adam",
    learning_rate=3e-3,
    schedule="cosine",
    warmup_steps=sizes.pick(size, full=20, demo=10, smoke=0),
    weight_decay=0.0,
    momentum=0.9,
  )
  config.train = dict(
    steps=sizes.pick(size, full=1500, demo=150, smoke=2),
    batch_size=sizes.pick(size, full=64, demo=32, smoke=8),
    eval_batch_size=sizes.pick(size, full=256, demo=128, smoke=8),
    log_every=sizes.pick(size, full=100, demo=25, smoke=1),
    checkpoint_every=sizes.pick(size, full=500, demo=75, smoke=2),
    loss_threshold=0.02,
  )
  config.ot = dict(
    eps=sizes.pick(size, full=0.1, demo=0.1, smoke=0.1),
    alpha=sizes.pick(size, full=0.05, demo=0.1, smoke=0.1),
    ascent_steps=sizes.pick(size, full=2, demo=1, smoke=1),
    perturbation="uniform",
    vectors="pooled",
    target_set="ascent",
    num_candidates=4,
    perturbed_only=False,  # True: loss2 alone; with vectors="logits" as Feature Scattering.
    cost="cosine",
    sinkhorn_epsilon=0.05,
    sinkhorn_iterations=sizes.pick(size, full=50, demo=20, smoke=10),
  )
  config.attack = dict(steps=sizes.pick(size, full=10, demo=5, smoke=1), alpha=config.ot.alpha)
  config.eval = dict(top_k=1)
  return config
