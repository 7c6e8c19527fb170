"""M4 class-incremental panoptic fine-tuning on COCO panoptic (real data, prepared TFDS dir).

Args: None (full), 'demo' or 'smoke'. Needs `coco/2017_panoptic` prepared in `data.data_dir`
(`tfds build coco/2017_panoptic --data_dir=DIR --file_format=array_record`, which needs
TensorFlow to construct the builder). Records are read one at a time through
`catalogue.coco_panoptic_example`, resized to `image_size` for training (targets built image by
image; an image with more than `max_segments` segments keeps its largest, the others are
counted in the report), and PQ is computed against each validation label map at its original
resolution. Tested end to end on synthetic records of that shape (tests/incremental_panoptic).
TFDS labels: 0-79 things, 80-132 stuff, learnt in this order.
Task splits in CoMFormer's style: `data.class_steps="100-50"` (default: classes 0-99, then
100-132) or `"100-10"` (0-99, then 10 more per step: 100-109, 110-119, 120-129, 130-132), e.g.
`--config.data.class_steps=100-10`; any `"B-K"` or an explicit tuple of tuples works.
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
    class_steps="100-50",
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
  config.method.min_component_area = sizes.pick(size, full=4, demo=2, smoke=2)
  return config
