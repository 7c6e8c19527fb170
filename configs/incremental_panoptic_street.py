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
  config.data = size.table(
    name="street_scenes",
    data_dir="",
    domains=("day",),
    image_size=32,
    num_classes=9,
    thing_classes=(5, 6, 7, 8),
    # road, sidewalk, building, sky, vegetation, car | truck | person, bicycle
    class_steps=((0, 1, 2, 3, 4, 5), (6,), (7, 8)),
    step0_fraction=0.5,
    max_segments=16,
    full=dict(train_per_domain=1600, test_per_domain=400),
    demo=dict(train_per_domain=800, test_per_domain=200),
    smoke=dict(train_per_domain=48, test_per_domain=8),
  )
  config.model = dict(
    backbone="small",  # or "resnet18" / "resnet50" (which ignore `widths` and `stem_stride`)
    dtype="float32",  # "bfloat16" needs a named backbone
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
    match_iou=0.5,
    overlap_rule="drop_matched",
    # Noise removal: mask probability below 0.7 (above the 0.5 binarisation) and connected
    # pieces under 2 mask pixels are noise.
    noise_threshold=0.7,
    min_component_area=2,
    max_owners=1,
    min_area_ratio=0.5,
    query_score_threshold=0.0,
    # Pseudo-label statistics at step 1 for these (noise_threshold, min_component_area); each
    # setting compiles its own program, so smoke runs two (with and without the area rule).
    sensitivity=size.pick(
      full=((0.5, 0), (0.7, 0), (0.5, 2), (0.7, 2), (0.8, 2), (0.9, 2), (0.7, 4)),
      demo=((0.5, 0), (0.7, 0), (0.5, 2), (0.7, 2), (0.8, 2), (0.9, 2), (0.7, 4)),
      smoke=((0.5, 0), (0.7, 2)),
    ),
  )
  config.inference = dict(object_mask_threshold=0.5, overlap_threshold=0.8)
  # AdamW (decay on kernels); each phase: linear warm-up then cosine decay to 0.
  config.optim = dict(weight_decay=1e-4)
  config.step0 = size.table(
    learning_rate=1e-3,
    full=dict(steps=3000, warmup_steps=100),
    demo=dict(steps=1200, warmup_steps=50),
    smoke=dict(steps=2, warmup_steps=0),
  )
  config.step1 = dict(
    steps=size.pick(full=1000, demo=300, smoke=2), learning_rate=1e-3, warmup_steps=0
  )
  config.train = size.table(
    full=dict(batch_size=16, eval_batch_size=64, log_every=100, checkpoint_every=500),
    demo=dict(batch_size=16, eval_batch_size=64, log_every=100, checkpoint_every=0),
    smoke=dict(batch_size=8, eval_batch_size=8, log_every=1, checkpoint_every=0),
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
  config.step1_only = size.pick(full=extra, demo=extra, smoke=())
  config.num_overlays = size.pick(full=6, demo=4, smoke=2)
  return config
