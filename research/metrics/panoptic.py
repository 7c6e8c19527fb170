"""Panoptic quality (PQ, SQ, RQ) by the rules of COCO panopticapi's `pq_compute` (host, numpy).

Used by METHODS.md M4 ("Measure": PQ, SQ, RQ for old classes, new classes and all).

A panoptic segmentation of one image is a segment map `[H, W]` of non-negative int ids,
`VOID = 0` meaning unlabelled, plus a table of its segments: predicted segment id ->
category, ground-truth segment id -> `(category, iscrowd)`. Categories are given once as
`{category_id: isthing}`.

Rules (panopticapi `pq_compute_single_core` and `PQStat.pq_average`):

- a predicted and a non-crowd ground-truth segment of the same category match when
  `IoU > 0.5`, with `union = pred_area + gt_area - intersection - (pred ∩ void)`: the part
  of a prediction on void ground truth does not count against it;
- unmatched non-crowd ground-truth segments are false negatives; crowd segments never are;
- an unmatched predicted segment is not a false positive when more than half of its area
  lies on void plus crowd regions of its category;
- a category enters the averages only when it has `tp + fp + fn > 0`.

Two deliberate differences, neither of which changes COCO results: segments listed in a table
but absent from the map (zero pixels) are ignored instead of raising, and when one category
has several crowd segments in an image, their areas are all used (panopticapi keeps one).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np

VOID = 0
MATCH_IOU = 0.5
IGNORED_FRACTION = 0.5


@dataclasses.dataclass
class ClassCounts:
  """Matching counts of one category, summed over images.

  Attributes:
    tp: matched (true positive) segment pairs.
    fp: unmatched, not ignored, predicted segments.
    fn: unmatched non-crowd ground-truth segments.
    iou_sum: sum of the IoUs of the true positives.
  """

  tp: int = 0
  fp: int = 0
  fn: int = 0
  iou_sum: float = 0.0


def _segment_areas(segment_map: np.ndarray) -> dict[int, int]:
  ids, areas = np.unique(segment_map, return_counts=True)
  return {int(i): int(a) for i, a in zip(ids, areas, strict=True) if i != VOID}


def _pair_intersections(gt_map: np.ndarray, pred_map: np.ndarray) -> dict[tuple[int, int], int]:
  base = int(pred_map.max()) + 1
  pairs, counts = np.unique(gt_map * base + pred_map, return_counts=True)
  return {(int(p // base), int(p % base)): int(c) for p, c in zip(pairs, counts, strict=True)}


def _scores(counts: ClassCounts) -> dict[str, float]:
  denominator = counts.tp + 0.5 * counts.fp + 0.5 * counts.fn
  if denominator == 0:
    return {"pq": 0.0, "sq": 0.0, "rq": 0.0}
  return {
    "pq": counts.iou_sum / denominator,
    "sq": counts.iou_sum / counts.tp if counts.tp else 0.0,
    "rq": counts.tp / denominator,
  }


class PanopticQuality:
  """Accumulates per-category PQ counts over images; `compute` gives PQ/SQ/RQ.

  Example:
    >>> metric = PanopticQuality({1: True, 2: False})
    >>> metric.update(pred_map, {1: 1, 2: 2}, gt_map, {5: (1, False), 6: (2, False)})
    >>> metric.compute()["all"]["pq"]
  """

  def __init__(self, categories: Mapping[int, bool]):
    """Creates an empty accumulator.

    Args:
      categories: `{category_id: isthing}` for every category that may occur.
    """
    if not categories:
      raise ValueError("categories={} is not allowed: give at least one category")
    self.categories = {int(c): bool(t) for c, t in categories.items()}
    self.counts = {c: ClassCounts() for c in self.categories}

  def _check_category(self, category: int, segment: str) -> None:
    if category not in self.categories:
      raise ValueError(
        f"category={category} of {segment} is not allowed: categories are {sorted(self.categories)}"
      )

  def update(
    self,
    pred_map: np.ndarray,
    pred_segments: Mapping[int, int],
    gt_map: np.ndarray,
    gt_segments: Mapping[int, tuple[int, bool]],
  ) -> None:
    """Adds one image.

    Args:
      pred_map: `[H, W]` non-negative int predicted segment ids, 0 = void.
      pred_segments: predicted segment id -> category.
      gt_map: `[H, W]` non-negative int ground-truth segment ids, 0 = void.
      gt_segments: ground-truth segment id -> `(category, iscrowd)`.

    Raises:
      ValueError: on maps of different shapes or with negative ids, a non-void id without a
        table entry, or an unknown category.
    """
    pred_map = np.asarray(pred_map).astype(np.int64)
    gt_map = np.asarray(gt_map).astype(np.int64)
    if pred_map.shape != gt_map.shape:
      raise ValueError(
        f"pred_map.shape={pred_map.shape} is not allowed: it must equal gt_map.shape={gt_map.shape}"
      )
    for name, segment_map in (("pred_map", pred_map), ("gt_map", gt_map)):
      if segment_map.size and segment_map.min() < 0:
        raise ValueError(f"{name} min id={segment_map.min()} is not allowed: ids must be >= 0")

    pred_areas, gt_areas = _segment_areas(pred_map), _segment_areas(gt_map)
    for name, areas, table in (
      ("pred_map", pred_areas, pred_segments),
      ("gt_map", gt_areas, gt_segments),
    ):
      missing = sorted(set(areas) - set(table))
      if missing:
        raise ValueError(f"{name} ids {missing} are not allowed: they have no segment entry")
    pred_category = {i: int(pred_segments[i]) for i in pred_areas}
    gt_category = {i: int(gt_segments[i][0]) for i in gt_areas}
    gt_crowd = {i: bool(gt_segments[i][1]) for i in gt_areas}
    for i, category in pred_category.items():
      self._check_category(category, f"predicted segment {i}")
    for i, category in gt_category.items():
      self._check_category(category, f"ground-truth segment {i}")

    intersections = _pair_intersections(gt_map, pred_map)
    gt_matched, pred_matched = set(), set()
    for (gt_id, pred_id), intersection in intersections.items():
      if gt_id == VOID or pred_id == VOID or gt_crowd[gt_id]:
        continue
      if gt_category[gt_id] != pred_category[pred_id]:
        continue
      union = (
        pred_areas[pred_id] + gt_areas[gt_id] - intersection - intersections.get((VOID, pred_id), 0)
      )
      iou = intersection / union
      if iou > MATCH_IOU:
        counts = self.counts[gt_category[gt_id]]
        counts.tp += 1
        counts.iou_sum += iou
        gt_matched.add(gt_id)
        pred_matched.add(pred_id)

    crowd_ids_by_category: dict[int, list[int]] = {}
    for gt_id, category in gt_category.items():
      if gt_crowd[gt_id]:
        crowd_ids_by_category.setdefault(category, []).append(gt_id)
      elif gt_id not in gt_matched:
        self.counts[category].fn += 1

    for pred_id, category in pred_category.items():
      if pred_id in pred_matched:
        continue
      ignored = intersections.get((VOID, pred_id), 0) + sum(
        intersections.get((crowd_id, pred_id), 0)
        for crowd_id in crowd_ids_by_category.get(category, [])
      )
      if ignored / pred_areas[pred_id] > IGNORED_FRACTION:
        continue
      self.counts[category].fp += 1

  def merge(self, other: PanopticQuality) -> None:
    """Adds the counts of another accumulator (e.g. from another host) into this one."""
    if other.categories != self.categories:
      raise ValueError("other.categories is not allowed: both accumulators need one category set")
    for category, theirs in other.counts.items():
      mine = self.counts[category]
      mine.tp += theirs.tp
      mine.fp += theirs.fp
      mine.fn += theirs.fn
      mine.iou_sum += theirs.iou_sum

  def compute(self, class_subset: Iterable[int] | None = None) -> dict:
    """PQ, SQ and RQ averaged over categories, as panopticapi's `pq_average`.

    Args:
      class_subset: categories to evaluate (e.g. the old classes of M4); all when None.

    Returns:
      `{"all" | "things" | "stuff": {"pq", "sq", "rq", "n"}, "per_class": {category: {"pq",
      "sq", "rq", "tp", "fp", "fn"}}}` over the chosen categories. `n` counts the categories
      with `tp + fp + fn > 0`, the only ones averaged; with `n == 0` the averages are NaN.
      Per-class scores of categories that never occur are 0, as in panopticapi.
    """
    chosen = list(self.categories) if class_subset is None else [int(c) for c in class_subset]
    for category in chosen:
      self._check_category(category, "class_subset")
    per_class = {
      c: {
        **_scores(self.counts[c]),
        "tp": self.counts[c].tp,
        "fp": self.counts[c].fp,
        "fn": self.counts[c].fn,
      }
      for c in chosen
    }
    groups = {
      "all": chosen,
      "things": [c for c in chosen if self.categories[c]],
      "stuff": [c for c in chosen if not self.categories[c]],
    }
    result: dict = {name: self._average(members) for name, members in groups.items()}
    result["per_class"] = per_class
    return result

  def _average(self, members: list[int]) -> dict[str, float]:
    present = [c for c in members if self._occurs(self.counts[c])]
    if not present:
      return {"pq": float("nan"), "sq": float("nan"), "rq": float("nan"), "n": 0}
    scores = [_scores(self.counts[c]) for c in present]
    averages = {k: float(np.mean([s[k] for s in scores])) for k in ("pq", "sq", "rq")}
    return {**averages, "n": len(present)}

  @staticmethod
  def _occurs(counts: ClassCounts) -> bool:
    return counts.tp + counts.fp + counts.fn > 0


def segments_from_inference(
  segment_classes: np.ndarray, segment_valid: np.ndarray
) -> dict[int, int]:
  """Segment table of `mask_matching.panoptic_inference` output: `{q + 1: class}`.

  Args:
    segment_classes: `[Q]` int class of segment `q + 1`.
    segment_valid: `[Q]` bool.

  Returns:
    Predicted segment id -> category for the valid segments.
  """
  classes, valid = np.asarray(segment_classes), np.asarray(segment_valid)
  return {int(q) + 1: int(classes[q]) for q in np.flatnonzero(valid)}


def segments_from_semantic_instance(
  semantic: np.ndarray,
  instance: np.ndarray,
  categories: Mapping[int, bool],
  *,
  ignore_label: int = 255,
) -> tuple[np.ndarray, dict[int, tuple[int, bool]]]:
  """Panoptic segments from a semantic map and an instance map.

  Every stuff category present is one segment; every (thing category, instance id > 0) is
  one segment; thing pixels with instance id 0 form one crowd segment per category (the
  Cityscapes convention). Pixels labelled `ignore_label` are void. Ids are 1, 2, ... in the
  order of (category, instance id). For predictions use `{i: c for i, (c, _) in table}`.

  Args:
    semantic: `[H, W]` int category per pixel.
    instance: `[H, W]` non-negative int instance id per pixel (ignored for stuff).
    categories: `{category_id: isthing}`.
    ignore_label: semantic value meaning void.

  Returns:
    `segment_map` `[H, W]` int32 (0 = void) and `{segment id: (category, iscrowd)}`.

  Raises:
    ValueError: on different shapes, negative instance ids or unknown categories.
  """
  semantic, instance = np.asarray(semantic, np.int64), np.asarray(instance, np.int64)
  if semantic.shape != instance.shape:
    raise ValueError(
      f"instance.shape={instance.shape} is not allowed: it must equal "
      f"semantic.shape={semantic.shape}"
    )
  if instance.size and instance.min() < 0:
    raise ValueError(f"instance min id={instance.min()} is not allowed: ids must be >= 0")
  labelled = semantic != ignore_label
  unknown = sorted(set(np.unique(semantic[labelled]).tolist()) - set(categories))
  if unknown:
    raise ValueError(
      f"semantic categories {unknown} are not allowed: categories are {sorted(categories)}"
    )

  is_thing = np.zeros(semantic.shape, bool)
  for category, thing in categories.items():
    is_thing |= (semantic == category) & bool(thing)
  base = int(instance.max(initial=0)) + 1
  keys = semantic * base + np.where(is_thing, instance, 0)
  unique_keys, inverse = np.unique(keys[labelled], return_inverse=True)
  segment_map = np.zeros(semantic.shape, np.int32)
  segment_map[labelled] = inverse.reshape(-1) + 1
  table = {}
  for index, key in enumerate(unique_keys.tolist()):
    category, instance_id = divmod(key, base)
    table[index + 1] = (category, bool(categories[category]) and instance_id == 0)
  return segment_map, table
