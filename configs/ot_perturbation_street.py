"""M5: detection on clean + OT-matched perturbed street scenes. Args: None, demo or smoke."""

from configs import common, sizes


def method_config(task, num_seeds, *, eps, alpha, ascent_steps, size):
  """The M5 fields every variant shares: arms, seeds and the `ot` block (steps 2-5).

  `num_seeds`, `eps`, `alpha` and `ascent_steps` may be `(full, demo, smoke)` tuples.
  """
  config = common.new_config("ot_perturbation", size, num_seeds=num_seeds)
  config.task = task
  # clean-only, this method (initial_set as below), this method redrawing its perturbed set
  # every step (ablation), PGD adversarial training.
  config.trainings = ("clean", "ot", "ot_redraw", "pgd")
  config.ot = dict(
    eps=common.by_size(size, eps),
    alpha=common.by_size(size, alpha),
    ascent_steps=common.by_size(size, ascent_steps),
    perturbation="uniform",
    initial_set="fixed",  # step 2's perturbed set drawn once per image, before the loop.
    vectors="pooled",
    target_set="ascent",
    num_candidates=4,
    perturbed_only=False,  # True: loss2 alone; with vectors="logits" as Feature Scattering.
    cost="cosine",
    sinkhorn_epsilon=0.05,
    sinkhorn_iterations=size.pick(full=50, demo=20, smoke=10),
  )
  return config


def get_config(arg=None):
  size = sizes.parse(arg)
  config = method_config(
    "detection",
    (5, 5, 1),
    eps=4.0 / 255.0,
    alpha=4.0 / 255.0,  # one full-eps step, as Feature Scattering takes.
    ascent_steps=(2, 1, 1),
    size=size,
  )
  config.data = size.table(
    name="street_scenes",
    data_dir="",
    domains=("day",),
    # max_test_examples: all test images.
    full=dict(image_size=64, train_per_domain=400, test_per_domain=400, max_test_examples=400),
    demo=dict(image_size=32, train_per_domain=800, test_per_domain=200, max_test_examples=200),
    smoke=dict(image_size=32, train_per_domain=8, test_per_domain=8, max_test_examples=8),
  )
  config.train = size.table(
    full=dict(steps=2000, batch_size=32, eval_batch_size=64, log_every=50, checkpoint_every=500),
    demo=dict(steps=300, batch_size=16, eval_batch_size=48, log_every=25, checkpoint_every=100),
    smoke=dict(steps=2, batch_size=8, eval_batch_size=8, log_every=1, checkpoint_every=2),
  )
  config.model = dict(
    backbone="small",  # the detector's backbone
    dtype="float32",
    stage_sizes=(1, 1, 1),
    widths=(16, 32, 64),
    embedding_dim=32,
    head_channels=32,
  )
  config.optim = common.adam(size, warmup_steps=(50, 10, 0))
  # ot_group_size: test images matched together by the OT attack (padding rows weigh 0): the
  # training batch's size, so the attack matches over as many images as the method trains with.
  config.attack = size.table(
    full=dict(steps=10, alpha=1.0 / 255.0, ot_group_size=32),
    demo=dict(steps=3, alpha=2.0 / 255.0, ot_group_size=16),
    smoke=dict(steps=1, alpha=2.0 / 255.0, ot_group_size=8),
  )
  config.eval = dict(top_k=size.pick(full=100, demo=50, smoke=20))
  # Step 7 for every arm: its own target loss at the current parameters on the first
  # `convergence_batch_size` training images, at every log point, against this threshold.
  config.train.loss_threshold = 0.05
  config.train.convergence_batch_size = size.pick(full=64, demo=64, smoke=8)
  return config
