"""M4 class-incremental panoptic fine-tuning on the embedded street scenes, several steps.

Args: None (full), 'demo' (3 seeds; naive, method, CoMFormer and joint at both incremental
steps; ablations, the labelled extension `true_wins` and the joint-ceiling diagnostics at step
1; about 35 minutes on 2 shared CPU cores) or 'smoke' (1 seed, a few updates).
Steps: step 0 learns the stuff classes and car; step 1 truck; step 2 person and bicycle. Each
step's arms continue from their own model of the step before (the historical model).
"""

from configs import common, sizes


def get_config(arg=None):
  size = sizes.parse(arg)
  config = common.new_config("incremental_panoptic", size, num_seeds=(5, 3, 1))
  config.data = dict(
    name="street_scenes",
    data_dir="",
    domains=("day",),
    image_size=32,
    train_per_domain=sizes.pick(size, full=1600, demo=800, smoke=48),
    test_per_domain=sizes.pick(size, full=400, demo=200, smoke=8),
    num_classes=9,
    thing_classes=(5, 6, 7, 8),
    # road, sidewalk, building, sky, vegetation, car | truck | person, bicycle
    class_steps=((0, 1, 2, 3, 4, 5), (6,), (7, 8)),
    step0_fraction=0.5,
    max_segments=16,
  )
  config.model = dict(
    widths=(16, 32, 64),
    stem_stride=1,
    hidden_dim=32,
    num_queries=16,
    num_decoder_layers=2,
    num_heads=4,
    ffn_dim=64,
  )
  config.loss = dict(w_class=2.0, w_bce=5.0, w_dice=5.0, no_object_weight=0.1)
  config.method = dict(
    kd_weight=2.0,
    weighting="one_minus_no_object",
    kd_form="fold_new_into_no_object",
    kd_reduction="mean",
    temperature=1.0,
    overlap_rule="drop_matched",
    match_iou=0.5,
    # Noise removal: mask probability below 0.7 (above the 0.5 binarisation) and connected
    # pieces under 2 mask pixels are noise.
    noise_threshold=0.7,
    min_component_area=2,
    max_owners=1,
    min_area_ratio=0.5,
    query_score_threshold=0.0,
    # Pseudo-label statistics at step 1 for these (noise_threshold, min_component_area).
    sensitivity=((0.5, 0), (0.7, 0), (0.5, 2), (0.7, 2), (0.8, 2), (0.9, 2), (0.7, 4)),
  )
  config.inference = dict(object_mask_threshold=0.5, overlap_threshold=0.8)
  # AdamW (decay on kernels); each phase: linear warm-up then cosine decay to 0.
  config.optim = dict(weight_decay=1e-4)
  config.step0 = dict(
    steps=sizes.pick(size, full=3000, demo=1200, smoke=2),
    learning_rate=1e-3,
    warmup_steps=sizes.pick(size, full=100, demo=50, smoke=0),
  )
  config.step1 = dict(
    steps=sizes.pick(size, full=1000, demo=300, smoke=2), learning_rate=1e-3, warmup_steps=0
  )
  config.train = common.train(
    size,
    batch_size=(16, 16, 8),
    eval_batch_size=(64, 64, 8),
    log_every=(100, 100, 1),
    checkpoint_every=(500, 0, 0),
  )
  main = ("naive", "method", "comformer", "joint")
  config.variants = main
  extra = (
    "no_noise_removal",
    "no_pseudo",
    "no_distill",
    "no_weighting",
    "true_wins",
    "joint_3x",
    "joint_step_images",
    "joint_step_images_3x",
  )
  config.step1_only = sizes.pick(size, full=extra, demo=extra, smoke=())
  config.num_overlays = sizes.pick(size, full=6, demo=4, smoke=2)
  return config
