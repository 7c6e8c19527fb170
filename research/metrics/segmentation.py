"""Semantic segmentation metrics from a confusion matrix: IoU per class, mIoU, pixel accuracy."""

from __future__ import annotations

import numpy as np


def per_class_iou(confusion: np.ndarray) -> np.ndarray:
  """[K] intersection over union per class (NaN for a class absent from labels and predictions).

  Args:
    confusion: [K, K] counts, rows = true class, columns = predicted class (ignore pixels
      excluded).
  """
  tp = np.diag(confusion).astype(np.float64)
  union = confusion.sum(0) + confusion.sum(1) - tp
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(union > 0, tp / union, np.nan)


def segmentation_summary(confusion: np.ndarray) -> dict[str, float]:
  """MIoU (mean over classes present in labels or predictions) and pixel accuracy."""
  return {
    "miou": float(np.nanmean(per_class_iou(confusion))),
    "pixel_accuracy": float(np.trace(confusion) / max(confusion.sum(), 1)),
  }
