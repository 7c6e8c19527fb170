"""The M4 experiment: smoke run and report rebuild, settings errors, the static loss per variant."""

import dataclasses
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
from research import config_checks, experiments
from research.incremental_panoptic import core, fine_tuning
from research.incremental_panoptic import experiment as ex
from research.incremental_panoptic.settings import VARIANTS, Settings
from research.models import mask_matching
from research.study.results import Results
from research.training import parallel, state


def test_smoke_end_to_end(tmp_path):
  summary = ex.train_and_evaluate(incremental_panoptic_street.get_config("smoke"), str(tmp_path))
  assert set(summary["after"]) == {"naive", "method", "joint"}
  for r in summary["after"].values():
    assert 0.0 <= r["old"]["pq"] <= 100.0
  saved = json.loads((tmp_path / "summary.json").read_text())
  assert saved["experiment"] == "incremental_panoptic" and len(saved["rows"]) == 3
  assert (tmp_path / "plots" / "overlays.png").exists()
  report = (tmp_path / "report.md").read_text()
  assert "Ablations" in report
  results = Results.load(tmp_path)
  assert results.arms() == ["step0", "naive", "method", "joint"]
  assert results.values("method", "pq_old") == [summary["after"]["method"]["old"]["pq"]]
  (tmp_path / "report.md").unlink()
  assert experiments.rebuild_report(str(tmp_path)) == json.loads(json.dumps(summary))
  assert (tmp_path / "report.md").read_text() == report


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
    Settings.from_config(config)


def test_configs_validate():
  for module in (incremental_panoptic_street, incremental_panoptic_coco):
    for size in (None, "demo", "smoke"):
      Settings.from_config(module.get_config(size))


# ------------------------------------------------------------------------------- training step


def test_cosine_learning_rate_matches_optax():
  reference = optax.warmup_cosine_decay_schedule(0.0, 0.01, 5, 40, end_value=0.0)
  for step in range(0, 45, 3):
    ours = fine_tuning.cosine_learning_rate(jnp.int32(step), 0.01, 5.0, 40.0)
    np.testing.assert_allclose(ours, reference(step), rtol=1e-5, atol=1e-8)


def test_loss_specs_of_the_variants():
  settings = Settings.from_config(incremental_panoptic_street.get_config("smoke"))
  assert settings.loss_spec(None) == settings.loss_spec("naive") == settings.loss_spec("joint")
  assert not settings.loss_spec(None).historical
  method = settings.loss_spec("method")
  assert method.historical and method.pseudo and method.kd_weight == 2.0
  assert (method.overlap_rule, method.weighting) == ("drop_matched", "one_minus_no_object")
  assert settings.loss_spec("no_pseudo").historical and not settings.loss_spec("no_pseudo").pseudo
  assert settings.loss_spec("no_distill").kd_weight == 0.0
  comformer = settings.loss_spec("comformer")
  assert (comformer.overlap_rule, comformer.weighting) == ("remove_true_pixels", "squared")


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
    return functools.partial(
      fine_tuning.incremental_loss,
      spec=settings.loss_spec(variant),
      model=model,
      old_class_mask=settings.old_class_mask,
      criterion=settings.criterion,
      pseudo_settings=dataclasses.asdict(settings.pseudo),
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
  "variant", ["method", "no_pseudo", "no_distill", "no_weighting", "comformer", "true_wins"]
)
def test_variant_loss_is_its_own_rule_and_weighting(tiny, variant):
  """Each variant's loss against core's functions called with that variant's rule and weight."""
  settings, model, params, hist, batch, loss_fn = tiny
  loss, metrics = loss_fn(variant)(params, batch, None, hist_params=hist)
  v = VARIANTS[variant]
  rule = v.overlap_rule or settings.overlap_rule
  weighting = v.weighting or settings.weighting
  x = batch["image"].astype(np.float32) / 255.0
  cur = model.apply({"params": params}, x)
  old = model.apply({"params": hist}, x)
  old_mask = settings.old_class_mask
  kd = np.mean(
    [
      core.distillation_loss(
        cur["class_logits"][i], old["class_logits"][i], old_mask, weighting=weighting
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
      overlap_rule=rule,
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
  if variant == "method":
    assert claimed > 0  # the random historical model's pseudo masks reach the true masks
  if rule != "drop_matched":
    assert metrics["num_pseudo"] > 0 and metrics["pseudo_on_true"] == 0.0


def test_historical_params_get_no_gradient(tiny):
  _, _, params, hist, batch, loss_fn = tiny
  loss = loss_fn("method")
  grads = jax.grad(lambda h: loss(params, batch, None, hist_params=h)[0])(hist)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_each_spec_compiles_once_and_steps(tiny, monkeypatch):
  settings, model, params, hist, batch, _ = tiny
  traced = []
  loss = fine_tuning.incremental_loss

  def counted(*args, **kwargs):
    traced.append(kwargs["spec"])
    return loss(*args, **kwargs)

  monkeypatch.setattr(fine_tuning, "incremental_loss", counted)
  tx = fine_tuning.make_optimizer(settings.weight_decay)
  mesh = parallel.data_mesh(jax.devices()[:1])
  compiled = {}
  for variant in ("naive", "method", "joint", "method"):
    spec = settings.loss_spec(variant)
    if spec not in compiled:
      compiled[spec] = fine_tuning.compile_step(settings, model, tx, spec, settings.step1, mesh)
    # Replicated as `fit` places it (the step donates it and returns it replicated).
    s = parallel.replicate(state.create_train_state(jax.device_get(params), tx), mesh)
    for _ in range(2):
      s, metrics = compiled[spec](s, hist if spec.historical else None, batch, jax.random.key(0))
      chex.assert_tree_all_finite(metrics)
    np.testing.assert_allclose(metrics["learning_rate"], 0.5 * settings.step1.learning_rate)
  assert traced == [settings.loss_spec("naive"), settings.loss_spec("method")]


def test_coco_config_is_coco():
  config = incremental_panoptic_coco.get_config("smoke")
  assert isinstance(config, ml_collections.ConfigDict) and config.data.name == "coco_panoptic"
