"""Task transforms against brute-force references, and their bad-input errors."""

import numpy as np
import pytest

from research.data import transforms

RNG = np.random.default_rng(0)


def _find_window(big: np.ndarray, crop: np.ndarray) -> list[tuple[int, int, bool]]:
  """Every (top, left, flipped) at which `crop` occurs in `big` (brute force)."""
  h, w = crop.shape[:2]
  found = []
  for flipped in (False, True):
    target = crop[:, ::-1] if flipped else crop
    for top in range(big.shape[0] - h + 1):
      for left in range(big.shape[1] - w + 1):
        if np.array_equal(big[top : top + h, left : left + w], target):
          found.append((top, left, flipped))
  return found


def _street_record(h=24, w=32):
  """An image with a unique colour per pixel, a label map, two things and their boxes."""
  image = RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)
  semantic = RNG.integers(0, 5, (h, w)).astype(np.uint8)
  panoptic = (semantic.astype(np.int32) + 1) * 1000
  boxes = np.array([[4, 3, 14, 11], [20, 12, 31, 22], [0, 0, 0, 0]], np.float32)
  for inst, (x0, y0, x1, y1) in enumerate(boxes[:2].astype(int), start=1):
    semantic[y0:y1, x0:x1] = 4 + inst
    panoptic[y0:y1, x0:x1] = (5 + inst) * 1000 + inst
  return {
    "image": image,
    "semantic": semantic,
    "panoptic": panoptic,
    "boxes": boxes,
    "box_classes": np.array([5, 6, 0], np.int32),
    "box_valid": np.array([True, True, False]),
  }


@pytest.mark.parametrize("seed", range(4))
def test_segmentation_at_scale_one_is_a_crop_of_image_and_labels_at_one_place(seed):
  record = _street_record()
  t = transforms.SegmentationTransform(9, (10, 12), scale_range=(1.0, 1.0))
  out = t(record, 0, np.random.default_rng(seed))
  places = _find_window(record["image"], out["image"])
  assert len(places) == 1
  top, left, flipped = places[0]
  labels = record["semantic"][top : top + 10, left : left + 12]
  np.testing.assert_array_equal(out["semantic"], labels[:, ::-1] if flipped else labels)


def test_segmentation_labels_at_scale_two_are_a_crop_of_the_doubled_map():
  record = _street_record()
  t = transforms.SegmentationTransform(9, (10, 12), scale_range=(2.0, 2.0), flip=False)
  out = t(record, 0, np.random.default_rng(1))
  doubled = np.repeat(np.repeat(record["semantic"], 2, 0), 2, 1)
  assert _find_window(doubled, out["semantic"])
  assert out["image"].shape == (10, 12, 3) and out["image"].dtype == np.uint8


def test_segmentation_evaluation_keeps_the_full_image():
  record = _street_record()
  out = transforms.SegmentationTransform(9, (10, 12))(record, 0, None)
  np.testing.assert_array_equal(out["image"], record["image"])
  np.testing.assert_array_equal(out["semantic"], record["semantic"])


@pytest.mark.parametrize("seed", range(6))
def test_detection_boxes_follow_the_pixels(seed):
  record = _street_record()
  crop, scales = (16, 20), (0.7, 1.6)
  det = transforms.DetectionTransform(4, crop, scale_range=scales, class_offset=5, min_size=1e-3)(
    record, 3, np.random.default_rng(seed)
  )
  # The same window (same generator) applied to the instance map: each thing's visible pixels.
  seg = transforms.SegmentationTransform(9, crop, scale_range=scales)(
    record, 3, np.random.default_rng(seed)
  )
  np.testing.assert_array_equal(det["image"], seg["image"])
  for slot in (0, 1):
    ys, xs = np.nonzero(seg["semantic"] == 5 + slot)
    if len(ys) == 0:  # no pixel left: the box is gone or thinner than one pixel
      x0, y0, x1, y1 = det["boxes"][slot]
      assert not det["box_valid"][slot] or min(x1 - x0, y1 - y0) < 1
      continue
    assert det["box_valid"][slot] and det["box_classes"][slot] == slot
    pixel_box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
    np.testing.assert_allclose(det["boxes"][slot], pixel_box, atol=0.5)
  assert not det["box_valid"][2] and not det["boxes"][2].any()


@pytest.mark.parametrize("seed", range(3))
def test_panoptic_table_lists_exactly_the_segments_left_in_the_crop(seed):
  record = _street_record()
  t = transforms.PanopticTransform(9, (10, 12), max_segments=8, scale_range=(0.8, 1.5))
  out = t(record, 0, np.random.default_rng(seed))
  present = np.unique(out["panoptic"])
  valid = out["segment_valid"]
  np.testing.assert_array_equal(out["segment_ids"][valid], present)
  np.testing.assert_array_equal(out["segment_classes"][valid], present // 1000 - 1)
  assert not out["segment_crowd"].any() and valid.sum() == len(present)


def test_panoptic_uses_the_records_segment_table_when_it_has_one():
  record = {
    "image": np.zeros((6, 6, 3), np.uint8),
    "panoptic": np.array([[7] * 6] * 3 + [[0] * 6] * 3, np.int32),
    "segment_ids": np.array([7]),
    "segment_classes": np.array([2]),
    "segment_is_crowd": np.array([True]),
  }
  out = transforms.PanopticTransform(3, 4, max_segments=2)(record, 0, None)
  assert out["segment_ids"].tolist() == [7, 0] and out["segment_classes"].tolist() == [2, 0]
  assert out["segment_crowd"].tolist() == [True, False]
  record["panoptic"][0, 0] = 9
  with pytest.raises(transforms.InputDataError, match="record 0: segment id 9 has no"):
    transforms.PanopticTransform(3, 4, max_segments=2)(record, 0, None)


@pytest.mark.parametrize("seed", range(3))
def test_classification_crop_is_a_window_of_the_padded_image(seed):
  image = RNG.integers(1, 256, (8, 8, 3), dtype=np.uint8)
  t = transforms.ClassificationTransform(10, 8, padding=2)
  out = t({"image": image, "label": np.int64(3)}, 0, np.random.default_rng(seed))
  assert out["label"] == 3
  assert len(_find_window(np.pad(image, ((2, 2), (2, 2), (0, 0))), out["image"])) == 1
  centre = t({"image": image, "label": np.int64(3)}, 0, None)
  np.testing.assert_array_equal(centre["image"], image)


@pytest.mark.parametrize(
  "transform,record,message",
  [
    (
      transforms.ClassificationTransform(10, 8),
      {"image": np.zeros((8, 8, 1), np.uint8), "label": np.int64(12)},
      r"record 17: label 12 is outside the class range; allowed: 0\.\.9",
    ),
    (
      transforms.SegmentationTransform(9, 8),
      {"image": np.zeros((8, 8, 3), np.uint8), "semantic": np.full((8, 8), 42, np.uint8)},
      r"record 17: semantic label 42 is outside the class range; allowed: 0\.\.8 or 255",
    ),
    (
      transforms.PanopticTransform(9, 8, max_segments=4),
      {"image": np.zeros((8, 8, 3), np.uint8), "panoptic": np.full((8, 8), 12001, np.int32)},
      r"record 17: segment class 11 is outside the class range; allowed: 0\.\.8",
    ),
    (
      transforms.DetectionTransform(4, 8, class_offset=5),
      {
        "image": np.zeros((8, 8, 3), np.uint8),
        "boxes": np.ones((2, 4), np.float32),
        "box_classes": np.array([6, 2]),
        "box_valid": np.array([True, True]),
      },
      r"record 17: box class \(after class_offset\) -3 is outside the class range; allowed: 0",
    ),
    (
      transforms.SegmentationTransform(9, (16, 32)),
      {"image": np.zeros((12, 40, 3), np.uint8), "semantic": np.zeros((12, 40), np.uint8)},
      r"record 17: the image of 12x40 pixels is smaller than the crop 16x32; allowed: images at",
    ),
    (
      transforms.SegmentationTransform(9, 8),
      {"image": np.zeros((8, 8), np.float32), "semantic": np.zeros((8, 8), np.uint8)},
      r"record 17: image has shape \(8, 8\) and dtype float32; allowed: \[H, W, 1 or 3\] uint8",
    ),
  ],
  ids=["label", "semantic", "panoptic", "detection", "small_image", "image_shape"],
)
def test_bad_input_fails_naming_the_record_the_value_and_what_is_allowed(
  transform, record, message
):
  with pytest.raises(transforms.InputDataError, match=message):
    transform(record, 17, np.random.default_rng(0))
