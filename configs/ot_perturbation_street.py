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
    sinkhorn_iterations=sizes.pick(size, full=50, demo=20, smoke=10),
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
  config.data = dict(
    name="street_scenes",
    data_dir="",
    image_size=sizes.pick(size, full=64, demo=32, smoke=32),
    domains=("day",),
    train_per_domain=sizes.pick(size, full=400, demo=800, smoke=8),
    test_per_domain=sizes.pick(size, full=400, demo=200, smoke=8),
    max_test_examples=sizes.pick(size, full=400, demo=200, smoke=8),  # all test images
  )
  config.model = dict(
    stage_sizes=(1, 1, 1), widths=(16, 32, 64), embedding_dim=32, head_channels=32
  )
  config.optim = common.adam(size, warmup_steps=(50, 10, 0))
  config.train = common.train(
    size,
    steps=(2000, 300, 2),
    batch_size=(32, 16, 8),
    eval_batch_size=(64, 48, 8),
    log_every=(50, 25, 1),
    checkpoint_every=(500, 100, 2),
    # Step 7 for every arm: its own target loss at the current parameters on the first
    # `convergence_batch_size` training images, at every log point, against this threshold.
    loss_threshold=0.05,
    convergence_batch_size=(64, 64, 8),
  )
  config.attack = dict(
    steps=sizes.pick(size, full=10, demo=3, smoke=1),
    alpha=sizes.pick(size, full=1.0 / 255.0, demo=2.0 / 255.0, smoke=2.0 / 255.0),
    # Test images matched together by the OT attack (padding rows weigh 0): the training
    # batch's size, so the attack matches over as many images as the method trains with.
    ot_group_size=sizes.pick(size, full=32, demo=16, smoke=8),
  )
  config.eval = dict(top_k=sizes.pick(size, full=100, demo=50, smoke=20))
  return config
