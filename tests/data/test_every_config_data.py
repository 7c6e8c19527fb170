"""Every config at every size validates and builds (or finds) its data source.

Embedded street scenes are asked for at the config's own sizes: the builder is created with
that config (which is what failed for the full-size configs), then a two-images-per-domain set
of the same image size stands in for the generated files, so that the full sizes need no
minutes of generation. The digits are prepared for real. A catalogue dataset that is not
prepared must fail with the sentence that says how to prepare it.
"""

import importlib
import pathlib
import sys

import pytest

from research import experiments
from research.data import builders, catalogue, detection, panoptic
from research.data.classification import load_classification_data
from research.data.segmentation import load_segmentation_data
from research.long_tail import experiment as long_tail
from research.uap_segmentation import data as uap_data

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = sorted(
  p.stem for p in (ROOT / "configs").glob("*.py") if p.stem not in ("__init__", "sizes", "common")
)


def validate(config):
  """The experiment's up-front config check (its typed settings, or the baselines' validate)."""
  module = sys.modules[experiments.get_train_and_evaluate(config.experiment).__module__]
  if module.__name__.startswith("research.supervised."):
    return module.validate(config)
  package = module.__name__.rpartition(".")[0]
  return importlib.import_module(f"{package}.settings").Settings.from_config(config)


def load_data(config):
  """The data every run of `config` loads, as its experiment loads it."""
  name = config.experiment
  if name in ("supervised_classification", "norm_selection"):
    return [load_classification_data(config)]
  if name == "long_tail":
    ratios = config.data.imbalance_ratios
    return [load_classification_data(long_tail.config_for_ratio(config, r)) for r in ratios]
  if name == "supervised_segmentation":
    return [load_segmentation_data(config)]
  if name == "uap_segmentation":
    return [uap_data.load_uap_data(config)]
  if name == "incremental_panoptic":
    return [panoptic.load_panoptic_data(config)]
  if name == "ot_perturbation" and config.task == "detection":
    return [detection.load_detection_data(config)]
  assert name == "ot_perturbation", f"no data loader known for experiment {name!r}"
  return [load_classification_data(config)]


@pytest.fixture(scope="module")
def street_stand_in(tmp_path_factory):
  """Replaces street-scene generation by a small stand-in; records the requested configs."""
  stand_in_dir = str(tmp_path_factory.mktemp("street_stand_in"))
  prepared_builder = builders.prepared_builder
  requested = []

  def small_street_scenes(make_builder, data_dir):
    builder = make_builder()  # the builder the config asks for, created as the run creates it
    if not isinstance(builder, builders.StreetScenes):
      return prepared_builder(make_builder, data_dir)
    requested.append(builder.builder_config)
    small = builders.street_scenes_config(builder.builder_config.image_size, 2, 2)
    return prepared_builder(
      lambda: builders.StreetScenes(
        config=small, data_dir=stand_in_dir, file_format=builders.FILE_FORMAT
      ),
      stand_in_dir,
    )

  patch = pytest.MonkeyPatch()
  patch.setattr(builders, "prepared_builder", small_street_scenes)
  yield requested
  patch.undo()


@pytest.mark.parametrize("size", [None, "demo", "smoke"])
@pytest.mark.parametrize("name", CONFIGS)
def test_config_validates_and_finds_its_data(name, size, street_stand_in):
  config = importlib.import_module(f"configs.{name}").get_config(size)
  validate(config)
  street_stand_in.clear()
  if config.data.name in catalogue.KNOWN + ("cifar10_lt", "cifar100_lt"):
    with pytest.raises(catalogue.DatasetNotPreparedError, match="run `tfds build "):
      load_data(config)
    return
  loaded = load_data(config)
  assert loaded and all(data for data in loaded)
  if config.data.name == "street_scenes":
    d = config.data
    wanted = (d.image_size, d.train_per_domain, d.test_per_domain)
    assert street_stand_in, "the street-scene builder was never asked for"
    assert {(c.image_size, c.train_per_domain, c.test_per_domain) for c in street_stand_in} == {
      wanted
    }
