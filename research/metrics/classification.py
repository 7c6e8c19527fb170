"""Accuracy, per-class accuracy and the confusion matrix (numpy, host side)."""

from __future__ import annotations

import numpy as np


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
  """[K, K] int64 counts, rows = true class, columns = predicted class.

  Entries of `labels` outside [0, K) (e.g. an ignore label) are skipped.
  """
  labels = np.asarray(labels).ravel().astype(np.int64)
  predictions = np.asarray(predictions).ravel().astype(np.int64)
  keep = (labels >= 0) & (labels < num_classes)
  flat = labels[keep] * num_classes + predictions[keep]
  return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
  """Fraction of examples predicted correctly."""
  return float(np.mean(np.asarray(labels) == np.asarray(predictions)))


def per_class_accuracy(confusion: np.ndarray) -> np.ndarray:
  """[K] recall of each class (NaN for a class without examples)."""
  support = confusion.sum(1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(support > 0, np.diag(confusion) / support, np.nan)


def classification_summary(confusion: np.ndarray) -> dict[str, float]:
  """Accuracy, mean per-class accuracy and worst-class accuracy from a confusion matrix."""
  per_class = per_class_accuracy(confusion)
  return {
    "accuracy": float(np.trace(confusion) / max(confusion.sum(), 1)),
    "mean_class_accuracy": float(np.nanmean(per_class)),
    "worst_class_accuracy": float(np.nanmin(per_class)),
  }
