"""M4 class-incremental panoptic fine-tuning on COCO panoptic (real data, prepared TFDS dir).

Args: None (full), 'demo' or 'smoke'. Needs `coco/2017_panoptic` prepared in `data.data_dir`
(`tfds build coco/2017_panoptic --data_dir=DIR --file_format=array_record`, which needs
TensorFlow to construct the builder); records come through `catalogue.coco_panoptic_example`
and are resized to `image_size` by `research.data.panoptic.coco_panoptic_arrays` (tested on
synthetic records of that shape, not via tfds mock data, because the TFDS coco builder needs
TensorFlow).
TFDS labels: 0-79 things, 80-132 stuff. Old: all stuff and things 0-59; new: things 60-79.
"""

from configs import incremental_panoptic_street, sizes


def get_config(arg=None):
  size = sizes.parse(arg)
  config = incremental_panoptic_street.get_config(arg)
  config.data = dict(
    name="coco_panoptic",
    data_dir="",
    image_size=sizes.pick(size, full=128, demo=64, smoke=32),
    num_train=sizes.pick(size, full=20000, demo=2000, smoke=16),
    num_test=sizes.pick(size, full=5000, demo=500, smoke=8),
    num_classes=133,
    thing_classes=tuple(range(80)),
    old_classes=tuple(range(60)) + tuple(range(80, 133)),
    new_classes=tuple(range(60, 80)),
    step0_fraction=0.5,
    max_segments=64,
  )
  config.model = dict(
    widths=(32, 64, 128),
    stem_stride=sizes.pick(size, full=2, demo=2, smoke=1),
    hidden_dim=64,
    num_queries=64,
    num_decoder_layers=sizes.pick(size, full=6, demo=3, smoke=2),
    num_heads=4,
    ffn_dim=256,
  )
  config.step0.steps = sizes.pick(size, full=20000, demo=1000, smoke=2)
  config.step1.steps = sizes.pick(size, full=5000, demo=300, smoke=2)
  return config
