"""The M4 experiment: smoke run and report rebuild, settings errors, the static loss per variant."""

import functools
import json

import chex
import helpers
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import references

from configs import incremental_panoptic_coco, incremental_panoptic_street
from research import config_checks, experiments
from research.data import panoptic
from research.incremental_panoptic import core, fine_tuning
from research.incremental_panoptic import experiment as ex
from research.incremental_panoptic.settings import VARIANTS, Settings
from research.models import mask_matching
from research.study.results import Results
from research.training import parallel, state


def test_smoke_end_to_end(tmp_path):
  summary = ex.train_and_evaluate(incremental_panoptic_street.get_config("smoke"), str(tmp_path))
  assert set(summary["steps"]) == {"1", "2"}
  for step in ("1", "2"):
    assert set(summary["steps"][step]) == {"naive", "method", "comformer", "joint"}
    for r in summary["steps"][step].values():
      assert 0.0 <= r["old"] <= 100.0
  saved = json.loads((tmp_path / "summary.json").read_text())
  assert saved["experiment"] == "incremental_panoptic" and len(saved["rows"]) == 3
  assert (tmp_path / "plots" / "overlays.png").exists()
  report = (tmp_path / "report.md").read_text()
  assert "After step 2: PQ per arm" in report and "sensitivity" in report
  results = Results.load(tmp_path)
  assert results.arms()[:2] == ["step0", "naive"]
  assert results.values("method", "pq_old", condition="step2") == [
    summary["steps"]["2"]["method"]["old"]
  ]
  (tmp_path / "report.md").unlink()
  assert experiments.rebuild_report(str(tmp_path)) == json.loads(json.dumps(summary))
  assert (tmp_path / "report.md").read_text() == report


@pytest.mark.parametrize(
  "field, value, words",
  [
    ("data.class_steps", ((0, 1, 2, 3, 4, 5), (5, 6), (7, 8)), "class 5 is also in"),
    ("data.class_steps", ((0, 1, 2, 3, 4, 5), (6,), (7,)), r"classes \[8\] are in no step"),
    ("data.class_steps", ((0, 1, 2, 3, 4, 5), (6,), (7, 8, 9)), r"classes \[9\] are unknown"),
    ("data.class_steps", ((0, 1, 2, 3, 4, 5, 6), (), (7, 8)), "every step needs a new class"),
    ("data.max_segments", 0, "data.max_segments=0"),
    ("data.max_segments", 40, "model.num_queries"),
    ("data.image_size", 36, "multiple of"),
    ("num_seeds", 0, "num_seeds=0"),
    ("variants", ("method", "joint"), "'naive'"),
    ("step1_only", ("naive",), "also in config.variants"),
    ("step1_only", ("nope",), "step1_only"),
    ("method.weighting", "cubic", "method.weighting"),
    ("method.kd_form", "renormalised", "method.kd_form"),
    ("method.kd_reduction", "sum", "method.kd_reduction"),
    ("method.min_component_area", -1, "method.min_component_area"),
    ("method.sensitivity", ((0.7, -1),), "method.sensitivity"),
    ("method.match_iou", 1.5, "match_iou"),
    ("step1.learning_rate", 0.0, "step1.learning_rate"),
  ],
)
def test_validate_rejects(field, value, words):
  config = incremental_panoptic_street.get_config("smoke")
  parent, name = field.rsplit(".", 1) if "." in field else (None, field)
  with config.unlocked():
    (config[parent] if parent else config)[name] = value
  with pytest.raises(config_checks.ConfigError, match=words):
    Settings.from_config(config)


def test_configs_validate():
  for module in (incremental_panoptic_street, incremental_panoptic_coco):
    for size in (None, "demo", "smoke"):
      Settings.from_config(module.get_config(size))


def test_coco_task_splits():
  config = incremental_panoptic_coco.get_config("smoke")
  assert [len(s) for s in Settings.from_config(config).class_steps] == [100, 33]
  config.data.class_steps = "100-10"
  assert [len(s) for s in Settings.from_config(config).class_steps] == [100, 10, 10, 10, 3]
  for bad in ("100-x", "133-10", "0-5"):
    config.data.class_steps = bad
    with pytest.raises(config_checks.ConfigError, match="task name is 'B-K'"):
      Settings.from_config(config)


def test_step_images_are_disjoint_and_show_their_new_classes():
  settings = Settings.from_config(incremental_panoptic_street.get_config("smoke"))
  maps = np.full((40, 8, 8), 1000, np.int32)
  maps[::2, :2, :2] = 7001  # trucks in even images
  maps[1::4, 4:, 4:] = 8001  # persons in some odd images
  train = panoptic.street_panoptic_arrays(
    {"image": np.zeros((40, 8, 8, 3), np.uint8), "panoptic": maps}, 16
  )
  images = ex.step_images(train, settings, 0)
  assert sum(map(len, images)) <= 40 and len(np.unique(np.concatenate(images))) == sum(
    map(len, images)
  )
  assert (np.asarray(images[1]) % 2 == 0).all() and (np.asarray(images[2]) % 4 == 1).all()
  maps[1::4] = 1000
  train = panoptic.street_panoptic_arrays(
    {"image": np.zeros((40, 8, 8, 3), np.uint8), "panoptic": maps}, 16
  )
  with pytest.raises(ValueError, match="no image of step 2 shows one of its new classes"):
    ex.step_images(train, settings, 0)


# ------------------------------------------------------------------------------- training step


def test_cosine_learning_rate_matches_optax():
  reference = optax.warmup_cosine_decay_schedule(0.0, 0.01, 5, 40, end_value=0.0)
  for step in range(0, 45, 3):
    ours = fine_tuning.cosine_learning_rate(jnp.int32(step), 0.01, 5.0, 40.0)
    np.testing.assert_allclose(ours, reference(step), rtol=1e-5, atol=1e-8)


def test_loss_specs_of_the_variants():
  settings = Settings.from_config(incremental_panoptic_street.get_config("demo"))
  assert settings.loss_spec(None) == settings.loss_spec("naive") == settings.loss_spec("joint")
  assert not settings.loss_spec(None).historical
  method = settings.loss_spec("method")
  assert method.historical and method.pseudo and method.kd_weight == 2.0
  assert (method.overlap_rule, method.weighting) == ("drop_matched", "one_minus_no_object")
  assert (method.kd_form, method.kd_reduction, method.kd_all_layers) == (
    "fold_new_into_no_object", "mean", False,
  )  # fmt: skip
  assert (method.noise_threshold, method.min_component_area) == (0.7, 2)
  off = settings.loss_spec("no_noise_removal")
  assert (off.noise_threshold, off.min_component_area) == (0.5, 0)
  assert settings.loss_spec("no_pseudo").historical and not settings.loss_spec("no_pseudo").pseudo
  assert settings.loss_spec("no_distill").kd_weight == 0.0
  comformer = settings.loss_spec("comformer")
  assert (comformer.overlap_rule, comformer.weighting) == ("remove_true_pixels", "squared")
  assert (comformer.kd_form, comformer.kd_reduction, comformer.kd_all_layers) == (
    "log_softmax_all", "weighted_mean", True,
  )  # fmt: skip


@pytest.fixture(scope="module")
def tiny():
  config = incremental_panoptic_street.get_config("smoke")
  config.model.update(widths=(8, 16), hidden_dim=16, num_queries=6, ffn_dim=16, num_heads=2)
  config.data.update(image_size=16, max_segments=4)
  settings = Settings.from_config(config)
  model = fine_tuning.build_model(settings.model, settings.num_classes)
  images = np.random.default_rng(0).integers(0, 255, (2, 16, 16, 3), dtype=np.uint8)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
  hist = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 16, 16, 3)))["params"]
  masks = np.zeros((2, 4, 8, 8), bool)
  masks[:, 0, :4] = True
  batch = {
    "image": images,
    "target_classes": np.array([[7, 0, 0, 0], [8, 0, 0, 0]], np.int32),
    "target_masks": masks,
    "target_valid": np.array([[1, 0, 0, 0], [1, 0, 0, 0]], bool),
  }

  def loss_fn(variant):
    spec = settings.loss_spec(variant)
    return functools.partial(
      fine_tuning.incremental_loss,
      spec=spec,
      model=model,
      old_class_mask=settings.old_class_mask(2),  # classes 0-6 old; the batch shows 7 and 8
      criterion=settings.criterion,
      pseudo_settings=settings.pseudo_kwargs(spec),
      temperature=settings.temperature,
    )

  return settings, model, params, hist, batch, loss_fn


def _task_loss(settings, out, classes, masks, valid):
  return mask_matching.set_criterion_loss(
    jnp.concatenate([out["aux"]["class_logits"], out["class_logits"][None]]),
    jnp.concatenate([out["aux"]["mask_logits"], out["mask_logits"][None]]),
    classes,
    masks,
    valid,
    **settings.criterion,
  )[0]


@pytest.mark.parametrize("variant", [None, "naive", "joint"])
def test_loss_without_history_is_the_set_criterion(tiny, variant):
  settings, model, params, _, batch, loss_fn = tiny
  loss, metrics = loss_fn(variant)(params, batch, None, hist_params=None)
  out = model.apply({"params": params}, batch["image"].astype(np.float32) / 255.0)
  ref = _task_loss(
    settings, out, batch["target_classes"], batch["target_masks"], batch["target_valid"]
  )
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  assert all(metrics[k] == 0.0 for k in ("kd", "num_pseudo", "pseudo_dropped", "pseudo_on_true"))


@pytest.mark.parametrize(
  "variant",
  [
    "method",
    "no_pseudo",
    "no_distill",
    "no_weighting",
    "comformer",
    "true_wins",
    "no_noise_removal",
  ],
)
def test_variant_loss_is_its_own_rule_and_weighting(tiny, variant):
  """Each variant's loss against core's functions called with that variant's rule and weight,
  and the distillation against the numpy references (per image, or CoMFormer's formula)."""
  settings, model, params, hist, batch, loss_fn = tiny
  loss, metrics = loss_fn(variant)(params, batch, None, hist_params=hist)
  v, spec = VARIANTS[variant], settings.loss_spec(variant)
  x = batch["image"].astype(np.float32) / 255.0
  cur = model.apply({"params": params}, x)
  old = model.apply({"params": hist}, x)
  old_mask = settings.old_class_mask(2)
  if v.kd == "comformer":
    layers = [(cur["aux"]["class_logits"][i], old["aux"]["class_logits"][i]) for i in range(2)]
    layers.append((cur["class_logits"], old["class_logits"]))
    kd = sum(
      references.comformer_distillation(c, np.concatenate([h[..., :7], h[..., -1:]], -1), 7)
      for c, h in layers
    )
  else:
    kd = np.mean(
      [
        references.incremental_distillation(
          cur["class_logits"][i], old["class_logits"][i], old_mask, weighting=spec.weighting
        )
        for i in range(2)
      ]
    )
  targets, claimed, true_total, num_pseudo = [], 0, 0, 0
  for i in range(2):
    pm, pc, pv = core.old_class_pseudo_labels(
      old["class_logits"][i],
      old["mask_logits"][i],
      batch["target_masks"][i],
      batch["target_valid"][i],
      old_mask,
      **settings.pseudo_kwargs(spec),
    )
    pv = np.asarray(pv) & v.pseudo
    true_pixels = np.any(batch["target_masks"][i] & batch["target_valid"][i][:, None, None], 0)
    claimed += np.sum(true_pixels & np.any(np.asarray(pm) & pv[:, None, None], 0))
    true_total += true_pixels.sum()
    num_pseudo += pv.sum()
    _, score = core.query_class_confidence(old["class_logits"][i])
    targets.append(
      core.merge_targets(
        batch["target_classes"][i],
        batch["target_masks"][i],
        batch["target_valid"][i],
        pc,
        pm,
        pv,
        4,
        score,
      )[:3]
    )
  classes, masks, valid = (jnp.stack(t) for t in zip(*targets, strict=True))
  task = _task_loss(settings, cur, classes, masks, valid)
  kd_weight = settings.kd_weight if v.distill else 0.0
  np.testing.assert_allclose(metrics["kd"], kd, rtol=1e-4)
  np.testing.assert_allclose(loss, task + kd_weight * kd, rtol=1e-4)
  np.testing.assert_allclose(metrics["num_pseudo"], num_pseudo / 2)
  np.testing.assert_allclose(metrics["pseudo_on_true"], claimed / true_total, rtol=1e-6)
  if variant == "no_noise_removal":
    assert claimed > 0  # the random historical model's pseudo masks reach the true masks
  if spec.overlap_rule != "drop_matched":
    assert metrics["pseudo_on_true"] == 0.0


def test_historical_params_get_no_gradient(tiny):
  _, _, params, hist, batch, loss_fn = tiny
  for variant in ("method", "comformer"):
    loss = loss_fn(variant)
    grads = jax.grad(lambda h, loss=loss: loss(params, batch, None, hist_params=h)[0])(hist)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_each_spec_compiles_once_and_steps(tiny, monkeypatch):
  settings, model, params, hist, batch, _ = tiny
  traced = helpers.record_calls(monkeypatch, fine_tuning, "incremental_loss", "spec")
  tx = fine_tuning.make_optimizer(settings.weight_decay)
  mesh = parallel.data_mesh(jax.devices()[:1])
  compiled = {}
  runs = [("naive", 1, 4), ("method", 1, 4), ("joint", 2, 8), ("method", 2, 8)]
  for variant, step, length in runs:
    spec = settings.loss_spec(variant)
    if spec not in compiled:
      compiled[spec] = fine_tuning.compile_step(settings, model, tx, spec, mesh)
    # Replicated as `fit` places it (the step donates it and returns it replicated).
    s = parallel.replicate(state.create_train_state(jax.device_get(params), tx), mesh)
    schedule = fine_tuning.schedule_array(settings.step1, length)
    old = settings.old_class_mask(step)
    for _ in range(2):
      s, metrics = compiled[spec](
        s, hist if spec.historical else None, old, schedule, batch, jax.random.key(0)
      )
      chex.assert_tree_all_finite(metrics)
    expected = 0.5 * settings.step1.learning_rate * (1 + np.cos(np.pi / length))
    np.testing.assert_allclose(metrics["learning_rate"], expected, rtol=1e-5)
  # One trace per spec: the class split and the schedule length are traced inputs.
  assert traced == [settings.loss_spec("naive"), settings.loss_spec("method")]


def test_coco_config_is_coco():
  config = incremental_panoptic_coco.get_config("smoke")
  assert isinstance(config, ml_collections.ConfigDict) and config.data.name == "coco_panoptic"


def _coco_like_record(rng, h, w, segments):
  """A record shaped like `catalogue.coco_panoptic_example` output: stripes of segments."""
  ids = np.zeros((h, w), np.int32)
  bounds = np.linspace(0, w, len(segments) + 1).astype(int)
  for k, (sid, _, _) in enumerate(segments):
    ids[:, bounds[k] : bounds[k + 1]] = sid
  ids[: h // 8] = 0  # a void band
  return {
    "image": rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
    "panoptic": ids,
    "segment_ids": np.array([s for s, _, _ in segments], np.int64),
    "segment_classes": np.array([c for _, c, _ in segments], np.int64),
    "segment_is_crowd": np.array([k for _, _, k in segments], bool),
  }


def test_coco_config_runs_on_mock_records(tmp_path, monkeypatch):
  """The COCO path end to end: records read one at a time, varied sizes, an image with more
  segments than max_segments (truncated and counted), PQ at each label's own resolution."""
  rng = np.random.default_rng(0)
  old_stuff, old_thing, new_stuff = 90, 3, 110  # classes 0-99 old, 100-132 new ("100-50")

  def split(n, offset):
    records = []
    for i in range(n):
      segs = [(1, old_stuff, False), (2, old_thing, False), (3, new_stuff, False)]
      if i % 3 == 0:
        segs += [(4, old_thing, False), (5, old_thing, True), (6, new_stuff, False)]
      records.append(_coco_like_record(rng, 40 + 4 * (i % 3), 48 - 4 * (i % 2) + offset, segs))
    return records

  sources = {"train": split(12, 0), "validation": split(4, 4)}
  monkeypatch.setattr(panoptic.catalogue, "load", lambda name, s, d: (sources[s], 133))
  shapes = []
  upsample = panoptic.upsample_segment_map

  def recording(segment_map, shape):
    shapes.append(tuple(shape))
    return upsample(segment_map, shape)

  monkeypatch.setattr(panoptic, "upsample_segment_map", recording)
  config = incremental_panoptic_coco.get_config("smoke")
  config.data.update(image_size=16, num_train=12, num_test=4, max_segments=4)
  config.model.update(widths=(8, 16), hidden_dim=16, num_queries=6, ffn_dim=16, num_heads=2)
  config.variants = ("naive", "method")
  config.method.sensitivity = ((0.7, 2),)
  summary = ex.train_and_evaluate(config, str(tmp_path))
  results = Results.load(tmp_path)
  assert results.meta["truncated"]["train"] == {"images": 4, "segments": 8, "max_segments": 4}
  assert results.meta["class_steps"][1] == list(range(100, 133))
  # Every evaluation scored each test image at the size of its label map.
  want = [tuple(r["panoptic"].shape) for r in sources["validation"]]
  assert shapes == want * (len(shapes) // 4) and len(shapes) == 3 * 4
  assert set(summary["steps"]["1"]) == {"naive", "method"}
  assert "'segments': 8" in (tmp_path / "report.md").read_text()
