"""Detection AP / mAP against hand-computed cases."""

import numpy as np
import pytest

from research.metrics import detection as dm

GT_A = [0.0, 0.0, 10.0, 10.0]
GT_B = [20.0, 20.0, 30.0, 30.0]
FAR = [50.0, 50.0, 60.0, 60.0]


def _dets(boxes, scores, classes):
  return (np.array(boxes, float).reshape(-1, 4), np.array(scores, float), np.array(classes, int))


def _gts(boxes, classes):
  return (np.array(boxes, float).reshape(-1, 4), np.array(classes, int))


def _map(dets, gts, num_classes=1, thresholds=(0.5,)):
  return dm.mean_average_precision(dets, gts, num_classes, thresholds)


def test_box_iou_hand_values():
  iou = dm.box_iou(np.array([GT_A]), np.array([GT_A, [5.0, 0.0, 15.0, 10.0], GT_B]))
  np.testing.assert_allclose(iou, [[1.0, 50 / 150, 0.0]])


def test_perfect_detections_give_one():
  gts = [_gts([GT_A, GT_B], [0, 1]), _gts([GT_B], [1])]
  dets = [_dets([GT_A, GT_B], [0.9, 0.8], [0, 1]), _dets([GT_B], [0.7], [1])]
  result = _map(dets, gts, 2, dm.COCO_IOU_THRESHOLDS)
  assert result["map"] == pytest.approx(1.0)
  np.testing.assert_allclose(result["ap_per_class"], 1.0)


def test_false_positive_ranked_first_halves_ap():
  # Ranked: FP (0.9), TP (0.8). Precision at recall 1 is 1/2 -> AP 0.5.
  result = _map([_dets([FAR, GT_A], [0.9, 0.8], [0, 0])], [_gts([GT_A], [0])])
  assert result["map"] == pytest.approx(0.5)


def test_false_positive_ranked_last_costs_nothing():
  result = _map([_dets([GT_A, FAR], [0.9, 0.1], [0, 0])], [_gts([GT_A], [0])])
  assert result["map"] == pytest.approx(1.0)


def test_missing_ground_truth_caps_recall():
  # One of two gts found (in another image): recall reaches 1/2 at precision 1 -> AP 0.5.
  dets = [_dets([GT_A], [0.9], [0]), _dets([], [], [])]
  gts = [_gts([GT_A], [0]), _gts([GT_B], [0])]
  assert _map(dets, gts)["map"] == pytest.approx(0.5)


def test_all_point_interpolation_by_hand():
  # 3 gts; ranked TP, FP, TP, FP, TP.
  # precision 1, 1/2, 2/3, 1/2, 3/5; recall 1/3, 1/3, 2/3, 2/3, 1.
  # Interpolated precision: 1 on (0, 1/3], 2/3 on (1/3, 2/3], 3/5 on (2/3, 1].
  gt_c = [40.0, 0.0, 50.0, 10.0]
  dets = [_dets([GT_A, FAR, GT_B, FAR, gt_c], [0.9, 0.8, 0.7, 0.6, 0.5], [0, 0, 0, 0, 0])]
  gts = [_gts([GT_A, GT_B, gt_c], [0, 0, 0])]
  expected = (1.0 + 2 / 3 + 3 / 5) / 3
  assert _map(dets, gts)["map"] == pytest.approx(expected)
  tp = np.array([1, 0, 1, 0, 1], bool)
  assert dm.interpolated_average_precision(tp, 3) == pytest.approx(expected)


def test_two_classes_and_class_without_ground_truth_is_excluded():
  dets = [_dets([GT_A, FAR, GT_B, FAR], [0.9, 0.95, 0.8, 0.3], [0, 1, 1, 2])]
  gts = [_gts([GT_A, GT_B], [0, 1])]
  result = _map(dets, gts, num_classes=3)
  # class 0: AP 1; class 1: FP first then TP -> 0.5; class 2: no gt -> excluded (NaN).
  np.testing.assert_allclose(result["ap_per_class"][0, :2], [1.0, 0.5])
  assert np.isnan(result["ap_per_class"][0, 2])
  assert result["map"] == pytest.approx(0.75)


def test_class_with_ground_truth_but_no_detections_counts_zero():
  result = _map([_dets([GT_A], [0.9], [0])], [_gts([GT_A, GT_B], [0, 1])], num_classes=2)
  assert result["map"] == pytest.approx(0.5)


def test_duplicate_detection_is_a_false_positive():
  # gts A, B; ranked A (TP), A again (FP: A already matched), B (TP).
  # precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> AP = 1/2 * 1 + 1/2 * 2/3.
  dets = [_dets([GT_A, GT_A, GT_B], [0.9, 0.8, 0.7], [0, 0, 0])]
  gts = [_gts([GT_A, GT_B], [0, 0])]
  assert _map(dets, gts)["map"] == pytest.approx(0.5 + 1 / 3)


def test_wrong_class_does_not_match():
  result = _map([_dets([GT_A], [0.9], [1])], [_gts([GT_A], [0])], num_classes=2)
  assert result["map"] == pytest.approx(0.0)


def test_match_falls_back_to_the_best_unmatched_ground_truth():
  # gts P = [0,0,10,10] and Q = [4,0,14,10]. Detection d1 = P matches P (IoU 1).
  # d2 = [2,0,12,10]: IoU with P 8/12, with Q 8/12... make d2 closer to P than to Q:
  # d2 = [1,0,11,10]: IoU(P) = 9/11 ~ .82, IoU(Q) = 7/13 ~ .54. P is taken, so COCO-style
  # matching gives Q (>= 0.5): both gts found, AP 1 (VOC's rule would give 0.5).
  p, q = [0.0, 0.0, 10.0, 10.0], [4.0, 0.0, 14.0, 10.0]
  dets = [_dets([p, [1.0, 0.0, 11.0, 10.0]], [0.9, 0.8], [0, 0])]
  gts = [_gts([p, q], [0, 0])]
  assert _map(dets, gts)["map"] == pytest.approx(1.0)
  # At IoU 0.6, Q is out of reach: d2 is a FP and AP is 1/2.
  assert _map(dets, gts, thresholds=(0.6,))["map"] == pytest.approx(0.5)


def test_coco_map_averages_ten_thresholds():
  # IoU 0.72: a TP at thresholds .50 .55 .60 .65 .70, a FP at .75 ... .95 -> mAP 0.5.
  dets = [_dets([[0.0, 0.0, 10.0, 7.2]], [0.9], [0])]
  gts = [_gts([GT_A], [0])]
  result = _map(dets, gts, thresholds=dm.COCO_IOU_THRESHOLDS)
  np.testing.assert_allclose(result["ap_per_threshold"], [1.0] * 5 + [0.0] * 5)
  assert result["map"] == pytest.approx(0.5)
  assert dm.COCO_IOU_THRESHOLDS == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def test_no_ground_truth_at_all_gives_nan():
  result = _map([_dets([GT_A], [0.9], [0])], [_gts([], [])])
  assert np.isnan(result["map"])


@pytest.mark.parametrize(
  "dets,gts,num_classes,thresholds,match",
  [
    ([], [_gts([GT_A], [0])], 1, (0.5,), "one entry per image"),
    ([_dets([GT_A], [0.9], [3])], [_gts([GT_A], [0])], 2, (0.5,), "classes in"),
    ([_dets([GT_A], [0.9], [0])], [_gts([[5.0, 0.0, 1.0, 1.0]], [0])], 1, (0.5,), "x1 < x0"),
    ([_dets([GT_A], [0.9, 0.1], [0])], [_gts([GT_A], [0])], 1, (0.5,), "scores"),
    ([_dets([GT_A], [0.9], [0])], [_gts([GT_A], [0])], 1, (0.0,), "iou_thresholds"),
    ([_dets([GT_A], [0.9], [0])], [_gts([GT_A], [0])], 0, (0.5,), "num_classes=0"),
  ],
)
def test_bad_inputs_raise(dets, gts, num_classes, thresholds, match):
  with pytest.raises(ValueError, match=match):
    dm.mean_average_precision(dets, gts, num_classes, thresholds)
