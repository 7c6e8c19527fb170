"""M1 experiment: smoke end-to-end runs, config errors, and its new pure functions vs numpy."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import uap_cityscapes, uap_street
from research import config_checks
from research.models.resnet import Segmenter
from research.study.results import Results
from research.uap_segmentation import core, evaluation, experiment, report
from research.uap_segmentation import data as uap_data
from research.uap_segmentation.settings import Settings


def test_street_smoke_end_to_end(tmp_path):
  config = uap_street.get_config("smoke")
  summary = experiment.train_and_evaluate(config, str(tmp_path))
  assert len(summary["rows"]) == 3
  for row in summary["rows"]:
    assert 0.0 <= row["value"] <= 1.0 and 0.0 <= row["baseline_value"] <= 1.0
  metrics = summary["metrics"]
  assert set(metrics) == {report.label(a, c) for a, c in experiment.EVALUATIONS}
  # The control trains the same steps on clean images only, so its parameters differ.
  held_in = summary["bars"]["held-out images"]
  assert (tmp_path / "seed0_clean_finetune_checkpoints").exists()
  assert held_in["success_ratio_ceiling"] * held_in["success_noise"] == pytest.approx(1.0)
  assert metrics["control R"] != metrics["adv R"]
  assert metrics["control R'"] != metrics["adv R'"]  # each model has its own fresh R'
  assert set(metrics["clean"]) == {
    "day (held-out images)",
    "dusk (held-out images)",
    "fog (held-out images)",
    "night (held-out domain)",
  }
  # gamma and eps_r were chosen from the grid on the validation split only.
  chosen = summary["chosen"]["0"]
  assert chosen["gamma_scale"] in config.tune.gamma_scales and chosen["eps_r"] in config.tune.eps_rs
  results = Results.load(tmp_path)
  tuned = {r.split for r in results.records if r.condition.startswith("gamma=")}
  assert tuned == {"day (validation)", "dusk (validation)", "fog (validation)"}
  claims = {c["claim"] for c in summary["comparisons"]}
  assert "claim 5: random term in every round" in claims
  assert "claims 3/7: random term in R" in claims
  assert json.loads((tmp_path / "summary.json").read_text())["experiment"] == "uap_segmentation"
  for name in ("perturbations.png", "overlays.png", "per_class_iou.png"):
    assert (tmp_path / "plots" / name).exists()
  text = (tmp_path / "report.md").read_text()
  assert "noise control" in text and "Per-class IoU" in text and "Paired verdicts" in text
  perts = np.load(tmp_path / "perturbations.npz")
  xi = config.attack.xi
  assert np.max(np.abs(perts["R"])) <= xi + 1e-7
  np.testing.assert_allclose(np.abs(perts["noise"]), np.max(np.abs(perts["R"])), rtol=1e-6)
  # R and R without its random term differ only by that term.
  assert not np.allclose(perts["R"], perts[report.R_NO_RANDOM])
  # The report is rebuilt from the saved results alone, to the same text and summary.
  (tmp_path / "report.md").unlink()
  rebuilt = report.write_report(Results.load(tmp_path), str(tmp_path))
  assert (tmp_path / "report.md").read_text() == text
  assert json.dumps(rebuilt, default=str) == json.dumps(summary, default=str)


def test_cityscapes_smoke_end_to_end_on_mock_data(tmp_path):
  config = uap_cityscapes.get_config("smoke")
  config.data.data_dir = str(tmp_path / "tfds")
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    summary = experiment.train_and_evaluate(config, str(tmp_path / "run"))
  assert set(summary["metrics"]["clean"]) == {
    "train_part0 (held-out images)",
    "train_part1 (held-out images)",
    "train_part2 (held-out images)",
    "validation (held-out domain)",
  }
  perts = np.load(tmp_path / "run" / "perturbations.npz")
  assert perts["R"].shape == (32, 64, 3)


def _street(**changes):
  config = uap_street.get_config("smoke")
  for field, value in changes.items():
    parent = config
    *path, last = field.split(".")
    for part in path:
      parent = parent[part]
    parent[last] = value
  return config


@pytest.mark.parametrize(
  "changes,match",
  [
    ({"attack.pairs": (("sidewalk", "lorry"),)}, "class 'lorry' is unknown"),
    ({"attack.xi": 0.0}, r"config.attack.xi=0.0 is not allowed"),
    ({"attack.xi": 1.5}, r"config.attack.xi=1.5 is not allowed"),
    ({"attack.alpha": 2.0}, r"config.attack.alpha=2.0 is not allowed"),
    ({"data.train_domains": ()}, r"config.data.train_domains=\(\) is not allowed"),
    ({"data.heldout_domains": ("day",)}, "also training domains"),
    ({"data.image_size": 31}, r"config.data.image_size=\(31, 31\) is not allowed"),
    ({"attack.weight_mode": "best"}, "config.attack.weight_mode='best' is not allowed"),
    ({"adv_train.ratio": 1.5}, r"config.adv_train.ratio=1.5 is not allowed"),
    ({"attack.eps_round": -0.1}, r"config.attack.eps_round=-0.1 is not allowed"),
    ({"attack.correct_pixels": "tgt"}, "config.attack.correct_pixels='tgt' is not allowed"),
    ({"tune.gamma_scales": (1.0, 0.0)}, r"config.tune.gamma_scales=\(1.0, 0.0\) is not allowed"),
    ({"tune.gamma_scales": ()}, r"config.tune.gamma_scales=\(\) is not allowed"),
    ({"tune.eps_rs": (-0.01,)}, r"config.tune.eps_rs=\(-0.01,\) is not allowed"),
    ({"tune.val_per_dataset": 0}, "config.tune.val_per_dataset=0 is not allowed"),
    ({"num_seeds": 0}, "config.num_seeds=0 is not allowed"),
    ({"ablation_attacks": ("gamma",)}, r"config.ablation_attacks=\('gamma',\) is not allowed"),
    (
      {"attack.eps_round": 0.0, "ablation_attacks": ("eps_round",)},
      "config.attack.eps_round=0 is not allowed with it",
    ),
  ],
)
def test_config_errors_name_field_and_value(changes, match):
  with pytest.raises(config_checks.ConfigError, match=match):
    Settings.from_config(_street(**changes))


def test_seeds_follow_seed_and_num_seeds():
  settings = Settings.from_config(_street(seed=5, num_seeds=3))
  assert settings.seeds == (5, 6, 7)
  assert settings.attack.eps_round > 0 and settings.attack.correct_pixels == "all"
  assert all(e > 0 for e in settings.unify.eps_rs)  # claims 3/7: R's random term on by default


def test_carve_validation_moves_the_last_images_out_of_training():
  def arrays(n, start):
    return {
      "image": np.arange(start, start + n, dtype=np.uint8)[:, None, None, None]
      * np.ones((1, 2, 2, 3), np.uint8),
      "semantic": np.zeros((n, 2, 2), np.uint8),
    }

  data = {"train": {"a": arrays(5, 0), "b": arrays(2, 10)}, "test": {}, "train_all": None}
  out = uap_data.carve_validation(data, 3)
  assert out["val"]["a"]["image"][:, 0, 0, 0].tolist() == [2, 3, 4]
  assert out["train"]["a"]["image"][:, 0, 0, 0].tolist() == [0, 1]
  assert out["val"]["b"]["image"][:, 0, 0, 0].tolist() == [11]  # one training image stays
  assert out["train_all"]["image"][:, 0, 0, 0].tolist() == [0, 1, 10]
  seen = set(out["train_all"]["image"][:, 0, 0, 0].tolist())
  assert not seen & {v for d in out["val"].values() for v in d["image"][:, 0, 0, 0].tolist()}


def test_cityscapes_config_needs_a_resize():
  config = uap_cityscapes.get_config("smoke")
  config.data.resize = ()
  with pytest.raises(config_checks.ConfigError, match=r"config.data.resize=\(\) is not allowed"):
    Settings.from_config(config)


def test_different_image_sizes_across_datasets_fail():
  with pytest.raises(ValueError, match="image sizes differ across datasets"):
    core.check_same_image_size([(4, 32, 32, 3), (4, 16, 32, 3)])


def test_resize_labels_matches_numpy_loop(rng):
  labels = np.asarray(jax.random.randint(rng, (2, 7, 10), 0, 255), np.uint8)
  out = uap_data.resize_labels(labels, (4, 6))
  expected = np.zeros((2, 4, 6), np.uint8)
  for b in range(2):
    for i in range(4):
      for j in range(6):
        expected[b, i, j] = labels[b, int((i + 0.5) * 7 / 4), int((j + 0.5) * 10 / 6)]
  np.testing.assert_array_equal(out, expected)


def test_resize_images_shape_dtype_and_constant_colour():
  image = np.broadcast_to(np.array([10, 128, 250], np.uint8), (64, 128, 3))
  out = uap_data.resize_images(image, (16, 32))
  assert out.shape == (16, 32, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, np.broadcast_to(image[0, 0], (16, 32, 3)))


def test_sign_noise_like_has_the_same_linf_norm(rng):
  r = np.asarray(jax.random.uniform(rng, (8, 8, 3), minval=-0.02, maxval=0.03))
  noise = evaluation.sign_noise_like(jax.random.key(1), r)
  np.testing.assert_allclose(np.abs(noise), np.max(np.abs(r)), rtol=1e-6)
  assert 0.3 < np.mean(noise > 0) < 0.7


def test_perturbed_eval_step_matches_numpy_counts(rng):
  model = Segmenter(4, (1, 1), (8, 8), 8)
  params_rng, image_rng, label_rng, pert_rng = jax.random.split(rng, 4)
  images = np.asarray(jax.random.randint(image_rng, (3, 8, 8, 3), 0, 256), np.uint8)
  labels = np.asarray(jax.random.randint(label_rng, (3, 8, 8), 0, 4), np.uint8)
  labels[0, 0, :3] = 255
  pert = np.asarray(jax.random.uniform(pert_rng, (8, 8, 3), minval=-0.1, maxval=0.1))
  params = model.init(params_rng, jnp.zeros((1, 8, 8, 3)))["params"]
  pairs = np.array([[1, 0], [3, 2]], np.int32)
  valid = np.array([True, True, False])
  out = evaluation.perturbed_eval_step(
    (params, jnp.asarray(pert)),
    {"image": images, "semantic": labels, "valid": valid},
    model=model,
    num_classes=4,
    pairs=jnp.asarray(pairs),
  )

  def predict(x):
    logits = model.apply({"params": params}, jnp.asarray(x, jnp.float32))["logits"]
    return np.asarray(logits).argmax(-1)

  preds = predict(np.clip(images / 255.0 + pert, 0.0, 1.0))
  clean = predict(images / 255.0)
  assert np.any(preds != clean)
  confusion = np.zeros((4, 4), np.int64)
  hits, targeted, flips, flippable = (np.zeros((3, 2), np.int64) for _ in range(4))
  for b in range(3):
    for i in range(8):
      for j in range(8):
        y = labels[b, i, j]
        if not valid[b] or y == 255:
          continue
        confusion[y, preds[b, i, j]] += 1
        for p, (src, tgt) in enumerate(pairs):
          if y == src:
            targeted[b, p] += 1
            hits[b, p] += preds[b, i, j] == tgt
            if clean[b, i, j] != tgt:
              flippable[b, p] += 1
              flips[b, p] += preds[b, i, j] == tgt
  np.testing.assert_array_equal(out["confusion"], confusion)
  np.testing.assert_array_equal(out["hits"], hits)
  np.testing.assert_array_equal(out["targeted"], targeted)
  np.testing.assert_array_equal(out["flips"], flips)
  np.testing.assert_array_equal(out["flippable"], flippable)


def test_mixed_adversarial_batch_matches_numpy(rng):
  images = np.asarray(jax.random.randint(rng, (4, 5, 5, 3), 0, 256), np.uint8)
  labels = np.arange(4 * 25).reshape(4, 5, 5) % 7
  pert = np.full((5, 5, 3), 0.1, np.float32)
  pert[0, 0] = -0.2
  out = core.mixed_adversarial_batch({"image": images, "semantic": labels}, pert, ratio=0.5)
  x = images / 255.0
  expected = np.concatenate([x[:2], np.clip(x[2:] + pert, 0.0, 1.0)])
  np.testing.assert_allclose(out["image"], expected, atol=1e-6)
  np.testing.assert_array_equal(out["semantic"], labels)


def test_adversarial_training_loss_sees_the_mixed_batch_and_compiles_once(rng):
  seen = []

  def loss_fn(params, batch, rng):
    del rng
    seen.append(batch["image"].shape)
    return jnp.sum(params * batch["image"]), {}

  images = np.asarray(jax.random.randint(rng, (2, 3, 3, 1), 0, 256), np.uint8)
  pert = np.full((3, 3, 1), 0.5, np.float32)
  step = jax.jit(
    chex.assert_max_traces(
      lambda p, b, r: core.adversarial_training_loss(
        p, b, r, loss_fn=loss_fn, perturbation=pert, ratio=0.5
      )[0],
      n=1,
    )
  )
  batch = {"image": images, "semantic": np.zeros((2, 3, 3), np.int32)}
  for _ in range(2):
    loss = step(jnp.float32(1.0), batch, jax.random.key(0))
  x = images / 255.0
  expected = x[0].sum() + np.clip(x[1] + 0.5, 0, 1).sum()
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert seen == [(2, 3, 3, 1)]
