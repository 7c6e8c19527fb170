"""Tests of the panoptic quality metric: hand-computed cases and an independent loop reference."""

import math

import numpy as np
import pytest

from research.metrics import panoptic

THING_A, THING_B, STUFF_C, STUFF_D = 1, 2, 3, 4
CATEGORIES = {THING_A: True, THING_B: True, STUFF_C: False, STUFF_D: False}


def _metric_after(pred_map, pred_segments, gt_map, gt_segments, categories=None):
  metric = panoptic.PanopticQuality(categories or CATEGORIES)
  metric.update(pred_map, pred_segments, gt_map, gt_segments)
  return metric


def _pq_sq_rq(result):
  return result["pq"], result["sq"], result["rq"]


def test_perfect_prediction_with_renamed_ids_scores_one():
  gt = np.zeros((6, 6), int)
  gt[:3, :3], gt[:3, 3:], gt[3:, :] = 1, 2, 3
  pred = np.where(gt > 0, gt + 10, 0)
  result = _metric_after(
    pred,
    {11: THING_A, 12: THING_B, 13: STUFF_C},
    gt,
    {1: (THING_A, False), 2: (THING_B, False), 3: (STUFF_C, False)},
  ).compute()
  assert _pq_sq_rq(result["all"]) == (1.0, 1.0, 1.0)
  assert result["all"]["n"] == 3
  assert result["things"]["n"] == 2 and result["stuff"]["n"] == 1
  # STUFF_D never occurs: excluded from the averages, 0 in the per-class table.
  assert result["per_class"][STUFF_D] == {
    "pq": 0.0,
    "sq": 0.0,
    "rq": 0.0,
    "tp": 0,
    "fp": 0,
    "fn": 0,
  }


@pytest.mark.parametrize(
  "shift,expected",
  [
    (1, (0.6, 0.6, 1.0)),  # intersection 12, union 20: IoU 0.6 > 0.5, a match
    (2, (0.0, 0.0, 0.0)),  # intersection 8, union 24: IoU 1/3, one FP and one FN
  ],
)
def test_shifted_square(shift, expected):
  gt = np.full((8, 8), 2)  # STUFF_C background, so no void pixels
  gt[:4, :4] = 1
  pred = np.full((8, 8), 2)
  pred[:4, shift : 4 + shift] = 1
  result = _metric_after(
    pred, {1: THING_A, 2: STUFF_C}, gt, {1: (THING_A, False), 2: (STUFF_C, False)}
  ).compute()
  np.testing.assert_allclose(_pq_sq_rq(result["per_class"][THING_A]), expected)
  counts = result["per_class"][THING_A]
  assert (counts["tp"], counts["fp"], counts["fn"]) == ((1, 0, 0) if shift == 1 else (0, 1, 1))


def test_shifted_square_onto_void():
  gt = np.zeros((8, 8), int)
  gt[:4, :4] = 1
  pred = np.zeros((8, 8), int)
  pred[:4, 1:5] = 1
  result = _metric_after(pred, {1: THING_A}, gt, {1: (THING_A, False)}).compute()
  # The 4 px moved onto void leave the union: 16 + 16 - 12 - 4 = 16, IoU 0.75.
  np.testing.assert_allclose(_pq_sq_rq(result["all"]), (0.75, 0.75, 1.0))


def test_split_prediction_unequal_parts_gives_tp_and_fp():
  gt = np.zeros((4, 4), int)
  gt[:, :] = 1
  pred = np.ones((4, 4), int)
  pred[3, :] = 2  # 12 px and 4 px: IoU 0.75 (TP) and 0.25 (FP)
  result = _metric_after(pred, {1: THING_A, 2: THING_A}, gt, {1: (THING_A, False)}).compute()
  # PQ = 0.75 / (1 + 0.5), SQ = 0.75, RQ = 1 / 1.5.
  np.testing.assert_allclose(_pq_sq_rq(result["all"]), (0.5, 0.75, 2 / 3))


def test_split_prediction_equal_halves_gives_no_match():
  gt = np.ones((4, 4), int)
  pred = np.ones((4, 4), int)
  pred[2:, :] = 2  # IoU exactly 0.5 each: not > 0.5
  result = _metric_after(pred, {1: THING_A, 2: THING_A}, gt, {1: (THING_A, False)}).compute()
  assert result["per_class"][THING_A] == {
    "pq": 0.0,
    "sq": 0.0,
    "rq": 0.0,
    "tp": 0,
    "fp": 2,
    "fn": 1,
  }


def test_merged_prediction():
  gt = np.ones((4, 4), int)
  gt[3, :] = 2  # two gt instances: 12 px and 4 px
  pred = np.ones((4, 4), int)  # one prediction over both: IoU 0.75 and 0.25
  result = _metric_after(
    pred, {1: THING_A}, gt, {1: (THING_A, False), 2: (THING_A, False)}
  ).compute()
  np.testing.assert_allclose(_pq_sq_rq(result["all"]), (0.5, 0.75, 2 / 3))
  counts = result["per_class"][THING_A]
  assert (counts["tp"], counts["fp"], counts["fn"]) == (1, 0, 1)


def test_void_pixels_are_removed_from_prediction_area():
  gt = np.zeros((4, 4), int)
  gt[:2, :] = 1  # 8 px, the rest void
  pred = np.ones((4, 4), int)  # 8 px on the segment, 8 px on void
  result = _metric_after(pred, {1: STUFF_C}, gt, {1: (STUFF_C, False)}).compute()
  # union = 16 + 8 - 8 - 8 = 8: IoU 1 (it would be 0.5, no match, without the void rule).
  assert _pq_sq_rq(result["all"]) == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("start,is_fp", [(3, False), (2, True)])
def test_unmatched_prediction_is_fp_unless_more_than_half_on_void(start, is_fp):
  gt = np.zeros((1, 8), int)
  gt[0, :4] = 1  # STUFF_C, the rest void
  pred = np.zeros((1, 8), int)
  pred[0, :start] = 1
  pred[0, start : start + 4] = 2  # THING_B: 4 - start px on gt 1, the rest on void
  # start=3: 3 of 4 px on void (> 0.5), ignored; start=2: exactly half, counted as FP.
  result = _metric_after(pred, {1: STUFF_C, 2: THING_B}, gt, {1: (STUFF_C, False)}).compute()
  assert result["per_class"][THING_B]["fp"] == int(is_fp)


def test_crowd_region_is_never_fn_and_absorbs_same_category_predictions():
  gt = np.zeros((4, 8), int)
  gt[:, :4] = 1  # crowd region of THING_A
  gt[:, 4:] = 2  # an ordinary THING_A instance
  pred = np.zeros((4, 8), int)
  pred[:2, :4] = 1  # THING_A inside the crowd: not a FP
  pred[2:, :4] = 2  # THING_B inside THING_A's crowd: a FP (crowd of another category)
  pred[:, 4:] = 3  # perfect match of the instance
  result = _metric_after(
    pred, {1: THING_A, 2: THING_B, 3: THING_A}, gt, {1: (THING_A, True), 2: (THING_A, False)}
  ).compute()
  a, b = result["per_class"][THING_A], result["per_class"][THING_B]
  assert (a["tp"], a["fp"], a["fn"]) == (1, 0, 0)
  assert (b["tp"], b["fp"], b["fn"]) == (0, 1, 0)
  assert result["things"]["n"] == 2
  np.testing.assert_allclose(result["things"]["pq"], 0.5)


def test_prediction_equal_to_crowd_region_is_not_a_match():
  gt = np.ones((2, 2), int)
  pred = np.ones((2, 2), int)
  result = _metric_after(pred, {1: THING_A}, gt, {1: (THING_A, True)}).compute()
  assert result["all"]["n"] == 0
  assert math.isnan(result["all"]["pq"])


def _two_class_scene():
  """THING_A: TP with IoU 0.75 and one FN; STUFF_C: TP IoU 1; STUFF_D: one FP."""
  gt = np.zeros((4, 8), int)
  gt[:, :4] = 1  # THING_A, 16 px
  gt[:, 4:6] = 2  # THING_A, 8 px, missed
  gt[:, 6:] = 3  # STUFF_C
  pred = np.zeros((4, 8), int)
  pred[1:, :4] = 5  # 12 px inside gt 1: IoU 0.75
  pred[0, :4] = 6  # STUFF_D on gt 1's first row: FP
  pred[:, 6:] = 7  # STUFF_C exact
  pred_segments = {5: THING_A, 6: STUFF_D, 7: STUFF_C}
  gt_segments = {1: (THING_A, False), 2: (THING_A, False), 3: (STUFF_C, False)}
  return pred, pred_segments, gt, gt_segments


def test_things_stuff_and_class_subsets():
  metric = _metric_after(*_two_class_scene())
  result = metric.compute()
  pq_a = 0.75 / (1 + 0.5)  # TP 1, FN 1
  np.testing.assert_allclose(_pq_sq_rq(result["things"]), (pq_a, 0.75, 1 / 1.5))
  # Stuff: C has PQ 1, D has PQ 0 (one FP): mean 0.5; SQ mean (1 + 0) / 2; RQ (1 + 0) / 2.
  np.testing.assert_allclose(_pq_sq_rq(result["stuff"]), (0.5, 0.5, 0.5))
  np.testing.assert_allclose(result["all"]["pq"], (pq_a + 1.0 + 0.0) / 3)
  assert (result["things"]["n"], result["stuff"]["n"], result["all"]["n"]) == (1, 2, 3)

  subset = metric.compute(class_subset=[THING_A, STUFF_C])
  np.testing.assert_allclose(subset["all"]["pq"], (pq_a + 1.0) / 2)
  assert set(subset["per_class"]) == {THING_A, STUFF_C}
  assert subset["stuff"]["n"] == 1
  only_b = metric.compute(class_subset=[THING_B])
  assert only_b["all"]["n"] == 0 and math.isnan(only_b["all"]["pq"])


def test_merge_equals_accumulating_in_one():
  scene = _two_class_scene()
  together = panoptic.PanopticQuality(CATEGORIES)
  together.update(*scene)
  together.update(*scene)
  first, second = _metric_after(*scene), _metric_after(*scene)
  first.merge(second)
  assert first.compute() == together.compute()
  np.testing.assert_allclose(first.compute()["things"]["pq"], 0.75 * 2 / (2 + 0.5 * 2))


def test_update_rejects_bad_inputs():
  metric = panoptic.PanopticQuality(CATEGORIES)
  gt = np.ones((2, 2), int)
  with pytest.raises(ValueError, match=r"pred_map ids \[2\] are not allowed"):
    metric.update(np.full((2, 2), 2), {1: THING_A}, gt, {1: (THING_A, False)})
  with pytest.raises(ValueError, match="category=9 of predicted segment 1 is not allowed"):
    metric.update(gt, {1: 9}, gt, {1: (THING_A, False)})
  with pytest.raises(ValueError, match=r"pred_map.shape=\(1, 2\) is not allowed"):
    metric.update(np.ones((1, 2), int), {1: THING_A}, gt, {1: (THING_A, False)})
  with pytest.raises(ValueError, match="category=7 of class_subset is not allowed"):
    metric.compute(class_subset=[7])


def test_segments_from_semantic_instance():
  semantic = np.array([[1, 1, 3, 3], [1, 1, 3, 255], [2, 2, 4, 4]])
  instance = np.array([[1, 2, 5, 5], [1, 2, 0, 0], [0, 0, 7, 0]])
  segment_map, table = panoptic.segments_from_semantic_instance(semantic, instance, CATEGORIES)
  # Order of (category, instance): (1, 1), (1, 2), (2, crowd), (3, -), (4, -).
  np.testing.assert_array_equal(segment_map, [[1, 2, 4, 4], [1, 2, 4, 0], [3, 3, 5, 5]])
  assert table == {
    1: (THING_A, False),
    2: (THING_A, False),
    3: (THING_B, True),
    4: (STUFF_C, False),
    5: (STUFF_D, False),
  }


def test_segments_from_inference():
  table = panoptic.segments_from_inference(np.array([3, -1, 1]), np.array([True, False, True]))
  assert table == {1: 3, 3: 1}


# ------------------------------------------------- randomized against a loop reference


def _reference_counts(images, categories):
  """Independent loop re-implementation of panopticapi's pq_compute counting."""
  stats = {c: [0, 0, 0, 0.0] for c in categories}  # tp, fp, fn, iou
  for pred_map, pred_segments, gt_map, gt_segments in images:
    pred_area, gt_area, inter = {}, {}, {}
    for p, g in zip(pred_map.ravel().tolist(), gt_map.ravel().tolist(), strict=True):
      pred_area[p] = pred_area.get(p, 0) + 1
      gt_area[g] = gt_area.get(g, 0) + 1
      inter[(g, p)] = inter.get((g, p), 0) + 1
    gt_matched, pred_matched = set(), set()
    for (g, p), n in inter.items():
      if g == 0 or p == 0 or gt_segments[g][1]:
        continue
      if gt_segments[g][0] != pred_segments[p]:
        continue
      iou = n / (pred_area[p] + gt_area[g] - n - inter.get((0, p), 0))
      if iou > 0.5:
        stats[pred_segments[p]][0] += 1
        stats[pred_segments[p]][3] += iou
        gt_matched.add(g)
        pred_matched.add(p)
    crowd = {}
    for g in gt_area:
      if g == 0 or g in gt_matched:
        continue
      if gt_segments[g][1]:
        crowd[gt_segments[g][0]] = g
        continue
      stats[gt_segments[g][0]][2] += 1
    for p in pred_area:
      if p == 0 or p in pred_matched:
        continue
      ignored = inter.get((0, p), 0)
      if pred_segments[p] in crowd:
        ignored += inter.get((crowd[pred_segments[p]], p), 0)
      if ignored / pred_area[p] > 0.5:
        continue
      stats[pred_segments[p]][1] += 1
  return stats


def _reference_average(stats, chosen):
  pq = sq = rq = n = 0
  for c in chosen:
    tp, fp, fn, iou = stats[c]
    if tp + fp + fn == 0:
      continue
    n += 1
    pq += iou / (tp + 0.5 * fp + 0.5 * fn)
    sq += iou / tp if tp else 0
    rq += tp / (tp + 0.5 * fp + 0.5 * fn)
  return (pq / n, sq / n, rq / n, n) if n else None


def _random_image(rng, size=12):
  """Ground truth of painted rectangles (some void, at most one crowd per category) and a
  prediction made from it by moving, relabelling and adding rectangles."""
  categories = list(CATEGORIES)
  gt = np.zeros((size, size), int)
  gt_segments = {}
  crowd_categories = set()
  for segment_id in range(1, 7):
    top, left = rng.integers(0, size - 2, 2)
    height, width = rng.integers(2, 7, 2)
    gt[top : top + height, left : left + width] = segment_id
    category = int(rng.choice(categories))
    crowd = bool(rng.random() < 0.2) and category not in crowd_categories
    crowd_categories |= {category} if crowd else set()
    gt_segments[segment_id] = (category, crowd)
  gt[rng.random((size, size)) < 0.05] = 0
  gt_segments = {i: v for i, v in gt_segments.items() if (gt == i).any()}

  pred = np.where(gt > 0, gt + 20, 0)
  pred = np.roll(pred, int(rng.integers(-1, 2)), axis=int(rng.integers(0, 2)))
  for segment_id in range(40, 43):
    top, left = rng.integers(0, size - 2, 2)
    height, width = rng.integers(1, 5, 2)
    pred[top : top + height, left : left + width] = segment_id
  pred_segments = {}
  for segment_id in np.unique(pred).tolist():
    if segment_id == 0:
      continue
    if segment_id - 20 in gt_segments and rng.random() < 0.8:
      pred_segments[segment_id] = gt_segments[segment_id - 20][0]
    else:
      pred_segments[segment_id] = int(rng.choice(categories))
  return pred, pred_segments, gt, gt_segments


def test_randomized_against_loop_reference():
  rng = np.random.default_rng(0)
  images = [_random_image(rng) for _ in range(30)]
  metric = panoptic.PanopticQuality(CATEGORIES)
  for image in images:
    metric.update(*image)
  stats = _reference_counts(images, CATEGORIES)
  result = metric.compute()
  for c in CATEGORIES:
    ours = result["per_class"][c]
    tp, fp, fn, iou = stats[c]
    assert (ours["tp"], ours["fp"], ours["fn"]) == (tp, fp, fn)
    np.testing.assert_allclose(metric.counts[c].iou_sum, iou)
  assert sum(s[0] for s in stats.values()) > 10  # the random scenes do produce matches
  assert sum(s[1] for s in stats.values()) > 10 and sum(s[2] for s in stats.values()) > 10
  groups = {
    "all": list(CATEGORIES),
    "things": [THING_A, THING_B],
    "stuff": [STUFF_C, STUFF_D],
  }
  for name, chosen in groups.items():
    expected = _reference_average(stats, chosen)
    got = result[name]
    np.testing.assert_allclose((got["pq"], got["sq"], got["rq"], got["n"]), expected)
  subset = metric.compute(class_subset=[THING_B, STUFF_D])["all"]
  np.testing.assert_allclose(
    (subset["pq"], subset["sq"], subset["rq"], subset["n"]),
    _reference_average(stats, [THING_B, STUFF_D]),
  )
