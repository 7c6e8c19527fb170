"""M5: detection on clean + OT-matched perturbed street scenes. Args: None, demo or smoke."""

import ml_collections

from configs import sizes


def get_config(arg=None):
  size = sizes.parse(arg)
  config = ml_collections.ConfigDict()
  config.experiment = "ot_perturbation"
  config.task = "detection"
  config.seed = 0
  config.trainings = ("clean", "ot", "pgd")
  config.num_seeds = sizes.pick(size, full=3, demo=3, smoke=1)
  config.data = dict(
    name="street_scenes",
    data_dir="",
    image_size=sizes.pick(size, full=64, demo=32, smoke=32),
    domains=("day",),
    train_per_domain=sizes.pick(size, full=400, demo=200, smoke=8),
    test_per_domain=sizes.pick(size, full=400, demo=200, smoke=8),
    max_test_examples=sizes.pick(size, full=400, demo=192, smoke=8),
  )
  config.model = dict(
    stage_sizes=(1, 1, 1), widths=(16, 32, 64), embedding_dim=32, head_channels=32
  )
  config.optim = dict(
    name="adam",
    learning_rate=3e-3,
    schedule="cosine",
    warmup_steps=sizes.pick(size, full=50, demo=10, smoke=0),
    weight_decay=0.0,
    momentum=0.9,
  )
  config.train = dict(
    steps=sizes.pick(size, full=2000, demo=120, smoke=2),
    batch_size=sizes.pick(size, full=32, demo=16, smoke=8),
    eval_batch_size=sizes.pick(size, full=64, demo=48, smoke=8),
    log_every=sizes.pick(size, full=50, demo=20, smoke=1),
    checkpoint_every=sizes.pick(size, full=500, demo=60, smoke=2),
    loss_threshold=0.05,
  )
  config.ot = dict(
    eps=4.0 / 255.0,
    alpha=4.0 / 255.0,  # one full-eps step, as Feature Scattering takes.
    ascent_steps=sizes.pick(size, full=2, demo=2, smoke=1),
    perturbation="uniform",
    vectors="pooled",
    target_set="ascent",
    num_candidates=4,
    perturbed_only=False,  # True: loss2 alone; with vectors="logits" as Feature Scattering.
    cost="cosine",
    sinkhorn_epsilon=0.05,
    sinkhorn_iterations=sizes.pick(size, full=50, demo=20, smoke=10),
  )
  config.attack = dict(
    steps=sizes.pick(size, full=10, demo=3, smoke=1),
    alpha=sizes.pick(size, full=1.0 / 255.0, demo=2.0 / 255.0, smoke=2.0 / 255.0),
  )
  config.eval = dict(top_k=sizes.pick(size, full=100, demo=50, smoke=20))
  return config
