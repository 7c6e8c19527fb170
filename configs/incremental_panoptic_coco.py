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
  config.data = size.table(
    name="coco_panoptic",
    data_dir="",
    num_classes=133,
    thing_classes=tuple(range(80)),
    class_steps="100-50",
    step0_fraction=0.5,
    max_segments=64,
    full=dict(image_size=128, num_train=20000, num_test=5000),
    demo=dict(image_size=64, num_train=2000, num_test=500),
    smoke=dict(image_size=32, num_train=16, num_test=8),
  )
  # The street model (backbone, dtype, num_heads), wider and with more queries.
  config.model.update(
    size.table(
      widths=(32, 64, 128),
      hidden_dim=64,
      num_queries=64,
      ffn_dim=256,
      full=dict(stem_stride=2, num_decoder_layers=6),
      demo=dict(stem_stride=2, num_decoder_layers=3),
      smoke=dict(stem_stride=1, num_decoder_layers=2),
    )
  )
  config.step0.steps = size.pick(full=20000, demo=1000, smoke=2)
  config.step1.steps = size.pick(full=5000, demo=300, smoke=2)
  config.method.min_component_area = size.pick(full=4, demo=2, smoke=2)
  return config
