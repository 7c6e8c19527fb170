"""M4 class-incremental panoptic fine-tuning on the embedded street scenes.

Args: None (full), 'demo' (both: all variants and the ablations; about 3 minutes on 2 CPU
cores at demo size) or 'smoke' (naive, method, joint).
Old classes: the stuff classes and car; new classes: truck, person, bicycle.
"""

import ml_collections

from configs import common, sizes


def get_config(arg=None):
  size = sizes.parse(arg)
  config = ml_collections.ConfigDict()
  config.experiment = "incremental_panoptic"
  config.seed = 0
  config.data = dict(
    name="street_scenes",
    data_dir="",
    domains=("day",),
    image_size=32,
    train_per_domain=sizes.pick(size, full=1600, demo=800, smoke=32),
    test_per_domain=sizes.pick(size, full=400, demo=200, smoke=8),
    num_classes=9,
    thing_classes=(5, 6, 7, 8),
    old_classes=(0, 1, 2, 3, 4, 5),
    new_classes=(6, 7, 8),
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
    temperature=1.0,
    overlap_rule="drop_matched",
    match_iou=0.5,
    noise_threshold=0.5,
    max_owners=1,
    min_area_ratio=0.5,
    query_score_threshold=0.0,
  )
  config.inference = dict(object_mask_threshold=0.5, overlap_threshold=0.8)
  # AdamW (decay on kernels); each phase: linear warm-up then cosine decay to 0.
  config.optim = dict(weight_decay=1e-4)
  config.step0 = dict(
    steps=sizes.pick(size, full=3000, demo=1500, smoke=2),
    learning_rate=1e-3,
    warmup_steps=sizes.pick(size, full=100, demo=50, smoke=0),
  )
  config.step1 = dict(
    steps=sizes.pick(size, full=1000, demo=500, smoke=2), learning_rate=1e-3, warmup_steps=0
  )
  config.train = common.train(
    size,
    batch_size=(16, 16, 8),
    eval_batch_size=(64, 64, 8),
    log_every=(100, 50, 1),
    checkpoint_every=(500, 250, 2),
  )
  main = ("naive", "method", "joint")
  ablations = ("no_pseudo", "no_distill", "no_weighting", "comformer", "true_wins")
  config.variants = sizes.pick(size, full=main + ablations, demo=main + ablations, smoke=main)
  config.num_overlays = sizes.pick(size, full=6, demo=4, smoke=2)
  return config
