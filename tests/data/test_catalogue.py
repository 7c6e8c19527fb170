import numpy as np
import pytest
import tensorflow_datasets as tfds

from research.data import catalogue


@pytest.mark.parametrize(
  "name,num_classes,shape",
  [("cifar10", 10, (32, 32, 3)), ("cifar100", 100, (32, 32, 3)), ("mnist", 10, (28, 28, 1))],
)
def test_classification_adapters_on_mock_data(name, num_classes, shape):
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    source, k = catalogue.load(name, "train", "/nonexistent")
    example = source[0]
    batch = source.__getitems__([0, 1, 2])
  assert k == num_classes and len(source) == 6 and len(batch) == 3
  assert example["image"].shape == shape and example["image"].dtype == np.uint8
  assert 0 <= example["label"] < num_classes


def test_cityscapes_adapter_maps_label_ids_to_train_ids():
  with tfds.testing.mock_data(num_examples=2, policy=tfds.testing.MockPolicy.USE_CODE):
    source, k = catalogue.load("cityscapes", "validation", "/nonexistent")
    example = source[0]
  assert k == 19
  sem = example["semantic"]
  assert sem.shape == example["image"].shape[:2]
  assert set(np.unique(sem)) <= set(range(19)) | {255}
  record = {
    "image_left": np.zeros((2, 3, 3), np.uint8),
    "segmentation_label": np.array([[7, 8, 0], [26, 33, 1]], np.uint8)[..., None],
  }
  np.testing.assert_array_equal(
    catalogue._cityscapes_example(record)["semantic"], [[0, 1, 255], [13, 18, 255]]
  )


def test_coco_panoptic_record_conversion():
  ids = np.array([[0, 5], [300, 5]])
  rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
  record = {
    "image": np.zeros((2, 2, 3), np.uint8),
    "panoptic_image": rgb,
    "panoptic_objects": {"id": [5, 300], "label": [1, 90], "is_crowd": [False, True]},
  }
  out = catalogue.coco_panoptic_example(record)
  np.testing.assert_array_equal(out["panoptic"], ids)
  assert out["segment_classes"].tolist() == [1, 90]
  assert out["segment_is_crowd"].tolist() == [False, True]


def test_missing_dataset_says_how_to_prepare(tmp_path):
  with pytest.raises(catalogue.DatasetNotPreparedError, match="tfds build mnist"):
    catalogue.load("mnist", "train", str(tmp_path))


def test_unknown_dataset():
  with pytest.raises(ValueError, match="dataset='imagenet'"):
    catalogue.load("imagenet", "train", None)


def test_long_tailed_subset_uses_largest_class_as_n_max():
  labels = np.repeat(np.arange(10), 50)
  idx = catalogue.long_tailed_subset(labels, 10.0)
  counts = np.bincount(labels[idx])
  assert counts[0] == 50 and counts[-1] == 5
