import numpy as np
from sklearn.metrics import confusion_matrix as sk_confusion

from research.metrics import classification as cm
from research.metrics import segmentation as sm


def test_confusion_matrix_matches_sklearn():
  rng = np.random.default_rng(0)
  y, p = rng.integers(0, 5, 300), rng.integers(0, 5, 300)
  np.testing.assert_array_equal(cm.confusion_matrix(y, p, 5), sk_confusion(y, p, labels=range(5)))


def test_ignore_label_is_skipped_and_summary():
  conf = cm.confusion_matrix(np.array([0, 1, 255, 1]), np.array([0, 0, 1, 1]), 2)
  np.testing.assert_array_equal(conf, [[1, 0], [1, 1]])
  s = cm.classification_summary(conf)
  assert s["accuracy"] == 2 / 3 and s["worst_class_accuracy"] == 0.5


def test_iou_by_hand():
  # class 0: tp 3, fp 1, fn 2 -> 3/6; class 1: tp 4, fp 2, fn 1 -> 4/7; class 2 absent.
  conf = np.array([[3, 2, 0], [1, 4, 0], [0, 0, 0]])
  iou = sm.per_class_iou(conf)
  np.testing.assert_allclose(iou[:2], [3 / 6, 4 / 7])
  assert np.isnan(iou[2])
  s = sm.segmentation_summary(conf)
  np.testing.assert_allclose(s["miou"], (3 / 6 + 4 / 7) / 2)
  np.testing.assert_allclose(s["pixel_accuracy"], 7 / 10)
