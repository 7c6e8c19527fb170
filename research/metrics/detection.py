"""Detection average precision: VOC-style AP@0.5 and COCO-style mAP@[.5:.95] (numpy, host side).

The measure of METHODS.md M5 ("detection mAP@0.5 on clean / noisy / attacked images").

Conventions:

- Boxes are ``(x0, y0, x1, y1)`` in continuous pixel coordinates; area ``(x1 - x0) (y1 - y0)``
  (no VOC ``+1``).
- Per class and IoU threshold, detections of all images are ranked by descending score (ties
  keep input order) and matched greedily: a detection takes, among the not-yet-matched ground
  truths of its image and class, the one with the highest IoU, if that IoU >= threshold (COCO's
  rule; VOC instead counts a detection whose best-IoU ground truth is already taken as a false
  positive). Each ground truth is matched at most once; unmatched detections are false
  positives. There is no crowd/ignore handling.
- AP is the all-point interpolated area under the precision/recall curve (VOC 2010+, and COCO
  without its 101-point sampling): precision made monotone from the right, summed over recall
  steps.
- Classes without any ground-truth box are excluded from the mean (their AP is NaN);
  classes with ground truth but no detections have AP 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

COCO_IOU_THRESHOLDS = tuple(np.round(np.linspace(0.5, 0.95, 10), 2).tolist())

Detections = tuple[np.ndarray, np.ndarray, np.ndarray]  # boxes [n, 4], scores [n], classes [n]
GroundTruths = tuple[np.ndarray, np.ndarray]  # boxes [m, 4], classes [m]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Pairwise IoU.

  Args:
    a: ``[n, 4]`` boxes ``(x0, y0, x1, y1)``.
    b: ``[m, 4]`` boxes.

  Returns:
    ``[n, m]`` IoU (0 where the union is empty).
  """
  a = np.asarray(a, np.float64).reshape(-1, 4)
  b = np.asarray(b, np.float64).reshape(-1, 4)
  x0 = np.maximum(a[:, None, 0], b[None, :, 0])
  y0 = np.maximum(a[:, None, 1], b[None, :, 1])
  x1 = np.minimum(a[:, None, 2], b[None, :, 2])
  y1 = np.minimum(a[:, None, 3], b[None, :, 3])
  inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
  area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
  area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
  union = area_a[:, None] + area_b[None, :] - inter
  return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def interpolated_average_precision(tp: np.ndarray, num_gt: int) -> float:
  """All-point interpolated AP from ranked true-positive flags.

  Args:
    tp: ``[n]`` bool, whether the i-th ranked detection is a true positive.
    num_gt: number of ground-truth boxes (> 0).

  Returns:
    AP in [0, 1].
  """
  tp = np.asarray(tp, bool)
  if tp.size == 0:
    return 0.0
  cum_tp = np.cumsum(tp)
  recall = cum_tp / num_gt
  precision = cum_tp / np.arange(1, tp.size + 1)
  recall = np.concatenate([[0.0], recall])
  precision = np.concatenate([[0.0], precision])
  precision = np.maximum.accumulate(precision[::-1])[::-1]
  return float(np.sum((recall[1:] - recall[:-1]) * precision[1:]))


def _match(
  det_boxes: list[np.ndarray],
  gt_boxes: list[np.ndarray],
  order: np.ndarray,
  image_of: np.ndarray,
  index_in_image: np.ndarray,
  iou_threshold: float,
) -> np.ndarray:
  """Greedy matching of ranked detections of one class; returns ``[n]`` true-positive flags."""
  ious = [box_iou(d, g) for d, g in zip(det_boxes, gt_boxes, strict=True)]
  taken = [np.zeros(len(g), bool) for g in gt_boxes]
  tp = np.zeros(order.size, bool)
  for rank, det in enumerate(order):
    image, row = image_of[det], index_in_image[det]
    if not taken[image].size:
      continue
    candidates = np.where(taken[image], -1.0, ious[image][row])
    best = int(np.argmax(candidates))
    if candidates[best] >= iou_threshold:
      taken[image][best] = True
      tp[rank] = True
  return tp


def _validate(
  detections: Sequence[Detections],
  ground_truths: Sequence[GroundTruths],
  num_classes: int,
  iou_thresholds: Sequence[float],
) -> None:
  if len(detections) != len(ground_truths):
    raise ValueError(
      f"detections has {len(detections)} images and ground_truths {len(ground_truths)}: "
      "there must be one entry per image in both"
    )
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"num_classes={num_classes} is not allowed: num_classes must be an int >= 1")
  if len(iou_thresholds) == 0 or not all(0 < t <= 1 for t in iou_thresholds):
    raise ValueError(
      f"iou_thresholds={tuple(iou_thresholds)} is not allowed: iou_thresholds must be a "
      "non-empty sequence of numbers in (0, 1]"
    )
  for i, ((boxes, scores, classes), (gt_boxes, gt_classes)) in enumerate(
    zip(detections, ground_truths, strict=True)
  ):
    for name, b, c in (("detections", boxes, classes), ("ground_truths", gt_boxes, gt_classes)):
      b, c = np.asarray(b), np.asarray(c)
      if b.ndim != 2 or b.shape[1] != 4 or c.shape != b.shape[:1]:
        raise ValueError(
          f"{name}[{i}] has boxes {b.shape} and classes {c.shape}: they must be [n, 4] and [n]"
        )
      if c.size and (c.min() < 0 or c.max() >= num_classes):
        raise ValueError(
          f"{name}[{i}] has classes in [{c.min()}, {c.max()}]: they must be in "
          f"[0, num_classes={num_classes})"
        )
      if b.size and np.any((b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1]) | ~np.isfinite(b).all(1)):
        raise ValueError(f"{name}[{i}] has a box with x1 < x0, y1 < y0 or a non-finite coordinate")
    if np.asarray(scores).shape != np.asarray(boxes).shape[:1]:
      raise ValueError(
        f"detections[{i}] has scores {np.asarray(scores).shape}: they must be [n] like its boxes"
      )


def mean_average_precision(
  detections: Sequence[Detections],
  ground_truths: Sequence[GroundTruths],
  num_classes: int,
  iou_thresholds: Sequence[float] = (0.5,),
) -> dict[str, np.ndarray | float]:
  """Mean average precision over classes (and IoU thresholds).

  ``iou_thresholds=(0.5,)`` gives VOC-style mAP@0.5; ``COCO_IOU_THRESHOLDS`` gives COCO-style
  mAP@[.5:.95] (the mean over the 10 thresholds of the per-threshold class means).

  Args:
    detections: per image ``(boxes [n, 4], scores [n], classes [n])`` (any ``n``, e.g. the
      ``top_k`` output of ``decode_detections``).
    ground_truths: per image ``(boxes [m, 4], classes [m])`` (padding already removed).
    num_classes: number of classes K.
    iou_thresholds: IoU thresholds in (0, 1].

  Returns:
    ``{'map': float, 'ap_per_threshold': [T], 'ap_per_class': [T, K]}``; ``ap_per_class`` is
    NaN for classes without ground truth, which are left out of every mean. ``map`` is NaN
    when no class has ground truth.
  """
  _validate(detections, ground_truths, num_classes, iou_thresholds)
  ap = np.full((len(iou_thresholds), num_classes), np.nan)
  for k in range(num_classes):
    det_boxes, det_scores, gt_boxes = [], [], []
    for (boxes, scores, classes), (g_boxes, g_classes) in zip(
      detections, ground_truths, strict=True
    ):
      keep = np.asarray(classes) == k
      det_boxes.append(np.asarray(boxes, np.float64).reshape(-1, 4)[keep])
      det_scores.append(np.asarray(scores, np.float64).reshape(-1)[keep])
      gt_boxes.append(np.asarray(g_boxes, np.float64).reshape(-1, 4)[np.asarray(g_classes) == k])
    num_gt = sum(len(g) for g in gt_boxes)
    if num_gt == 0:
      continue
    image_of = np.concatenate([np.full(len(s), i) for i, s in enumerate(det_scores)]).astype(int)
    index_in_image = np.concatenate([np.arange(len(s)) for s in det_scores]).astype(int)
    order = np.argsort(-np.concatenate(det_scores), kind="stable")
    for t, threshold in enumerate(iou_thresholds):
      tp = _match(det_boxes, gt_boxes, order, image_of, index_in_image, threshold)
      ap[t, k] = interpolated_average_precision(tp, num_gt)
  has_gt = ~np.isnan(ap[0])
  per_threshold = (
    np.mean(ap[:, has_gt], axis=1) if has_gt.any() else np.full(len(iou_thresholds), np.nan)
  )
  return {
    "map": float(np.mean(per_threshold)),
    "ap_per_threshold": per_threshold,
    "ap_per_class": ap,
  }
