"""The M5 method on a task model: losses, vector sets, target sets, train, target-loss, eval steps.

Pure, jit-compatible functions specialised on a `settings.Spec` (bound with
`functools.partial`): the detection (CenterNet) or classification task loss, the standard and
perturbed vector sets of step 3, the perturbed set of step 2 (one random start per image,
keyed by the image's index), the target set of steps 2-5, the training update of step 6 for
the arms, the arm's own target loss at given parameters (step 7's convergence test) and the
evaluation step that attacks and predicts one padded test batch.

Random draws are keyed per image (`image_keys`), never per batch, so no image's perturbation
depends on which batch it lands in: in training the perturbed set of step 2 is drawn once per
image (`initial_set='fixed'`, the patent's order) or again every step (`'redraw'`); in
evaluation every condition keys its draws by the image's position in the test split, and the
OT attack solves its transport problem over fixed groups of `attack.ot_group_size` images in
which padding rows have zero transport weight.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from research import losses
from research.data import detection
from research.models import detector, resnet
from research.ot_perturbation import core
from research.ot_perturbation.settings import DETECTOR_STRIDE, Spec
from research.supervised import classification
from research.training import state, steps

# arm -> (training of the update, initial set of its perturbed images; None: the config's).
ARMS = {
  "clean": ("clean", None),
  "ot": ("ot", None),
  "ot_redraw": ("ot", "redraw"),
  "pgd": ("pgd", "redraw"),  # PGD adversarial training draws its random start every step.
}


def batch_keys(task: str) -> tuple[str, ...]:
  """The batch features of a task."""
  return detection.BATCH_KEYS if task == "detection" else ("image", "label")


def train_batch_keys(task: str) -> tuple[str, ...]:
  """The training batch features: the task's plus `index`, the image's position in the split."""
  return batch_keys(task) + ("index",)


def arm_training(arm: str, spec: Spec) -> tuple[str, str]:
  """(training of the update: 'clean' | 'ot' | 'pgd', initial set: 'fixed' | 'redraw')."""
  training, initial_set = ARMS[arm]
  return training, initial_set or spec.ot.initial_set


def build_task_model(config: ml_collections.ConfigDict, task: str, num_classes: int) -> Any:
  """The detector (stride `DETECTOR_STRIDE`) or the classification ResNet.

  Both take `model.backbone` and `model.dtype` (see `resnet.model_options`). The detector is
  `detector.resnet_detector`: the 'small' backbone is the 3-stage ResNet of `model.stage_sizes`
  and `model.widths` with a stride-1 stem, whose last stage has stride 4; the named ones
  ('resnet18', 'resnet50') get a top-down neck down to their stride-4 first stage.
  """
  if task == "classification":
    return classification.build_model(config, num_classes)
  m = config.model
  return detector.resnet_detector(
    num_classes,
    DETECTOR_STRIDE,
    m.head_channels,
    stage_sizes=m.stage_sizes,
    widths=m.widths,
    embedding_dim=m.embedding_dim,
    **resnet.model_options(config),
  )


def task_targets(batch: dict, spec: Spec) -> Any:
  """Detection: CenterNet targets from the padded boxes; classification: the labels."""
  if spec.task == "classification":
    return batch["label"]
  return detection.centernet_targets(
    batch, num_classes=spec.num_classes, image_size=spec.image_size, stride=DETECTOR_STRIDE
  )


def task_loss(
  params: Any, images: jax.Array, targets: Any, *, model: Any, spec: Spec
) -> tuple[jax.Array, dict]:
  """The task loss of METHODS.md M5 step 6: CenterNet detection loss or cross-entropy.

  Args:
    params: model parameters.
    images: `[B, H, W, C]` float in [0, 1].
    targets: `task_targets`' output for the batch.
    model: detector or classifier.
    spec: static settings.

  Returns:
    (scalar loss, metrics).
  """
  out = model.apply({"params": params}, images, train=True)
  if spec.task == "detection":
    return detector.detection_loss(out, targets)
  ce = losses.softmax_cross_entropy(out["logits"], targets)
  return ce, {"ce": ce, "accuracy": jnp.mean(jnp.argmax(out["logits"], -1) == targets)}


def per_image_task_loss(
  params: Any, images: jax.Array, targets: Any, *, model: Any, spec: Spec
) -> jax.Array:
  """`[B]` the task loss of each image alone (the detection loss of a batch of one).

  PGD ascends the weighted sum of these, so an image's attack depends on no other image of
  its batch (and a zero-weight padding row is not attacked).
  """
  out = model.apply({"params": params}, images, train=True)
  if spec.task == "classification":
    return optax.softmax_cross_entropy_with_integer_labels(out["logits"], targets)
  heads = {k: out[k] for k in ("heatmap", "size", "offset")}

  def one(o, t):
    single = functools.partial(jax.tree.map, lambda a: a[None])
    return detector.detection_loss(single(o), single(t))[0]

  return jax.vmap(one)(heads, targets)


def feature_vectors(params: Any, images: jax.Array, *, model: Any, spec: Spec) -> jax.Array:
  """Standard / perturbed vector sets of step 3: pooled features or logits, `[B, D]`.

  Detection "logits" are the flattened heatmap logits `[B, h * w * K]`.
  """
  out = model.apply({"params": params}, images)
  if spec.ot.vectors == "pooled":
    return out["pooled"]
  logits = out["heatmap"] if spec.task == "detection" else out["logits"]
  return logits.reshape(logits.shape[0], -1)


# --------------------------------------------------------------------------------------------
# Per-image random draws (step 2).


def image_keys(key: jax.Array, index: jax.Array) -> jax.Array:
  """`[B]` keys `fold_in(key, index_i)`: one per image, whatever batch it is in."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(index)


def random_starts(keys: jax.Array, x: jax.Array, *, kind: str, eps: float) -> jax.Array:
  """`[B, H, W, C]` `core.perturbed_images` of each image with its own key."""
  return jax.vmap(lambda k, xi: core.perturbed_images(k, xi[None], kind=kind, eps=eps)[0])(keys, x)


def initial_keys(rng: jax.Array, step: jax.Array, index: jax.Array, initial_set: str) -> jax.Array:
  """Per-image keys of the perturbed set of step 2.

  'fixed': `fold_in(k_fixed, index)`, the same at every step (the set is built once, before the
  loop); 'redraw': `fold_in(fold_in(k_redraw, step), index)`, new every step.
  """
  fixed_key, redraw_key = jax.random.split(rng)
  if initial_set == "fixed":
    return image_keys(fixed_key, index)
  return image_keys(jax.random.fold_in(redraw_key, step), index)


def initial_perturbed_set(keys: jax.Array, x: jax.Array, *, spec: Spec) -> jax.Array:
  """Step 2: `[B, H, W, C]`, or `[n, B, H, W, C]` candidate sets for `target_set='candidates'`."""
  ot = spec.ot
  if ot.target_set == "candidates":

    def candidates(k, xi):
      return core.candidate_perturbations(k, xi[None], ot.num_candidates, kind=ot.kind, eps=ot.eps)

    return jnp.swapaxes(jax.vmap(candidates)(keys, x)[:, :, 0], 0, 1)
  return random_starts(keys, x, kind=ot.kind, eps=ot.eps)


# --------------------------------------------------------------------------------------------
# Target sets (steps 3-5) and PGD.


def ot_target_set(
  params: Any,
  x: jax.Array,
  x_init: jax.Array,
  *,
  model: Any,
  spec: Spec,
  weights: jax.Array | None = None,
) -> tuple[jax.Array, dict]:
  """Steps 3-5: the target perturbed set maximising `D`, from the perturbed set `x_init`.

  The ascent takes `spec.ot.ascent_steps` steps of size `spec.ot.alpha` (the evaluation
  attack passes `attack_spec(spec)`).

  Args:
    params: model parameters.
    x: clean images `[B, H, W, C]` in [0, 1].
    x_init: `initial_perturbed_set`'s output.
    model: detector or classifier.
    spec: static settings.
    weights: optional `[B]` transport weights (0 on padding rows); ascent only.

  Returns:
    (target set `[B, H, W, C]`, scalar diagnostics: distances, finiteness, Sinkhorn state).
  """
  ot = spec.ot
  features_fn = functools.partial(feature_vectors, params, model=model, spec=spec)
  if ot.target_set == "candidates":
    x_t, aux = core.best_of_candidates(features_fn, x, x_init, sinkhorn_config=ot.sinkhorn)
    return x_t, {"distance": jnp.max(aux["distances"]), "ot_finite": aux["finite"]}
  x_t, aux = core.ot_attack(
    features_fn,
    x,
    x_init,
    eps=ot.eps,
    alpha=ot.alpha,
    steps=ot.ascent_steps,
    sinkhorn_config=ot.sinkhorn,
    weights=weights,
  )
  return x_t, {
    "distance_start": aux["distances"][0],
    "distance": aux["distances"][-1],
    "ot_finite": aux["finite"],
    "sinkhorn_converged": aux["converged"].astype(jnp.float32),
    "sinkhorn_iterations": aux["n_iters"].astype(jnp.float32),
  }


def pgd_set(
  params: Any,
  x: jax.Array,
  targets: Any,
  x_init: jax.Array,
  *,
  model: Any,
  spec: Spec,
  steps_: int,
  alpha: float,
  weights: jax.Array | None = None,
) -> jax.Array:
  """PGD images `[B, H, W, C]` ascending `sum_i w_i loss_i` (per image, with the true targets)."""
  w = jnp.ones(x.shape[0], x.dtype) if weights is None else weights

  def loss_fn(images):
    return jnp.sum(w * per_image_task_loss(params, images, targets, model=model, spec=spec))

  return core.pgd_attack(loss_fn, x, x_init, eps=spec.ot.eps, alpha=alpha, steps=steps_)


def training_target_set(
  params: Any,
  x: jax.Array,
  targets: Any,
  keys: jax.Array,
  *,
  model: Any,
  spec: Spec,
  training: str,
) -> tuple[jax.Array | None, dict]:
  """The target set of a training update from the current `params` (None for 'clean')."""
  if training == "ot":
    x_init = initial_perturbed_set(keys, x, spec=spec)
    return ot_target_set(params, x, x_init, model=model, spec=spec)
  if training == "pgd":
    k, alpha = spec.ot.ascent_steps, spec.ot.alpha
    x_init = random_starts(keys, x, kind="uniform", eps=spec.ot.eps)
    return pgd_set(params, x, targets, x_init, model=model, spec=spec, steps_=k, alpha=alpha), {}
  return None, {}


def arm_objective(
  params: Any,
  x: jax.Array,
  x_t: jax.Array | None,
  targets: Any,
  *,
  model: Any,
  spec: Spec,
  training: str,
) -> tuple[jax.Array, dict]:
  """The arm's own target loss: loss1 (clean), loss1 + loss2 (ot, pgd) or loss2 (perturbed_only)."""
  loss_fn = functools.partial(task_loss, model=model, spec=spec)
  if training == "clean":
    loss1, m = loss_fn(params, x, targets)
    return loss1, {"loss1": loss1, **{f"clean/{k}": v for k, v in m.items()}}
  return core.combined_loss(
    loss_fn,
    params,
    x,
    x_t,
    targets,
    perturbed_only=spec.ot.perturbed_only and training == "ot",
  )


def perturbation_train_step(
  train_state: state.TrainState,
  batch: dict,
  rng: jax.Array,
  *,
  model: Any,
  tx: optax.GradientTransformation,
  spec: Spec,
  training: str,
  initial_set: str,
) -> tuple[state.TrainState, dict]:
  """One update of clean-only, OT (METHODS.md M5 steps 2-6) or PGD adversarial training.

  The target set is built from the current parameters every step (step 7's "go back to step
  6") from the perturbed set of step 2 (`initial_keys`: drawn once per image for 'fixed', every
  step for 'redraw'); the loss is the arm's `arm_objective`. A step whose loss, gradients or
  new parameters are not all finite is recorded in `nonfinite_step`, as
  `training.steps.train_step` does.

  Args:
    train_state: the replicated state.
    batch: task batch (`image` uint8 `[B, H, W, C]` plus boxes or labels) and `index` `[B]`.
    rng: the loop's key (the same at every step).
    model: detector or classifier.
    tx: optimizer.
    spec: static settings.
    training: 'clean', 'ot' or 'pgd'.
    initial_set: 'fixed' or 'redraw'.

  Returns:
    (new state, metrics including `loss` (the arm's target loss on this batch, before the
    update), `loss1`, `loss2`).
  """
  x = steps.images_to_float(batch["image"])
  targets = task_targets(batch, spec)
  keys = initial_keys(rng, train_state.step, batch["index"], initial_set)
  x_t, extra = training_target_set(
    train_state.params, x, targets, keys, model=model, spec=spec, training=training
  )
  objective = functools.partial(
    arm_objective, x=x, x_t=x_t, targets=targets, model=model, spec=spec, training=training
  )
  (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(train_state.params)
  updates, opt_state = tx.update(grads, train_state.opt_state, train_state.params)
  params = optax.apply_updates(train_state.params, updates)
  new_state = steps.next_state(train_state, loss, grads, params, opt_state)
  metrics = {**metrics, **{k: v.astype(jnp.float32) for k, v in extra.items()}}
  return new_state, {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads)}


def bound_train_step(
  model: Any, tx: optax.GradientTransformation, spec: Spec, training: str, initial_set: str
):
  """`perturbation_train_step` with its settings bound: `step(train_state, batch, rng)`.

  `model`, `tx`, `spec`, `training` and `initial_set` are `perturbation_train_step`'s keyword
  arguments of the same names.

  Returns:
    The step function, ready for `jax.jit` or `parallel.compile_train_step`.
  """
  return functools.partial(
    perturbation_train_step,
    model=model,
    tx=tx,
    spec=spec,
    training=training,
    initial_set=initial_set,
  )


def target_loss(
  params: Any, batch: dict, rng: jax.Array, *, model: Any, spec: Spec, training: str
) -> dict:
  """Step 7's target loss of an arm at `params` on a (convergence) batch, without an update.

  The target set is built from `params` from the images' fixed perturbed set (the keys the
  'fixed' initial set trains with), so the number depends on the parameters alone.

  Returns:
    `{"loss": the arm's own target loss, "loss1", "loss2" (when the arm has them)}`.
  """
  x = steps.images_to_float(batch["image"])
  targets = task_targets(batch, spec)
  keys = initial_keys(rng, jnp.int32(0), batch["index"], "fixed")
  x_t, _ = training_target_set(params, x, targets, keys, model=model, spec=spec, training=training)
  loss, metrics = arm_objective(params, x, x_t, targets, model=model, spec=spec, training=training)
  return {"loss": loss, **{k: metrics[k] for k in ("loss1", "loss2") if k in metrics}}


# --------------------------------------------------------------------------------------------
# Evaluation.


def group_weights(valid: jax.Array, group_size: int) -> jax.Array:
  """`[B // G, G]` transport weights of the OT attack's groups: 1 real, 0 padding.

  A group of padding rows only gets weight 1 everywhere (its outputs are dropped anyway), so
  every transport problem has mass.
  """
  valid = valid.reshape(-1, group_size)
  return jnp.where(jnp.any(valid, axis=1, keepdims=True), valid, True).astype(jnp.float32)


def attack_spec(spec: Spec) -> Spec:
  """`spec` of the evaluation OT attack: `attack_steps` ascent steps of size `attack_alpha`.

  The evaluation attack is always step 5's ascent (also when training uses candidates).
  """
  ot = dataclasses.replace(
    spec.ot, target_set="ascent", ascent_steps=spec.ot.attack_steps, alpha=spec.ot.attack_alpha
  )
  return dataclasses.replace(spec, ot=ot)


def ot_attack_images(
  params: Any, x: jax.Array, x_init: jax.Array, valid: jax.Array, *, model: Any, spec: Spec
) -> tuple[jax.Array, jax.Array]:
  """The evaluation OT attack: step 5's ascent over groups of `ot_group_size` test images.

  Returns:
    (attacked images `[B, H, W, C]`, `[B]` bool: the image's group had finite features, costs
    and distances).
  """
  g = spec.ot.group_size
  if x.shape[0] % g:
    raise ValueError(
      f"the evaluation batch has {x.shape[0]} images: it must be a multiple of "
      f"attack.ot_group_size={g}"
    )
  groups = (x.shape[0] // g, g) + x.shape[1:]
  attack = attack_spec(spec)

  def one(xc, xi, w):
    x_t, aux = ot_target_set(params, xc, xi, model=model, spec=attack, weights=w)
    return x_t, aux["ot_finite"]

  x_t, finite = jax.vmap(one)(x.reshape(groups), x_init.reshape(groups), group_weights(valid, g))
  return x_t.reshape(x.shape), jnp.repeat(finite, g)


def perturbed_test_images(
  params: Any, batch: dict, key: jax.Array, *, model: Any, spec: Spec, condition: str
) -> tuple[jax.Array, jax.Array]:
  """The test images `[B, H, W, C]` of a condition and `[B]` finiteness of the attack.

  Random starts are keyed per image (`fold_in(key, index_i)`); the OT attack runs over groups
  with zero transport weight on padding rows (`ot_attack_images`); PGD ascends each image's
  own loss, padding rows weighted 0.
  """
  x = steps.images_to_float(batch["image"])
  finite = jnp.ones(x.shape[0], bool)
  if condition == "clean":
    return x, finite
  start = random_starts(image_keys(key, batch["index"]), x, kind="uniform", eps=spec.ot.eps)
  if condition == "noise":
    return start, finite
  valid = batch["valid"]
  if condition == "ot_attack":
    return ot_attack_images(params, x, start, valid, model=model, spec=spec)
  k, alpha = spec.ot.attack_steps, spec.ot.attack_alpha
  targets = task_targets(batch, spec)
  weights = valid.astype(x.dtype)
  x_adv = pgd_set(
    params, x, targets, start, model=model, spec=spec, steps_=k, alpha=alpha, weights=weights
  )
  return x_adv, finite


def eval_step(
  params: Any, batch: dict, key: jax.Array, *, model: Any, spec: Spec, condition: str
) -> dict:
  """Predictions on one padded test batch under `condition` (see `perturbed_test_images`).

  Args:
    params: model parameters.
    batch: `predict`'s batch: the task features `[B, ...]`, `valid [B]` and `index [B]`.
    key: the condition's key.
    model: detector or classifier.
    spec: static settings.
    condition: one of `settings.CONDITIONS`.

  Returns:
    detection: `boxes [B, top_k, 4]`, `scores`, `classes`; classification: `predictions [B]`;
    plus `images [B, H, W, C]` (the evaluated inputs) and `finite [B]` (the attack met only
    finite features, costs and distances, and the model's outputs are finite).
  """
  x, finite = perturbed_test_images(params, batch, key, model=model, spec=spec, condition=condition)
  out = model.apply({"params": params}, x)
  heads = ("logits",) if spec.task == "classification" else ("heatmap", "size", "offset")
  for name in heads:
    finite &= jnp.all(jnp.isfinite(out[name].reshape(x.shape[0], -1)), axis=1)
  if spec.task == "classification":
    return {"predictions": jnp.argmax(out["logits"], -1), "images": x, "finite": finite}
  dets = detector.decode_detections(out, stride=DETECTOR_STRIDE, top_k=spec.top_k)
  return {**dets, "images": x, "finite": finite}


def check_finite(finite: np.ndarray, condition: str) -> None:
  """Host side: one clear error when an evaluation met non-finite features or outputs.

  Args:
    finite: `[N]` bool per test image (`eval_step`'s `finite`, padding dropped).
    condition: the condition, for the message.

  Raises:
    FloatingPointError: naming the condition and the first test images concerned.
  """
  bad = np.flatnonzero(~np.asarray(finite, bool))
  if bad.size:
    raise FloatingPointError(
      f"evaluation under {condition}: the attack or the model met non-finite features, costs, "
      f"distances or outputs for {bad.size} test images (first: {bad[:8].tolist()}); check "
      "the trained parameters"
    )


def transport_plan(
  params: Any, x: jax.Array, x_pert: jax.Array, weights: jax.Array, *, model: Any, spec: Spec
):
  """(plan P* `[G, G]`, cost C `[G, G]`) of D between one group's clean and perturbed vectors."""
  _, aux = core.feature_matching_distance(
    feature_vectors(params, x, model=model, spec=spec),
    feature_vectors(params, x_pert, model=model, spec=spec),
    spec.ot.sinkhorn,
    weights=weights,
  )
  return aux["plan"], aux["cost_matrix"]
