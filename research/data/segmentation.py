"""Segmentation arrays of a config's `data` block: the embedded street scenes or Cityscapes."""

from __future__ import annotations

from typing import Any

import ml_collections

from research.data import catalogue, embedded, street_scenes


def load_segmentation_data(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{"train", "test": {domain: arrays}, "num_classes", "class_names"} for `config.data`."""
  d = config.data
  if d.name == "cityscapes":
    train, num_classes = catalogue.load("cityscapes", "train", d.data_dir or None)
    test, _ = catalogue.load("cityscapes", "validation", d.data_dir or None)
    return {
      "train": embedded.to_arrays(train),
      "test": {"validation": embedded.to_arrays(test)},
      "num_classes": num_classes,
      "class_names": catalogue.CITYSCAPES_CLASS_NAMES,
    }
  kwargs = dict(
    image_size=d.image_size,
    train_per_domain=d.train_per_domain,
    test_per_domain=d.test_per_domain,
    data_dir=d.data_dir or None,
  )
  train = embedded.street_arrays(tuple(d.train_domains), "train", **kwargs)
  test = {
    dom: embedded.street_arrays((dom,), "test", **kwargs)
    for dom in tuple(d.train_domains) + tuple(d.heldout_domains)
  }
  return {
    "train": train,
    "test": test,
    "num_classes": street_scenes.NUM_CLASSES,
    "class_names": street_scenes.CLASS_NAMES,
  }
