"""research/data/panoptic.py: segment tables and padded targets against numpy loops."""

import chex
import numpy as np
import pytest

from research.data import panoptic, street_scenes
from research.metrics import panoptic as pq_metrics


def _tables(panoptic_maps):
  return panoptic.street_panoptic_arrays(
    {"image": np.zeros(panoptic_maps.shape + (3,), np.uint8), "panoptic": panoptic_maps}, 8
  )


def test_street_tables_match_semantic_instance_reference():
  scenes = street_scenes.generate_split("day", 3, seed=1, image_size=32)
  arrays = panoptic.street_panoptic_arrays(scenes, 16)
  categories = {c: c in street_scenes.THING_CLASSES for c in range(9)}
  for i in range(3):
    ref_map, ref_table = pq_metrics.segments_from_semantic_instance(
      scenes["semantic"][i], scenes["panoptic"][i] % 1000, categories
    )
    ours = panoptic.ground_truth_segments(arrays, i)
    # Same segments (as pixel sets) with the same classes, ids aside.
    for ref_id, (cls, crowd) in ref_table.items():
      ids = np.unique(arrays["panoptic"][i][ref_map == ref_id])
      assert len(ids) == 1 and ours[int(ids[0])] == (cls, crowd)
    assert len(ours) == len(ref_table)


def test_too_many_segments_keep_the_largest_and_are_counted():
  maps = np.full((2, 4, 4), 1000, np.int32)
  maps[0].flat[:10] = 1000 + np.arange(10)  # 10 one-pixel segments + the 6-pixel 1000 segment
  tables = _tables(maps)  # G = 8
  np.testing.assert_array_equal(tables["segment_truncated"], [2, 0])
  assert tables["segment_valid"][0].all() and tables["segment_ids"][0, 0] == 1000
  assert tables["segment_valid"][1].sum() == 1
  # The training targets cover only the kept segments; the others are void for training.
  targets = panoptic.panoptic_targets(tables, range(9), (4, 4), 8)
  assert targets["target_valid"][0].sum() == 8


@pytest.mark.parametrize("max_segments", [0, -3])
def test_max_segments_must_be_positive(max_segments):
  with pytest.raises(ValueError, match=f"max_segments={max_segments}"):
    panoptic.street_panoptic_arrays(
      {"image": np.zeros((1, 4, 4, 3), np.uint8), "panoptic": np.zeros((1, 4, 4), np.int32)},
      max_segments,
    )
  with pytest.raises(ValueError, match=f"max_segments={max_segments}"):
    panoptic.coco_panoptic_arrays([], 4, max_segments)


def test_ground_truth_reads_records_at_their_resolution_and_upsampling():
  maps = {0: np.arange(12).reshape(3, 4), 1: np.zeros((5, 2), np.int64)}
  truth = panoptic.GroundTruth(2, lambda i: (maps[i], {}))
  assert truth[0][0].shape == (3, 4) and truth[1][0].shape == (5, 2) and len(truth) == 2
  with pytest.raises(IndexError):
    truth[2]
  pred = np.array([[1, 2], [3, 4]])
  np.testing.assert_array_equal(
    panoptic.upsample_segment_map(pred, (3, 4)), [[1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]
  )


def test_class_map():
  maps = np.zeros((1, 4, 4), np.int32)
  maps[0, :2] = 6001  # car on the top half
  maps[0, 2:, :2] = 1000  # road bottom left; bottom right void
  out = panoptic.class_map(_tables(maps), (2, 2))
  np.testing.assert_array_equal(out[0], [[5, 5], [0, -1]])


def test_block_downsample_against_loop():
  masks = np.random.default_rng(0).random((3, 8, 12)) > 0.6
  ours = panoptic.block_downsample(masks, (4, 3))
  for k in range(3):
    for i in range(4):
      for j in range(3):
        assert ours[k, i, j] == (masks[k, 2 * i : 2 * i + 2, 4 * j : 4 * j + 4].sum() >= 4)


def test_panoptic_targets_against_loop():
  rng = np.random.default_rng(3)
  ids = np.array([1000, 2000, 6001, 7002, 9003])  # road, sidewalk, car, truck, bicycle
  maps = ids[rng.integers(0, len(ids), (4, 8, 8))].astype(np.int32)
  maps[0, :2] = 0  # void
  maps[1] = 1000  # only road
  arrays = _tables(maps)
  keep = (0, 5, 6)
  out = panoptic.panoptic_targets(arrays, keep, (4, 4), 6)
  chex.assert_shape(out["target_masks"], (4, 6, 4, 4))
  for i in range(4):
    expected = []
    for s in np.unique(maps[i]):
      cls = s // 1000 - 1
      if s == 0 or cls not in keep:
        continue
      small = (maps[i] == s).reshape(4, 2, 4, 2).mean((1, 3)) >= 0.5
      if small.any():
        expected.append((small.sum(), cls, small))
    expected.sort(key=lambda t: -t[0])
    assert out["target_valid"][i].sum() == len(expected)
    for slot, (_, cls, small) in enumerate(expected):
      assert out["target_classes"][i, slot] == cls
      np.testing.assert_array_equal(out["target_masks"][i, slot], small)
    assert not out["target_masks"][i, len(expected) :].any()


def test_empty_image_gives_all_invalid_targets():
  out = panoptic.panoptic_targets(_tables(np.zeros((1, 8, 8), np.int32)), (0, 1), (4, 4), 4)
  assert not out["target_valid"].any() and not out["target_masks"].any()


def _coco_record(h, w, ids_map, segments):
  rng = np.random.default_rng(h * w)
  return {
    "image": rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
    "panoptic": ids_map.astype(np.int32),
    "segment_ids": np.array([s for s, _, _ in segments], np.int64),
    "segment_classes": np.array([c for _, c, _ in segments], np.int64),
    "segment_is_crowd": np.array([k for _, _, k in segments], bool),
  }


def test_coco_records_to_targets():
  """Synthetic records shaped like `catalogue.coco_panoptic_example` output (8x12 -> 4x4)."""
  ids_map = np.zeros((8, 12), np.int64)
  ids_map[:4] = 101  # stuff class 90, top half
  ids_map[4:, :6] = 202  # thing class 3, bottom left
  ids_map[4:, 6:] = 303  # crowd thing class 3, bottom right
  records = [
    _coco_record(8, 12, ids_map, [(101, 90, False), (202, 3, False), (303, 3, True)]),
    _coco_record(4, 4, np.zeros((4, 4)), []),
  ]
  arrays = panoptic.coco_panoptic_arrays(records, 4, 5)
  # A function of the record index reads them one at a time the same way.
  again = panoptic.coco_panoptic_arrays(records.__getitem__, 4, 5, count=2)
  for k in arrays:
    np.testing.assert_array_equal(arrays[k], again[k])
  # Nearest sampling at pixel centres: rows 1, 3, 5, 7; columns 1, 4, 7, 10.
  np.testing.assert_array_equal(arrays["image"][0], records[0]["image"][1::2][:, [1, 4, 7, 10]])
  np.testing.assert_array_equal(arrays["panoptic"][0], ids_map[1::2][:, [1, 4, 7, 10]])
  assert panoptic.ground_truth_segments(arrays, 0) == {
    101: (90, False),
    202: (3, False),
    303: (3, True),
  }
  assert panoptic.ground_truth_segments(arrays, 1) == {}
  targets = panoptic.panoptic_targets(arrays, range(133), (2, 2), 4)
  # The crowd segment is never a target; the stuff top row and the thing bottom-left block are.
  np.testing.assert_array_equal(targets["target_valid"], [[1, 1, 0, 0], [0, 0, 0, 0]])
  np.testing.assert_array_equal(targets["target_classes"][0, :2], [90, 3])
  np.testing.assert_array_equal(targets["target_masks"][0, 1], [[0, 0], [1, 0]])


def test_coco_record_with_unknown_segment_is_an_error():
  record = _coco_record(4, 4, np.full((4, 4), 7), [(8, 1, False)])
  with pytest.raises(ValueError, match=r"segment ids \[7\]"):
    panoptic.coco_panoptic_arrays([record], 4, 4)
