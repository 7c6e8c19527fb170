"""The M4 experiment: smoke run, config errors, data conversion against numpy loops."""

import functools
import json

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import incremental_panoptic_coco, incremental_panoptic_street
from research import config_checks
from research.data import street_scenes
from research.incremental_panoptic import core
from research.incremental_panoptic import experiment as ex
from research.metrics import panoptic as pq_metrics
from research.models import mask_matching


def test_smoke_end_to_end(tmp_path):
  summary = ex.train_and_evaluate(incremental_panoptic_street.get_config("smoke"), str(tmp_path))
  assert set(summary["after"]) == {"naive", "method", "joint"}
  for r in summary["after"].values():
    assert 0.0 <= r["old"]["pq"] <= 100.0
  saved = json.loads((tmp_path / "summary.json").read_text())
  assert saved["experiment"] == "incremental_panoptic" and len(saved["rows"]) == 3
  assert (tmp_path / "plots" / "overlays.png").exists()
  assert "Ablations" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize(
  "field, value, words",
  [
    ("data.new_classes", (5, 6), "also in old_classes"),
    ("data.max_segments", 40, "model.num_queries"),
    ("data.image_size", 36, "multiple of"),
    ("variants", ("method", "joint"), "'naive'"),
    ("method.weighting", "cubic", "method.weighting"),
    ("method.match_iou", 1.5, "match_iou"),
    ("step1.learning_rate", 0.0, "step1.learning_rate"),
  ],
)
def test_validate_rejects(field, value, words):
  config = incremental_panoptic_street.get_config("smoke")
  parent, name = field.rsplit(".", 1) if "." in field else (None, field)
  (config[parent] if parent else config)[name] = value
  with pytest.raises(config_checks.ConfigError, match=words):
    ex.validate(config)


def test_configs_validate():
  for module in (incremental_panoptic_street, incremental_panoptic_coco):
    for size in (None, "demo", "smoke"):
      ex.validate(module.get_config(size))


# -------------------------------------------------------------------------------------- data


def _tables(panoptic_maps):
  return ex.street_panoptic_arrays(
    {"image": np.zeros(panoptic_maps.shape + (3,), np.uint8), "panoptic": panoptic_maps}, 8
  )


def test_street_tables_match_semantic_instance_reference():
  scenes = street_scenes.generate_split("day", 3, seed=1, image_size=32)
  arrays = ex.street_panoptic_arrays(scenes, 16)
  categories = {c: c in street_scenes.THING_CLASSES for c in range(9)}
  for i in range(3):
    ref_map, ref_table = pq_metrics.segments_from_semantic_instance(
      scenes["semantic"][i], scenes["panoptic"][i] % 1000, categories
    )
    ours = ex.ground_truth_segments(arrays, i)
    # Same segments (as pixel sets) with the same classes, ids aside.
    for ref_id, (cls, crowd) in ref_table.items():
      ids = np.unique(arrays["panoptic"][i][ref_map == ref_id])
      assert len(ids) == 1 and ours[int(ids[0])] == (cls, crowd)
    assert len(ours) == len(ref_table)


def test_too_many_segments_is_an_error():
  maps = np.arange(1, 17, dtype=np.int32).reshape(1, 4, 4) + 1000
  with pytest.raises(ValueError, match="max_segments=8"):
    _tables(maps)


def test_block_downsample_against_loop():
  masks = np.random.default_rng(0).random((3, 8, 12)) > 0.6
  ours = ex.block_downsample(masks, (4, 3))
  for k in range(3):
    for i in range(4):
      for j in range(3):
        assert ours[k, i, j] == (masks[k, 2 * i : 2 * i + 2, 4 * j : 4 * j + 4].sum() >= 4)


def test_panoptic_targets_against_loop():
  rng = np.random.default_rng(3)
  ids = np.array([1000, 2000, 6001, 7002, 9003])  # road, sidewalk, car, truck, bicycle
  maps = ids[rng.integers(0, len(ids), (4, 8, 8))].astype(np.int32)
  maps[0, :2] = 0  # void
  maps[1] = 1000  # only road
  arrays = _tables(maps)
  keep = (0, 5, 6)
  out = ex.panoptic_targets(arrays, keep, (4, 4), 6)
  chex.assert_shape(out["target_masks"], (4, 6, 4, 4))
  for i in range(4):
    expected = []
    for s in np.unique(maps[i]):
      cls = s // 1000 - 1
      if s == 0 or cls not in keep:
        continue
      small = (maps[i] == s).reshape(4, 2, 4, 2).mean((1, 3)) >= 0.5
      if small.any():
        expected.append((small.sum(), cls, small))
    expected.sort(key=lambda t: -t[0])
    assert out["target_valid"][i].sum() == len(expected)
    for slot, (_, cls, small) in enumerate(expected):
      assert out["target_classes"][i, slot] == cls
      np.testing.assert_array_equal(out["target_masks"][i, slot], small)
    assert not out["target_masks"][i, len(expected) :].any()


def test_empty_image_gives_all_invalid_targets():
  out = ex.panoptic_targets(_tables(np.zeros((1, 8, 8), np.int32)), (0, 1), (4, 4), 4)
  assert not out["target_valid"].any() and not out["target_masks"].any()


def _coco_record(h, w, ids_map, segments):
  rng = np.random.default_rng(h * w)
  return {
    "image": rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
    "panoptic": ids_map.astype(np.int32),
    "segment_ids": np.array([s for s, _, _ in segments], np.int64),
    "segment_classes": np.array([c for _, c, _ in segments], np.int64),
    "segment_is_crowd": np.array([k for _, _, k in segments], bool),
  }


def test_coco_records_to_targets():
  """Synthetic records shaped like `catalogue.coco_panoptic_example` output (8x12 -> 4x4)."""
  ids_map = np.zeros((8, 12), np.int64)
  ids_map[:4] = 101  # stuff class 90, top half
  ids_map[4:, :6] = 202  # thing class 3, bottom left
  ids_map[4:, 6:] = 303  # crowd thing class 3, bottom right
  records = [
    _coco_record(8, 12, ids_map, [(101, 90, False), (202, 3, False), (303, 3, True)]),
    _coco_record(4, 4, np.zeros((4, 4)), []),
  ]
  arrays = ex.coco_panoptic_arrays(records, 4, 5)
  # Nearest sampling at pixel centres: rows 1, 3, 5, 7; columns 1, 4, 7, 10.
  np.testing.assert_array_equal(arrays["image"][0], records[0]["image"][1::2][:, [1, 4, 7, 10]])
  np.testing.assert_array_equal(arrays["panoptic"][0], ids_map[1::2][:, [1, 4, 7, 10]])
  assert ex.ground_truth_segments(arrays, 0) == {101: (90, False), 202: (3, False), 303: (3, True)}
  assert ex.ground_truth_segments(arrays, 1) == {}
  targets = ex.panoptic_targets(arrays, range(133), (2, 2), 4)
  # The crowd segment is never a target; the stuff top row and the thing bottom-left block are.
  np.testing.assert_array_equal(targets["target_valid"], [[1, 1, 0, 0], [0, 0, 0, 0]])
  np.testing.assert_array_equal(targets["target_classes"][0, :2], [90, 3])
  np.testing.assert_array_equal(targets["target_masks"][0, 1], [[0, 0], [1, 0]])


def test_coco_record_with_unknown_segment_is_an_error():
  record = _coco_record(4, 4, np.full((4, 4), 7), [(8, 1, False)])
  with pytest.raises(ValueError, match=r"segment ids \[7\]"):
    ex.coco_panoptic_arrays([record], 4, 4)


# ------------------------------------------------------------------------------- training step


def test_cosine_learning_rate_matches_optax():
  reference = optax.warmup_cosine_decay_schedule(0.0, 0.01, 5, 40, end_value=0.0)
  for step in range(0, 45, 3):
    ours = ex.cosine_learning_rate(jnp.int32(step), 0.01, 5.0, 40.0)
    np.testing.assert_allclose(ours, reference(step), rtol=1e-5, atol=1e-8)


@pytest.fixture(scope="module")
def tiny():
  config = incremental_panoptic_street.get_config("smoke")
  config.model.update(widths=(8, 16), hidden_dim=16, num_queries=6, ffn_dim=16, num_heads=2)
  config.data.update(image_size=16, max_segments=4)
  model = ex.build_model(config)
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
  loss_fn = functools.partial(
    ex.incremental_loss,
    model=model,
    old_class_mask=np.array([1] * 6 + [0] * 3, bool),
    criterion=ex.criterion_settings(config),
    pseudo_settings={
      k: v for k, v in ex.pseudo_label_settings(config, "method").items() if k != "overlap_rule"
    },
    temperature=1.0,
  )
  return config, model, params, hist, batch, loss_fn


def test_loss_without_history_is_the_set_criterion(tiny):
  config, model, params, hist, batch, loss_fn = tiny
  controls = ex.variant_controls(config, "naive", "step1")
  loss, _ = loss_fn(params, batch, None, hist_params=hist, controls=controls)
  out = model.apply({"params": params}, batch["image"].astype(np.float32) / 255.0)
  ref, _ = mask_matching.set_criterion_loss(
    jnp.concatenate([out["aux"]["class_logits"], out["class_logits"][None]]),
    jnp.concatenate([out["aux"]["mask_logits"], out["mask_logits"][None]]),
    batch["target_classes"],
    batch["target_masks"],
    batch["target_valid"],
    **ex.criterion_settings(config),
  )
  np.testing.assert_allclose(loss, ref, rtol=1e-5)


def test_method_loss_adds_pseudo_labels_and_distillation(tiny):
  config, model, params, hist, batch, loss_fn = tiny
  controls = ex.variant_controls(config, "method", "step1")
  loss, metrics = loss_fn(params, batch, None, hist_params=hist, controls=controls)
  x = batch["image"].astype(np.float32) / 255.0
  cur = model.apply({"params": params}, x)
  old = model.apply({"params": hist}, x)
  old_mask = np.array([1] * 6 + [0] * 3, bool)
  kd = np.mean(
    [
      core.distillation_loss(cur["class_logits"][i], old["class_logits"][i], old_mask)
      for i in range(2)
    ]
  )
  targets, claimed, true_total = [], 0, 0
  for i in range(2):
    pm, pc, pv = core.old_class_pseudo_labels(
      old["class_logits"][i],
      old["mask_logits"][i],
      batch["target_masks"][i],
      batch["target_valid"][i],
      old_mask,
    )
    true_pixels = np.any(batch["target_masks"][i] & batch["target_valid"][i][:, None, None], 0)
    claimed += np.sum(true_pixels & np.any(np.asarray(pm) & np.asarray(pv)[:, None, None], 0))
    true_total += true_pixels.sum()
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
  task, _ = mask_matching.set_criterion_loss(
    jnp.concatenate([cur["aux"]["class_logits"], cur["class_logits"][None]]),
    jnp.concatenate([cur["aux"]["mask_logits"], cur["mask_logits"][None]]),
    classes,
    masks,
    valid,
    **ex.criterion_settings(config),
  )
  np.testing.assert_allclose(metrics["kd"], kd, rtol=1e-4)
  np.testing.assert_allclose(loss, task + config.method.kd_weight * kd, rtol=1e-4)
  assert claimed > 0  # the random historical model's pseudo masks reach the true masks
  np.testing.assert_allclose(metrics["pseudo_on_true"], claimed / true_total, rtol=1e-6)
  controls = ex.variant_controls(config, "true_wins", "step1")
  _, metrics = loss_fn(params, batch, None, hist_params=hist, controls=controls)
  assert metrics["num_pseudo"] > 0 and metrics["pseudo_on_true"] == 0.0


def test_historical_params_get_no_gradient(tiny):
  config, _, params, hist, batch, loss_fn = tiny
  controls = ex.variant_controls(config, "method", "step1")
  grads = jax.grad(lambda h: loss_fn(params, batch, None, hist_params=h, controls=controls)[0])(
    hist
  )
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_one_compiled_step_serves_every_variant(tiny):
  config, model, params, hist, batch, loss_fn = tiny
  tx = ex.make_optimizer(config)
  traces = []

  def counted(*args):
    traces.append(1)
    return ex.fine_tune_step(*args, loss_fn=loss_fn, tx=tx)

  step = jax.jit(counted)
  from research.training import state

  variants = [("step0", "naive"), ("step1", "method"), ("step1", "comformer")]
  for phase, variant in variants + [("step1", "true_wins")]:
    s = state.create_train_state(params, tx)
    s, m = step(s, hist, ex.variant_controls(config, variant, phase), batch, jax.random.key(0))
    chex.assert_tree_all_finite(m)
  assert len(traces) == 1


def test_check_bar():
  r = {
    "naive": {"old": {"pq": 10.0}, "new": {"pq": 30.0}},
    "method": {"old": {"pq": 40.0}, "new": {"pq": 26.0}},
  }
  bar = ex.check_bar(r, 50.0)
  assert bar["forgetting_naive"] == 40.0 and bar["forgetting_method"] == 10.0
  assert bar["forgetting_halved"] and bar["new_pq_within_5"]
  r["method"]["new"]["pq"] = 24.0
  assert not ex.check_bar(r, 50.0)["new_pq_within_5"]
  r["true_wins"] = {"old": {"pq": 20.0}, "new": {"pq": 29.0}}
  bar = ex.check_bar(r, 50.0, "true_wins")
  assert bar["forgetting_method"] == 30.0 and not bar["forgetting_halved"]
  assert bar["new_pq_gap_to_naive"] == 1.0 and bar["new_pq_within_5"]


def test_coco_config_is_coco():
  config = incremental_panoptic_coco.get_config("smoke")
  assert isinstance(config, ml_collections.ConfigDict) and config.data.name == "coco_panoptic"
