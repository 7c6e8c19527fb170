"""No TensorFlow: every data loader runs in a child process in which importing it fails.

TensorFlow is not installed here, but the test must also fail where it is: the child gets
`tests/reliability/faults.py`'s import blocker (`FAULT_NO_TENSORFLOW=1`). The experiment runs
of `test_resume.py` run under the same blocker.
"""

import importlib.util
import io
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from faults import ROOT, child_env


def _png(array: np.ndarray) -> bytes:
  import PIL.Image

  buffer = io.BytesIO()
  PIL.Image.fromarray(array).save(buffer, format="png")
  return buffer.getvalue()


PANOPTIC_IDS = np.array([[0, 5], [300, 5]])


def prepare_coco_panoptic(data_dir: str) -> None:
  """Writes a two-image `coco/2017_panoptic` with the TFDS features, as `tfds build` would."""
  import tensorflow_datasets as tfds

  class Coco(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.1.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="2017_panoptic")]

    def _info(self):
      image = tfds.features.Image(shape=(None, None, 3), encoding_format="png")
      objects = {"id": np.int64, "label": tfds.features.ClassLabel(num_classes=133)}
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {
            "image": image,
            "panoptic_image": image,
            "panoptic_objects": tfds.features.Sequence({**objects, "is_crowd": np.bool_}),
          }
        ),
      )

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(), "validation": self._generate_examples()}

    def _generate_examples(self):
      ids = PANOPTIC_IDS
      rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
      for i in range(2):
        yield (
          i,
          {
            "image": _png(np.full((2, 2, 3), i, np.uint8)),
            "panoptic_image": _png(rgb),
            "panoptic_objects": {"id": [5, 300], "label": [1, 90], "is_crowd": [False, True]},
          },
        )

  Coco(data_dir=data_dir, config="2017_panoptic", file_format="array_record").download_and_prepare(
    file_format="array_record"
  )


def child_checks(tmp: str) -> None:
  """Runs in the child: every loader, with `import tensorflow` failing."""
  assert importlib.util.find_spec("tensorflow") is None
  with pytest.raises(ModuleNotFoundError, match="No module named 'tensorflow'"):
    import tensorflow  # noqa: F401
  from research.data import catalogue, embedded, street_scenes

  street = embedded.street_arrays(("night",), "test", 16, 2, 3, data_dir=f"{tmp}/embedded")
  assert street["image"].shape == (3, 16, 16, 3)
  assert np.all(street["domain"] == street_scenes.DOMAINS.index("night"))
  digits = embedded.digits_arrays(f"{tmp}/embedded")
  assert np.bincount(digits["test"]["label"]).tolist() == [50] * 10
  prepare_coco_panoptic(f"{tmp}/catalogue")
  coco, num_classes = catalogue.load("coco_panoptic", "validation", f"{tmp}/catalogue")
  assert num_classes == 133 and len(coco) == 2
  np.testing.assert_array_equal(coco[1]["panoptic"], PANOPTIC_IDS)
  assert coco[1]["segment_classes"].tolist() == [1, 90]
  for name, tfds_name in [
    ("coco_panoptic", "coco/2017_panoptic"),
    ("cityscapes", "cityscapes/semantic_segmentation"),
    ("cifar10", "cifar10"),
    ("mnist", "mnist"),
  ]:
    with pytest.raises(catalogue.DatasetNotPreparedError, match=f"run `tfds build {tfds_name} "):
      catalogue.load(name, "train", f"{tmp}/empty")
  assert "tensorflow" not in sys.modules
  print("all loaders ran without TensorFlow")


def test_every_loader_runs_without_tensorflow(tmp_path: pathlib.Path):
  code = f"from test_no_tensorflow import child_checks; child_checks({str(tmp_path)!r})"
  out = subprocess.run(
    [sys.executable, "-c", code],
    cwd=ROOT,
    env=child_env(tmp_path, FAULT_NO_TENSORFLOW="1"),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "all loaders ran without TensorFlow" in out.stdout
