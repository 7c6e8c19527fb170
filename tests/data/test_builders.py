import sys

import numpy as np

from research.data import builders, embedded, street_scenes


def test_street_scenes_round_trip_through_array_record(tmp_path):
  builder = builders.street_scenes_builder(32, 3, 2, data_dir=str(tmp_path))
  files = list((tmp_path / "street_scenes").rglob("*.array_record*"))
  assert files, "ArrayRecord files were written"
  arrays = embedded.street_arrays(("fog",), "train", 32, 3, 2, data_dir=str(tmp_path))
  assert arrays["image"].shape == (3, 32, 32, 3)
  assert np.all(arrays["domain"] == street_scenes.DOMAINS.index("fog"))
  direct = [street_scenes.generate_scene(i, "fog", 32)["image"] for i in range(3)]
  # Records come back in ArrayRecord order; compare as sets of images.
  got = sorted(a.tobytes() for a in arrays["image"])
  assert got == sorted(d.tobytes() for d in direct)
  assert len(builder.as_data_source()["night_test"]) == 2
  assert "tensorflow" not in sys.modules


def test_digits_builder(tmp_path):
  arrays = embedded.digits_arrays(str(tmp_path))
  assert arrays["train"]["image"].shape == (1297, 8, 8, 1)
  assert np.bincount(arrays["test"]["label"]).tolist() == [50] * 10
  assert "tensorflow" not in sys.modules
