"""Classification arrays of a config's `data` block: the embedded digits or a catalogue set."""

from __future__ import annotations

from typing import Any

import ml_collections

from research.data import catalogue, digits, embedded


def load_classification_data(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Train/test arrays, class count and names for `config.data` (embedded or catalogue).

  A long-tailed training subset is taken when `data.imbalance_ratio` > 1.

  Returns:
    {"train": {"image": [N, H, W, C] uint8, "label": [N]}, "test": {...}, "num_classes": K,
    "class_names": (K names)}.
  """
  name = config.data.name
  if name == "digits":
    arrays = embedded.digits_arrays(config.data.data_dir or None)
    num_classes, names = digits.NUM_CLASSES, digits.CLASS_NAMES
  else:
    arrays = {}
    for split in ("train", "test"):
      source, num_classes = catalogue.load(name, split, config.data.data_dir or None)
      arrays[split] = embedded.to_arrays(source)
    names = tuple(str(i) for i in range(num_classes))
  if config.data.imbalance_ratio > 1:
    labels = arrays["train"]["label"]
    if name == "digits":
      keep = digits.long_tailed_indices(labels, config.data.imbalance_ratio, seed=0)
    else:
      keep = catalogue.long_tailed_subset(labels, config.data.imbalance_ratio)
    arrays["train"] = {k: v[keep] for k, v in arrays["train"].items()}
  return {
    "train": arrays["train"],
    "test": arrays["test"],
    "num_classes": num_classes,
    "class_names": names,
  }
