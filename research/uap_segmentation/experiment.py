"""M1 experiment: universal adversarial training samples for segmentation (METHODS.md M1).

1. Train the baseline segmenter (``research.supervised.segmentation``) on the M training
   datasets (street-scene domains, or Cityscapes train chunks).
2. For each dataset, a per-dataset universal perturbation ``r_D`` from targeted iterative
   fast-gradient rounds on (part of) its training images, data-parallel over all devices with
   the ``lax.psum`` accumulation (steps 1-4); then the unified perturbation ``R`` (step 5).
3. Evaluate on held-out images of the M datasets and on the held-out domain: targeted success,
   mIoU and pixel accuracy, clean vs under ``R`` vs under a random-sign noise control of the same
   L-inf norm ``||R||_inf``.
4. Adversarial training (steps 6-7): continue from the baseline parameters on batches mixing
   clean and second samples ``clip(x + R)``; report mIoU under ``R``, under a fresh ``R'``
   computed against the new model, and clean; against a control that fine-tunes the same
   steps on clean images only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from research import config_checks
from research.data import catalogue, samplers, street_scenes
from research.metrics import segmentation as seg_metrics
from research.supervised import segmentation
from research.training import harness, loop, parallel, report, state, steps
from research.uap_segmentation import core
from research.uap_segmentation import data as uap_data

EXPERIMENT = "uap_segmentation"


# --------------------------------------------------------------------------------------------
# Configuration.


def class_names_for(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The class names of ``config.data.name`` (known before any data is read)."""
  if config.data.name == "cityscapes":
    return catalogue.CITYSCAPES_CLASS_NAMES
  return street_scenes.CLASS_NAMES


def attack_config(config: ml_collections.ConfigDict) -> core.AttackConfig:
  """``core.AttackConfig`` of ``config.attack`` (METHODS.md M1 steps 1-3)."""
  a = config.attack
  return core.AttackConfig(
    rounds=a.rounds,
    alpha=a.alpha,
    xi=a.xi,
    eps_r=a.eps_r,
    w_t=a.w_t,
    w_c=a.w_c,
    rho=a.rho,
    ignore_label=street_scenes.IGNORE_LABEL,
  )


def _check_unit(config: ml_collections.ConfigDict, field: str) -> float:
  return config_checks.check_float(config, field, 0.0, 1.0, exclusive_minimum=True)


def _check_size_multiple(config: ml_collections.ConfigDict, field: str, sizes, multiple: int):
  if len(sizes) != 2 or any(not isinstance(s, int) or s < 16 or s % multiple for s in sizes):
    raise config_checks.ConfigError(
      f"config.{field}={tuple(sizes)} is not allowed: give (height, width), each an integer "
      f">= 16 and a multiple of {multiple} (the segmenter's total stride)"
    )


def validate(config: ml_collections.ConfigDict) -> None:
  """Fails at once, naming the field, on any value the experiment cannot use."""
  segmentation.validate(config)
  multiple = 2 ** (len(config.model.stage_sizes) - 1)
  if config.data.name == "street_scenes":
    overlap = set(config.data.train_domains) & set(config.data.heldout_domains)
    if overlap:
      raise config_checks.ConfigError(
        f"config.data.heldout_domains={tuple(config.data.heldout_domains)} is not allowed: "
        f"{sorted(overlap)} are also training domains; a held-out domain must be unseen"
      )
    size = config.data.image_size
    _check_size_multiple(config, "data.image_size", (size, size), multiple)
  else:
    resize = tuple(config_checks.get_field(config, "data.resize"))
    if not resize:
      raise config_checks.ConfigError(
        "config.data.resize=() is not allowed: Cityscapes images (1024 x 2048) must be resized "
        "to one small (height, width), e.g. (64, 128)"
      )
    _check_size_multiple(config, "data.resize", resize, multiple)
    config_checks.check_int(config, "data.num_datasets", 1)
    config_checks.check_int(config, "data.train_images", 0)
    config_checks.check_int(config, "data.heldout_images", 0)
    config_checks.check_float(config, "data.test_fraction", 0.0, 0.5, exclusive_minimum=True)
  try:
    core.resolve_confusable_pairs(tuple(config.attack.pairs), class_names_for(config))
  except ValueError as e:
    raise config_checks.ConfigError(f"config.attack.pairs: {e}") from e
  for field in ("attack.xi", "attack.alpha", "attack.rho"):
    _check_unit(config, field)
  config_checks.check_int(config, "attack.rounds", 1)
  config_checks.check_int(config, "attack.images_per_dataset", 1)
  for field in ("attack.eps_r", "attack.w_t", "attack.w_c", "attack.unified_eps_r"):
    config_checks.check_float(config, field, 0.0)
  if config.attack.w_t == 0 and config.attack.w_c == 0:
    raise config_checks.ConfigError(
      "config.attack.w_t=0 and config.attack.w_c=0 is not allowed: one weight must be > 0"
    )
  config_checks.check_float(config, "attack.gamma_scale", 0.0, exclusive_minimum=True)
  config_checks.check_choice(config, "attack.weight_mode", core.WEIGHT_MODES)
  config_checks.check_choice(config, "attack.norm", core.NORMS)
  config_checks.check_int(config, "adv_train.steps", 1)
  config_checks.check_float(config, "adv_train.ratio", 0.0, 1.0)
  config_checks.check_float(config, "adv_train.learning_rate", 0.0, exclusive_minimum=True)
  config_checks.check_int(config, "adv_train.checkpoint_every", 0)
  config_checks.check_int(config, "report.overlay_images", 1)


# --------------------------------------------------------------------------------------------
# Perturbations (steps 1-5).


def logits_apply(model: Any) -> Callable[[Any, jax.Array], jax.Array]:
  """``apply_fn(params, images) -> logits`` for ``universal_perturbation_sharded``.

  Create it once per model and reuse it: it is a static argument of the compiled driver.
  """

  def apply_fn(params, images):
    return model.apply({"params": params}, images)["logits"]

  return apply_fn


def unified_from_datasets(
  apply_fn: Callable,
  params: Any,
  rng: jax.Array,
  train: dict[str, dict[str, np.ndarray]],
  pairs: np.ndarray,
  config: ml_collections.ConfigDict,
) -> dict[str, Any]:
  """Per-dataset universal perturbations and the unified ``R`` (METHODS.md M1 steps 1-5).

  Args:
    apply_fn: ``logits_apply(model)``.
    params: the attacked model's parameters.
    rng: PRNG key (dataset j uses ``fold_in(rng, j)``; the unified random term the last key).
    train: ``{dataset: {"image": [N, H, W, 3] uint8, "semantic": [N, H, W]}}``; the first
      ``config.attack.images_per_dataset`` images of each are attacked.
    pairs: ``[P, 2]`` confusable pairs.
    config: the experiment config.

  Returns:
    ``{"unified": [H, W, 3] R, "per_dataset": [M, H, W, 3], "success": {dataset: mean
    per-sample targeted success of its own r_n}}``.
  """
  a = config.attack
  mesh = core.device_mesh()
  attack = attack_config(config)
  r_ds, success = [], {}
  for j, (name, arrays) in enumerate(train.items()):
    n = min(a.images_per_dataset, len(arrays["image"]))
    out = core.universal_perturbation_sharded(
      apply_fn,
      params,
      jax.random.fold_in(rng, j),
      steps.images_to_float(jnp.asarray(arrays["image"][:n])),
      jnp.asarray(arrays["semantic"][:n], jnp.int32),
      jnp.asarray(pairs),
      config=attack,
      mesh=mesh,
      weight_mode=a.weight_mode,
    )
    r_ds.append(out.r_d)
    success[name] = float(jnp.mean(out.success))
  per_dataset = jnp.stack(r_ds)
  unified = core.unified_perturbation(
    jax.random.fold_in(rng, len(train)),
    per_dataset,
    xi=a.xi,
    gamma=a.gamma_scale * a.xi,
    eps_r=a.unified_eps_r,
    norm=a.norm,
  )
  return {
    "unified": np.asarray(unified),
    "per_dataset": np.asarray(per_dataset),
    "success": success,
  }


def sign_noise_like(rng: jax.Array, perturbation: np.ndarray) -> np.ndarray:
  """The control: uniform random signs scaled to ``||R||_inf`` (same L-inf norm as ``R``).

  Args:
    rng: PRNG key.
    perturbation: ``[H, W, C]`` the perturbation ``R`` to match.

  Returns:
    ``[H, W, C]`` noise with entries ``+-||R||_inf``.
  """
  radius = float(np.max(np.abs(perturbation)))
  signs = jax.random.rademacher(rng, perturbation.shape, dtype=jnp.float32)
  return np.asarray(radius * signs)


# --------------------------------------------------------------------------------------------
# Evaluation under a perturbation.


def perturbed_eval_step(
  params_and_perturbation: tuple[Any, jax.Array],
  batch: dict,
  *,
  model: Any,
  num_classes: int,
  pairs: jax.Array,
  ignore_label: int = 255,
) -> dict:
  """Confusion and targeted hits of a batch under ``clip(x + R)`` (METHODS.md M1 "Measure").

  Besides the targeted success (``src`` pixels predicted ``tgt``) it counts *flips*: ``src``
  pixels that the model does not already call ``tgt`` on the clean image but does under the
  perturbation, which separates what the perturbation does from the model's clean confusion.

  Args:
    params_and_perturbation: ``(params, R [H, W, 3])``; ``R = 0`` evaluates clean images.
    batch: ``{"image": [B, H, W, 3], "semantic": [B, H, W], "valid": [B] bool}``.
    model: the segmenter.
    num_classes: K.
    pairs: ``[P, 2]`` confusable ``(src, tgt)`` pairs.
    ignore_label: label excluded everywhere.

  Returns:
    ``{"confusion": [K, K] under R, "hits": [B, P] pixels of src_p predicted tgt_p,
    "targeted": [B, P] pixels of class src_p, "flips": [B, P] of those not tgt_p clean but
    tgt_p under R, "flippable": [B, P] of those not tgt_p clean}``.
  """
  params, perturbation = params_and_perturbation
  x = steps.images_to_float(batch["image"])

  def predict(images):
    return jnp.argmax(model.apply({"params": params}, images)["logits"], -1)[..., None]

  clean = predict(x)
  predictions = predict(core.second_samples(x, perturbation))
  labels = batch["semantic"].astype(jnp.int32)
  valid = (labels != ignore_label) & batch["valid"][:, None, None]
  is_src = (labels[..., None] == pairs[:, 0]) & valid[..., None]  # [B, H, W, P]
  hit = is_src & (predictions == pairs[:, 1])
  flippable = is_src & (clean != pairs[:, 1])
  return {
    "confusion": steps.confusion_counts(labels, predictions[..., 0], valid, num_classes),
    "hits": jnp.sum(hit, axis=(1, 2)),
    "targeted": jnp.sum(is_src, axis=(1, 2)),
    "flips": jnp.sum(flippable & hit, axis=(1, 2)),
    "flippable": jnp.sum(flippable, axis=(1, 2)),
  }


def evaluate_under(
  eval_step: Callable,
  params: Any,
  perturbation: np.ndarray,
  arrays: dict,
  batch_size: int,
  run: harness.Run,
) -> dict[str, Any]:
  """mIoU, pixel accuracy, per-class IoU, targeted success and flip rate of a split under R."""
  out = harness.evaluate(
    eval_step,
    (params, jnp.asarray(perturbation, jnp.float32)),
    arrays,
    batch_size,
    run.mesh,
    ("image", "semantic"),
    collect=("hits", "targeted", "flips", "flippable"),
  )
  hits, targeted = out["hits"].sum(0), out["targeted"].sum(0)
  flips, flippable = out["flips"].sum(0), out["flippable"].sum(0)
  summary = seg_metrics.segmentation_summary(out["confusion"])
  return {
    "miou": float(summary["miou"]),
    "pixel_accuracy": float(summary["pixel_accuracy"]),
    "iou": np.asarray(seg_metrics.per_class_iou(out["confusion"])),
    "success": float(hits.sum() / max(targeted.sum(), 1)),
    "success_per_pair": (hits / np.maximum(targeted, 1)).tolist(),
    "flip_rate": float(flips.sum() / max(flippable.sum(), 1)),
  }


# --------------------------------------------------------------------------------------------
# Adversarial training (steps 6-7).


def adversarial_train(
  config: ml_collections.ConfigDict,
  run: harness.Run,
  model: Any,
  params: Any,
  train_all: dict[str, np.ndarray],
  perturbation: np.ndarray,
  name: str = "adv_train",
) -> Any:
  """Continues training from ``params`` on 1:1 clean + ``clip(x + R)`` batches (steps 6-7).

  With ``perturbation = 0`` the same steps see clean images only: the clean fine-tuning
  control, which separates what the second samples do from what extra training does.
  Own checkpoints in ``<workdir>/<name>_checkpoints``; a restarted run resumes there.

  Returns:
    The trained parameters.
  """
  a = config.adv_train
  optim = ml_collections.ConfigDict(config.optim.to_dict())
  optim.learning_rate = a.learning_rate
  optim.warmup_steps = min(optim.warmup_steps, a.steps // 10)
  tx = state.make_optimizer(optim, a.steps)
  params = jax.tree.map(lambda p: jnp.array(p, copy=True), params)  # the step donates its state
  train_state = parallel.replicate(state.create_train_state(params, tx), run.mesh)
  checkpointer = run.checkpointer(f"{name}_checkpoints")
  train_state, _ = loop.restore_or_init(checkpointer, train_state)
  loss_fn = functools.partial(
    core.adversarial_training_loss,
    loss_fn=functools.partial(steps.segmentation_loss, model=model),
    perturbation=jnp.asarray(perturbation, jnp.float32),
    ratio=a.ratio,
  )
  step = parallel.compile_train_step(
    functools.partial(steps.train_step, loss_fn=loss_fn, tx=tx), run.mesh
  )
  sampler = samplers.RandomSampler(
    len(train_all["image"]), config.train.batch_size, config.seed + 1
  )
  batch_fn = harness.sampled_batch_fn(train_all, sampler, run.mesh, ("image", "semantic"))
  train_state = loop.train_loop(
    train_state,
    step,
    batch_fn,
    jax.random.key(config.seed + 2),
    num_steps=a.steps,
    checkpointer=checkpointer,
    checkpoint_every=a.checkpoint_every,
    log_every=config.train.log_every,
    writer=run.writer,
    examples_per_step=config.train.batch_size,
    name=name,
  )
  checkpointer.close()
  return train_state.params


# --------------------------------------------------------------------------------------------
# The experiment.


@functools.partial(jax.jit, static_argnums=0)
def _predict_jit(model: Any, params: Any, images: jax.Array, perturbation: jax.Array):
  x = core.second_samples(steps.images_to_float(images), perturbation)
  return jnp.argmax(model.apply({"params": params}, x)["logits"], -1)


def _predict(model: Any, params: Any, images: np.ndarray, perturbation: np.ndarray) -> np.ndarray:
  """Predicted label maps ``[B, H, W]`` of ``clip(images + perturbation)``."""
  return np.asarray(_predict_jit(model, params, jnp.asarray(images), jnp.asarray(perturbation)))


def amplified(perturbation: np.ndarray) -> np.ndarray:
  """``0.5 + R / (2 ||R||_inf)`` in [0, 1]: a perturbation made visible."""
  radius = max(float(np.max(np.abs(perturbation))), 1e-12)
  return np.clip(0.5 + perturbation / (2.0 * radius), 0.0, 1.0)


def _plots(run, model, params, adv_params, data, perts, names, k, config, per_class) -> str:
  titles = [f"r_D {n}" for n in data["train"]] + ["R", "R' (vs adv. model)", "noise control"]
  panels = [*perts["r_ds"], perts["R"], perts["R_prime"], perts["noise"]]
  rows = [(" | ".join(titles) + " (amplified)", [amplified(p) for p in panels])]
  report.plot_segmentation_rows(rows, k, run.plot_path("perturbations.png"))
  overlay_rows = []
  n = config.report.overlay_images
  for split in (data["test"], data["heldout"]):
    name, arrays = next(iter(split.items()))
    images, labels = arrays["image"][:n], arrays["semantic"][:n]
    zero = np.zeros_like(perts["R"])
    p_clean = _predict(model, params, images, zero)
    p_r = _predict(model, params, images, perts["R"])
    p_adv = _predict(model, adv_params, images, perts["R"])
    x_r = np.asarray(core.second_samples(steps.images_to_float(jnp.asarray(images)), perts["R"]))
    for i in range(len(images)):
      overlay_rows.append(
        (
          f"{name} {i}: input | +R | truth | pred clean | pred under R | adv-trained under R",
          [images[i], x_r[i], labels[i], p_clean[i], p_r[i], p_adv[i]],
        )
      )
  report.plot_segmentation_rows(overlay_rows, k, run.plot_path("overlays.png"))
  report.plot_bars(per_class, names, "IoU", run.plot_path("per_class_iou.png"))
  return (
    "![perturbations](plots/perturbations.png)\n\n![overlays](plots/overlays.png)\n\n"
    "![per-class IoU](plots/per_class_iou.png)"
  )


def _mean_iou(results: dict[str, dict]) -> np.ndarray:
  return np.mean([r["iou"] for r in results.values()], axis=0)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the M1 experiment (module doc) and writes ``report.md`` and ``summary.json``."""
  validate(config)
  run = harness.start_run(workdir)
  data = uap_data.load_uap_data(config)
  k, names = data["num_classes"], data["class_names"]
  pairs = core.resolve_confusable_pairs(tuple(config.attack.pairs), names)
  core.check_same_image_size(
    [a["image"].shape for group in ("train", "test", "heldout") for a in data[group].values()]
  )
  # 1. Baseline.
  model, params = segmentation.train_segmenter(
    config, run, {"train": data["train_all"], "num_classes": k}
  )
  # 2. Per-dataset and unified perturbations against the baseline.
  apply_fn = logits_apply(model)
  rng = jax.random.key(config.seed + 3)
  attack_rng, noise_rng = jax.random.split(rng)
  before = unified_from_datasets(apply_fn, params, attack_rng, data["train"], pairs, config)
  perts = {
    "R": before["unified"],
    "r_ds": before["per_dataset"],
    "noise": sign_noise_like(noise_rng, before["unified"]),
  }
  # 3. Clean / R / noise on held-out images and the held-out domain.
  eval_step = jax.jit(
    functools.partial(perturbed_eval_step, model=model, num_classes=k, pairs=jnp.asarray(pairs))
  )
  bs = config.train.eval_batch_size
  parallel.check_batch_divisible(bs, run.mesh, "train.eval_batch_size")
  zero = np.zeros_like(perts["R"])
  splits = {
    **{f"{n} (held-out images)": a for n, a in data["test"].items()},
    **{f"{n} (held-out domain)": a for n, a in data["heldout"].items()},
  }
  conditions = {"clean": zero, "R": perts["R"], "noise": perts["noise"]}
  results = {
    cond: {s: evaluate_under(eval_step, params, p, a, bs, run) for s, a in splits.items()}
    for cond, p in conditions.items()
  }
  # 4. Adversarial training, then R (old) and a fresh R' against the new model; the control
  # fine-tunes on clean images for the same steps.
  adv_params = adversarial_train(config, run, model, params, data["train_all"], perts["R"])
  control_params = adversarial_train(
    config, run, model, params, data["train_all"], zero, name="clean_finetune"
  )
  after = unified_from_datasets(apply_fn, adv_params, attack_rng, data["train"], pairs, config)
  perts["R_prime"] = after["unified"]
  adv_conditions = {"adv clean": zero, "adv R": perts["R"], "adv R'": perts["R_prime"]}
  adv_conditions.update({"control clean": zero, "control R": perts["R"]})
  for cond, p in adv_conditions.items():
    cond_params = control_params if cond.startswith("control") else adv_params
    results[cond] = {
      s: evaluate_under(eval_step, cond_params, p, a, bs, run) for s, a in splits.items()
    }
  np.savez(run.workdir + "/perturbations.npz", **{n: np.asarray(v) for n, v in perts.items()})
  for cond, per_split in results.items():
    for s, r in per_split.items():
      run.writer.write(
        config.train.steps,
        {m: r[m] for m in ("miou", "pixel_accuracy", "success", "flip_rate")},
        phase=f"{cond}|{s}",
      )
  return _write_outputs(
    config, run, model, params, adv_params, data, perts, pairs, names, k, results, before, after
  )


_BAR_NOTES = (
  "Targeted success is the fraction of `src` pixels predicted `tgt`; it includes the model's "
  "clean confusion (the `clean` rows), which the noise control also keeps, so the raw ratio "
  "R / noise is bounded by roughly 1 / (clean success). The flip rate counts only `src` pixels "
  "the model does not already call `tgt` on the clean image and that flip to `tgt` under the "
  "perturbation; the ratio can never exceed 1 / (noise success), the ceiling column. "
  "Recovered / taken is (mIoU under R after adversarial training - mIoU under R "
  "before) / (clean mIoU before - mIoU under R before); it also contains whatever the extra "
  "training steps improve on their own, which the clean fine-tune control (the same steps, "
  "optimizer and batches on clean images only) measures. "
  "The noise control has the L-inf norm of R but, being +-||R||_inf everywhere, a larger L2 norm."
)


def _write_outputs(
  config, run, model, params, adv_params, data, perts, pairs, names, k, results, before, after
) -> dict:
  """Tables, plots, report.md and summary.json."""
  held_in = [s for s in results["clean"] if s.endswith("(held-out images)")]
  held_out = [s for s in results["clean"] if s.endswith("(held-out domain)")]

  def group_mean(cond: str, splits: list[str], key: str) -> float:
    return float(np.mean([results[cond][s][key] for s in splits]))

  pair_names = [f"{names[s]}->{names[t]}" for s, t in pairs]
  main_rows = []
  for s in results["clean"]:
    for cond, label in (("clean", "clean"), ("R", "unified R"), ("noise", "noise control")):
      r = results[cond][s]
      main_rows.append(
        [
          s,
          label,
          r["success"],
          *r["success_per_pair"],
          r["flip_rate"],
          r["miou"],
          r["pixel_accuracy"],
        ]
      )
  adv_rows = []
  for s in results["clean"]:
    adv_rows.append(
      [
        s,
        results["clean"][s]["miou"],
        results["R"][s]["miou"],
        results["adv clean"][s]["miou"],
        results["adv R"][s]["miou"],
        results["adv R'"][s]["miou"],
        results["control clean"][s]["miou"],
        results["control R"][s]["miou"],
        results["R"][s]["success"],
        results["adv R"][s]["success"],
        results["adv R'"][s]["success"],
      ]
    )
  bars = {}
  for group, splits in (("held-out images", held_in), ("held-out domain", held_out)):
    r_success = group_mean("R", splits, "success")
    noise_success = group_mean("noise", splits, "success")
    clean_success = group_mean("clean", splits, "success")
    taken = group_mean("clean", splits, "miou") - group_mean("R", splits, "miou")
    recovered = group_mean("adv R", splits, "miou") - group_mean("R", splits, "miou")
    recovered_control = group_mean("control R", splits, "miou") - group_mean("R", splits, "miou")
    bars[group] = {
      "success_R": r_success,
      "success_noise": noise_success,
      "success_clean": clean_success,
      "success_ratio": r_success / max(noise_success, 1e-12),
      "success_ratio_ceiling": 1.0 / max(noise_success, 1e-12),
      "flip_rate_R": group_mean("R", splits, "flip_rate"),
      "flip_rate_noise": group_mean("noise", splits, "flip_rate"),
      "flip_ratio": group_mean("R", splits, "flip_rate")
      / max(group_mean("noise", splits, "flip_rate"), 1e-12),
      "miou_taken_by_R": taken,
      "miou_recovered": recovered,
      "recovered_fraction": recovered / taken if taken > 0 else float("nan"),
      "recovered_fraction_control": recovered_control / taken if taken > 0 else float("nan"),
      "clean_miou_cost": group_mean("clean", splits, "miou")
      - group_mean("adv clean", splits, "miou"),
      "clean_miou_cost_vs_control": group_mean("control clean", splits, "miou")
      - group_mean("adv clean", splits, "miou"),
    }
  bar_rows = [
    [
      g,
      b["success_R"],
      b["success_noise"],
      b["success_ratio"],
      b["success_ratio_ceiling"],
      b["flip_rate_R"],
      b["flip_rate_noise"],
      b["flip_ratio"],
      b["recovered_fraction"],
      b["recovered_fraction_control"],
      100 * b["clean_miou_cost"],
      100 * b["clean_miou_cost_vs_control"],
    ]
    for g, b in bars.items()
  ]
  per_class = {
    "clean": _mean_iou(results["clean"]),
    "under R": _mean_iou(results["R"]),
    "noise": _mean_iou(results["noise"]),
    "adv. trained, under R": _mean_iou(results["adv R"]),
    "adv. trained, clean": _mean_iou(results["adv clean"]),
  }
  plots = _plots(run, model, params, adv_params, data, perts, names, k, config, per_class)
  a = config.attack
  setup = (
    f"M = {len(data['train'])} datasets ({', '.join(data['train'])}); "
    f"pairs {', '.join(pair_names)}; "
    f"xi = {a.xi:.4f} ({a.xi * 255:.1f}/255), alpha = {a.alpha * 255:.1f}/255, {a.rounds} rounds, "
    f"{a.images_per_dataset} images per dataset, weights {a.weight_mode}, norm {a.norm}; "
    f"||R||_inf = {np.max(np.abs(perts['R'])) * 255:.2f}/255, ||R||_2 / ||noise||_2 = "
    f"{np.linalg.norm(perts['R']) / max(np.linalg.norm(perts['noise']), 1e-12):.3f}. "
    f"Per-dataset success of the per-sample r_n on attacked training images: "
    + ", ".join(f"{n} {v:.3f}" for n, v in before["success"].items())
    + f". Adversarial training: {config.adv_train.steps} steps, second-sample ratio "
    f"{config.adv_train.ratio}."
  )
  report.write_report(
    run.workdir,
    f"M1: universal adversarial training samples for segmentation on {config.data.name}",
    [
      ("Setup", setup),
      (
        "Unified perturbation R vs noise control (baseline model)",
        report.markdown_table(
          [
            "split",
            "input",
            "targeted success",
            *pair_names,
            "flip rate",
            "mIoU",
            "pixel accuracy",
          ],
          main_rows,
        ),
      ),
      (
        "Adversarial training",
        report.markdown_table(
          [
            "split",
            "mIoU clean (before)",
            "mIoU under R (before)",
            "mIoU clean (after)",
            "mIoU under R (after)",
            "mIoU under fresh R' (after)",
            "mIoU clean (clean fine-tune control)",
            "mIoU under R (clean fine-tune control)",
            "success R (before)",
            "success R (after)",
            "success R' (after)",
          ],
          adv_rows,
        ),
      ),
      (
        "Issue bars (means over splits)",
        report.markdown_table(
          [
            "group",
            "success under R",
            "success under noise",
            "ratio (bar >= 5)",
            "ratio ceiling (1 / noise success)",
            "flip rate under R",
            "flip rate under noise",
            "flip ratio",
            "mIoU recovered / taken (bar >= 0.5)",
            "same, clean fine-tune control",
            "clean-mIoU cost, points (bar <= 2)",
            "same, vs control",
          ],
          bar_rows,
        ),
      ),
      ("How to read the bars", _BAR_NOTES),
      (
        "Per-class IoU (mean over splits)",
        report.markdown_table(
          ["class", *per_class],
          [[n, *[v[i] for v in per_class.values()]] for i, n in enumerate(names)],
        ),
      ),
      ("Plots", plots),
    ],
  )
  out = {
    "experiment": EXPERIMENT,
    "time_s": run.elapsed(),
    "bars": bars,
    "attack_success_train": {"before": before["success"], "after": after["success"]},
    "metrics": {
      cond: {s: {m: v for m, v in r.items() if m != "iou"} for s, r in per_split.items()}
      for cond, per_split in results.items()
    },
    "rows": [
      harness.summary_row(
        "targeted success under R (held-out domain)",
        bars["held-out domain"]["success_R"],
        "noise control",
        bars["held-out domain"]["success_noise"],
      ),
      harness.summary_row(
        "targeted success under R (held-out images)",
        bars["held-out images"]["success_R"],
        "noise control",
        bars["held-out images"]["success_noise"],
      ),
      harness.summary_row(
        "mIoU under R after adv. training (held-out images)",
        group_mean("adv R", held_in, "miou"),
        "clean fine-tune control",
        group_mean("control R", held_in, "miou"),
      ),
    ],
  }
  harness.write_summary(run.workdir, out)
  return out
