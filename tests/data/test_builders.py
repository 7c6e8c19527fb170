import signal
import subprocess
import sys
import time

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


def test_processes_sharing_a_data_dir_prepare_it_once(tmp_path):
  # pytest-xdist workers (and hosts of one job) prepare the same cache at the same time.
  code = (
    "import sys; from research.data import builders; "
    "b = builders.street_scenes_builder(16, 40, 2, data_dir=sys.argv[1]); "
    "print(len(b.as_data_source()['day_train']))"
  )
  procs = [
    subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    for _ in range(3)
  ]
  outputs = [p.communicate(timeout=300)[0].split()[-1] for p in procs]  # tfds prints first
  assert [p.returncode for p in procs] == [0, 0, 0]
  assert outputs == ["40"] * 3
  assert not list((tmp_path / "street_scenes").glob("*incomplete*"))


def test_declared_street_scenes_size_is_the_declared_config(tmp_path):
  # The full-size configs ask for the declared 64/400/100 config; TFDS refuses a second config
  # object with a declared config's name.
  config = builders.street_scenes_config(64, 400, 100)
  builder = builders.StreetScenes(config=config, data_dir=str(tmp_path))
  assert builder.builder_config is builders.StreetScenes.BUILDER_CONFIGS[0]
  assert builders.street_scenes_config(32, 8, 8).name == "s32_tr8_te8"


def test_interrupted_preparation_is_cleaned_up_on_the_next_run(tmp_path):
  code = (
    "import sys; from research.data import builders; "
    "builders.street_scenes_builder(16, 600, 2, data_dir=sys.argv[1])"
  )
  child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)])
  deadline = time.monotonic() + 120
  while not list((tmp_path / "street_scenes").glob("*/incomplete.*")):
    assert child.poll() is None, "the preparation ended before it could be interrupted"
    assert time.monotonic() < deadline
    time.sleep(0.02)
  child.send_signal(signal.SIGKILL)
  child.wait()
  assert list((tmp_path / "street_scenes").glob("*/incomplete.*"))  # left behind by the kill
  builder = builders.street_scenes_builder(16, 600, 2, data_dir=str(tmp_path))
  assert len(builder.as_data_source()["rain_train"]) == 600
  assert not list((tmp_path / "street_scenes").glob("*/incomplete.*"))
