"""How each arm of M3's study trains and predicts: losses, batch streams, eval step, predictions.

Arms (METHODS.md M3, its baselines and the controls of issue 16), all on the same ResNet:

* `dual` (the method): a head batch (random or PK from the head set, step 2) and a PK batch
  from the whole set (step 3); loss `lambda_ce * CE(head classes) + lambda_tri * triplet`
  (step 4), one update per step (`train.schedule = 'joint'`) or one update on each branch in
  turn (`'alternating'`, `alternating_train_step`).
* `dual_all_head`: the same with every class in the head set (the ablation that isolates the
  head split: the CE branch then covers the tail classes too).
* `dual_alternating`: the dual arm with the alternating schedule (when `dual` is joint).
* `ce` (random batches), `ce_balanced` (class-balanced sampling), `logit_adjusted` (Menon et
  al. 2021 loss): softmax CE over all classes.
* `triplet`: the whole-set branch alone, with the same P x K batches as the dual arm's branch.

Every arm is judged by every prediction rule (`PREDICTION_RULES`): nearest class mean of the
normalised embedding (METHODS.md M3 step 5, the headline rule), nearest class mean of the
normalised pooled backbone features, and the argmax of the classifier's logits over all
classes. A rule can be poor for an arm by construction (the softmax rule of `triplet` uses an
untrained classifier; that of `dual` one trained on the head classes only; the embedding of
the CE arms is an untrained projection of the pooled features): the report says so beside
the numbers.

Each loss has the `loss_fn(params, batch, rng) -> (loss, metrics)` form of
`research.training.steps.train_step`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from research import losses
from research.data import samplers
from research.long_tail import core
from research.long_tail.settings import DUAL_METHODS, Settings
from research.training import parallel, steps
from research.training.state import TrainState

PREDICTION_RULES = ("ncm", "ncm_pooled", "softmax")
RULE_FEATURE = {"ncm": "embedding", "ncm_pooled": "pooled"}
HEAD_SEED_OFFSET = 7919  # the head sampler's seed is the PK sampler's plus this


def augment_crop_flip(images: jax.Array, rng: jax.Array, pad: int = 4) -> jax.Array:
  """CIFAR augmentation: random crop after zero padding by `pad`, random horizontal flip.

  Args:
    images: [B, H, W, C] float images.
    rng: key.
    pad: padding on each side.

  Returns:
    [B, H, W, C] augmented images.
  """
  b, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  ky, kx, kf = jax.random.split(rng, 3)
  ys = jax.random.randint(ky, (b,), 0, 2 * pad + 1)
  xs = jax.random.randint(kx, (b,), 0, 2 * pad + 1)
  crops = jax.vmap(lambda im, y, x: jax.lax.dynamic_slice(im, (y, x, 0), (h, w, c)))(padded, ys, xs)
  flip = jax.random.bernoulli(kf, 0.5, (b,))
  return jnp.where(flip[:, None, None, None], crops[:, :, ::-1], crops)


def _forward(model, params, images, rng, augment: bool) -> dict:
  x = steps.images_to_float(images)
  if augment:
    x = augment_crop_flip(x, rng)
  return model.apply({"params": params}, x, train=True)


def dual_loss_fn(
  params: Any,
  batch: dict,
  rng: jax.Array,
  *,
  model: Any,
  head_classes: np.ndarray,
  lambda_ce: float,
  lambda_tri: float,
  mining: str,
  margin: float,
  augment: bool = False,
) -> tuple[jax.Array, dict]:
  """METHODS.md M3 step 4: `lambda_ce * CE(head batch) + lambda_tri * Triplet(PK batch)`.

  The head classifier (step 2) is the rows `head_classes` of the model's classifier layer, so
  every arm shares one architecture; the softmax runs over the head classes only.

  Args:
    params: parameters of the one network both branches update.
    batch: {"head_image": [Bh, H, W, C], "head_label": [Bh] head-class indices,
      "pk_image": [P*K, H, W, C], "pk_label": [P*K] original class ids}.
    rng: key (augmentation only).
    model: the ResNet (logits over all classes, of which the head columns are used).
    head_classes: [H] original ids of the head classes, in head-index order.
    lambda_ce: weight of the head cross-entropy.
    lambda_tri: weight of the triplet loss.
    mining: triplet mining (`core.MINING_MODES`).
    margin: triplet margin.
    augment: apply `augment_crop_flip` to both batches.

  Returns:
    (loss, {"ce", "triplet", "head_accuracy", "loss"}).
  """
  head_rng, pk_rng = jax.random.split(rng)
  head = _forward(model, params, batch["head_image"], head_rng, augment)
  pk = _forward(model, params, batch["pk_image"], pk_rng, augment)
  return core.dual_loss(
    head["logits"][:, head_classes],
    batch["head_label"],
    pk["embedding"],
    batch["pk_label"],
    lambda_ce=lambda_ce,
    lambda_tri=lambda_tri,
    mining=mining,
    margin=margin,
  )


def head_ce_loss_fn(
  params: Any,
  batch: dict,
  rng: jax.Array,
  *,
  model: Any,
  head_classes: np.ndarray,
  lambda_ce: float,
  augment: bool = False,
) -> tuple[jax.Array, dict]:
  """The head branch alone (METHODS.md M3 step 2): `lambda_ce * CE` over the head classes.

  Args:
    params: model parameters.
    batch: {"head_image": [Bh, H, W, C], "head_label": [Bh] head-class indices, ...}.
    rng: key (augmentation only).
    model: the ResNet.
    head_classes: [H] original ids of the head classes, in head-index order.
    lambda_ce: weight of the head cross-entropy.
    augment: apply `augment_crop_flip`.

  Returns:
    (loss, {"ce", "head_accuracy"}).
  """
  logits = _forward(model, params, batch["head_image"], rng, augment)["logits"][:, head_classes]
  ce = losses.softmax_cross_entropy(logits, batch["head_label"])
  accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["head_label"])
  return lambda_ce * ce, {"ce": ce, "head_accuracy": accuracy}


def alternating_train_step(
  state: TrainState,
  batch: dict,
  rng: jax.Array,
  *,
  head_loss_fn: Any,
  pk_loss_fn: Any,
  tx: optax.GradientTransformation,
) -> tuple[TrainState, dict]:
  """One step of the alternating schedule: an update on the head CE batch, then one on the PK.

  METHODS.md M3 step 4 option (`train.schedule = 'alternating'`): the two trainings of the
  patent run one after the other instead of in one summed loss. A step sees the same head and
  PK batches as a joint step (the same images) and makes two optimizer updates, so the
  optimizer's schedule must be built for twice `train.steps` (`Settings.updates_per_step`).
  `state.step` counts steps (pairs of updates), as the loop and checkpoints expect.

  Args:
    state: the train state.
    batch: {"head_image", "head_label", "pk_image", "pk_label"}.
    rng: the loop key; the step folds in `state.step`.
    head_loss_fn: `head_ce_loss_fn` with its configuration bound.
    pk_loss_fn: `triplet_loss_fn` (weighted by `lambda_tri`) with its configuration bound.
    tx: the optimizer.

  Returns:
    (new state, metrics with `loss` = the sum of both branch losses, `grad_norm` of both).
  """
  head_rng, pk_rng = jax.random.split(jax.random.fold_in(rng, state.step))
  (ce, ce_metrics), g_head = jax.value_and_grad(head_loss_fn, has_aux=True)(
    state.params, batch, head_rng
  )
  updates, opt_state = tx.update(g_head, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  (tri, tri_metrics), g_pk = jax.value_and_grad(pk_loss_fn, has_aux=True)(params, batch, pk_rng)
  updates, opt_state = tx.update(g_pk, opt_state, params)
  params = optax.apply_updates(params, updates)
  loss = ce + tri
  new_state = steps.next_state(state, loss, (g_head, g_pk), params, opt_state)
  grad_norm = jnp.sqrt(optax.global_norm(g_head) ** 2 + optax.global_norm(g_pk) ** 2)
  return new_state, {**ce_metrics, **tri_metrics, "loss": loss, "grad_norm": grad_norm}


def ce_loss_fn(
  params: Any,
  batch: dict,
  rng: jax.Array,
  *,
  model: Any,
  log_prior: np.ndarray | None = None,
  tau: float = 1.0,
  augment: bool = False,
) -> tuple[jax.Array, dict]:
  """Softmax CE over all classes; logit-adjusted (Menon et al. 2021) when `log_prior` is given.

  Args:
    params: model parameters.
    batch: {"image": [B, H, W, C], "label": [B]}.
    rng: key (augmentation only).
    model: ResNet with logits over all classes.
    log_prior: [C] log class prior for the logit-adjusted loss, None for plain CE.
    tau: logit-adjustment temperature.
    augment: apply `augment_crop_flip`.

  Returns:
    (loss, {"ce", "accuracy"}).
  """
  logits = _forward(model, params, batch["image"], rng, augment)["logits"]
  if log_prior is None:
    ce = losses.softmax_cross_entropy(logits, batch["label"])
  else:
    ce = core.logit_adjusted_ce(logits, batch["label"], jnp.asarray(log_prior), tau)
  return ce, {"ce": ce, "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}


def triplet_loss_fn(
  params: Any,
  batch: dict,
  rng: jax.Array,
  *,
  model: Any,
  mining: str,
  margin: float,
  augment: bool = False,
  lambda_tri: float = 1.0,
) -> tuple[jax.Array, dict]:
  """The whole-set branch of M3 alone ({"pk_image", "pk_label"}): `lambda_tri * triplet`.

  The triplet-only baseline (lambda_tri = 1) and the PK half of the alternating schedule.
  """
  emb = _forward(model, params, batch["pk_image"], rng, augment)["embedding"]
  tri = core.triplet_loss(emb, batch["pk_label"], mining=mining, margin=margin)
  return lambda_tri * tri, {"triplet": tri}


def loss_fn(settings: Settings, method: str, model: Any, head_mask, counts) -> Any:
  """The `loss_fn(params, batch, rng)` of an arm's joint step, for `steps.train_step`.

  Args:
    settings: the study's settings.
    method: the arm.
    model: the ResNet.
    head_mask: [C] bool head classes of this arm (`Settings.head_mask(counts, method)`).
    counts: [C] training counts (the logit-adjusted prior).
  """
  tri = dict(
    mining=settings.triplet.mining, margin=settings.triplet.margin, augment=settings.augment
  )
  if method in DUAL_METHODS:
    return functools.partial(
      dual_loss_fn,
      model=model,
      head_classes=np.flatnonzero(head_mask),
      lambda_ce=settings.loss.lambda_ce,
      lambda_tri=settings.loss.lambda_tri,
      **tri,
    )
  if method == "triplet":
    return functools.partial(triplet_loss_fn, model=model, **tri)
  prior = core.log_prior(counts) if method == "logit_adjusted" else None
  return functools.partial(
    ce_loss_fn,
    model=model,
    log_prior=prior,
    tau=settings.loss.logit_adjust_tau,
    augment=settings.augment,
  )


def train_step_fn(
  settings: Settings, method: str, model: Any, head_mask, counts, tx: optax.GradientTransformation
) -> Any:
  """The uncompiled `step(state, batch, rng)` of an arm: joint or alternating (dual arms)."""
  if settings.arm_schedule(method) != "alternating":
    return functools.partial(
      steps.train_step, loss_fn=loss_fn(settings, method, model, head_mask, counts), tx=tx
    )
  head_loss = functools.partial(
    head_ce_loss_fn,
    model=model,
    head_classes=np.flatnonzero(head_mask),
    lambda_ce=settings.loss.lambda_ce,
    augment=settings.augment,
  )
  pk_loss = functools.partial(
    triplet_loss_fn,
    model=model,
    mining=settings.triplet.mining,
    margin=settings.triplet.margin,
    augment=settings.augment,
    lambda_tri=settings.loss.lambda_tri,
  )
  return functools.partial(
    alternating_train_step, head_loss_fn=head_loss, pk_loss_fn=pk_loss, tx=tx
  )


def streams(settings: Settings, method: str, train: dict, head_mask: np.ndarray, seed: int):
  """{prefix: (arrays, sampler)}: the batch streams of one arm; batch keys are prefix + key.

  Args:
    settings: the study's settings.
    method: the arm.
    train: {"image": [N, ...], "label": [N]} the long-tailed training set.
    head_mask: [C] bool head classes of this arm.
    seed: the training seed (batch order).

  Returns:
    one stream for the CE baselines, a `pk_` stream (P x K = `triplet.p` x `triplet.k`) for
    triplet-only, `head_` and `pk_` streams for the dual arms. The PK stream of a seed is the
    same for every arm that has one.
  """
  labels = train["label"]
  num_classes = len(head_mask)
  p, k = settings.triplet.p, settings.triplet.k
  pk_sampler = samplers.PKSampler(labels, p, k, seed, num_classes)
  if method in ("ce", "logit_adjusted"):
    return {"": (train, samplers.RandomSampler(len(labels), settings.train.batch_size, seed))}
  if method == "ce_balanced":
    sampler = samplers.ClassBalancedSampler(labels, settings.train.batch_size, seed, num_classes)
    return {"": (train, sampler)}
  if method == "triplet":
    return {"pk_": (train, pk_sampler)}
  in_head = head_mask[labels]
  head_train = {
    "image": train["image"][in_head],
    "label": core.head_label_map(head_mask)[labels][in_head],
  }
  head = settings.head
  if head.sampling == "pk":
    head_sampler = samplers.PKSampler(
      head_train["label"],
      head.p,
      head.batch_size // head.p,
      seed + HEAD_SEED_OFFSET,
      int(head_mask.sum()),
    )
  else:
    head_sampler = samplers.RandomSampler(
      len(head_train["label"]), head.batch_size, seed + HEAD_SEED_OFFSET
    )
  return {"head_": (head_train, head_sampler), "pk_": (train, pk_sampler)}


def streams_batch_fn(streams_of_arm: dict, mesh) -> Any:
  """`batch_fn(step)` merging every stream's batch (keys prefixed), placed on the mesh."""

  def batch_fn(step: int) -> dict:
    out = {}
    for prefix, (arrays, sampler) in streams_of_arm.items():
      idx = samplers.process_slice(sampler.indices(step), jax.process_index(), jax.process_count())
      out.update({prefix + k: arrays[k][idx] for k in ("image", "label")})
    return parallel.shard_batch(out, mesh)

  return batch_fn


def embed_eval_step(params: Any, batch: dict, *, model: Any) -> dict:
  """Logits, embeddings and pooled features of a batch, for `predict.predict`.

  Returns:
    {"embedding": [B, D], "pooled": [B, F], "logits": [B, C]}.
  """
  out = model.apply({"params": params}, steps.images_to_float(batch["image"]))
  return {k: out[k] for k in ("embedding", "pooled", "logits")}


def predictions(
  train_out: dict, test_out: dict, train_labels: np.ndarray, num_classes: int
) -> dict[str, np.ndarray]:
  """{rule: [N_test] predictions} for every rule of `PREDICTION_RULES`, for any arm.

  `ncm` (METHODS.md M3 step 5) and `ncm_pooled`: nearest class mean by cosine similarity of
  the L2-normalised `embedding` / `pooled` features, class means over all classes from the
  long-tailed training set. `softmax`: argmax of the logits over all classes.

  Args:
    train_out: {"embedding": [N_train, D], "pooled": [N_train, F]} of the training set.
    test_out: {"embedding": [N, D], "pooled": [N, F], "logits": [N, C]} of the test set.
    train_labels: [N_train] labels of the training set.
    num_classes: C.
  """
  labels = jnp.asarray(train_labels)
  present = core.class_presence(labels, num_classes)
  out = {}
  for rule, feature in RULE_FEATURE.items():
    means = core.class_means(jnp.asarray(train_out[feature]), labels, num_classes)
    out[rule] = np.asarray(core.ncm_predict(jnp.asarray(test_out[feature]), means, present))
  out["softmax"] = np.argmax(test_out["logits"], -1)
  return out


def head_softmax_accuracy(logits: np.ndarray, labels: np.ndarray, head_mask: np.ndarray) -> float:
  """Accuracy of the head classifier's softmax on the test samples of head classes.

  Args:
    logits: [N, C] logits of the shared classifier; the head classifier is its head columns.
    labels: [N] original class ids.
    head_mask: [C] bool head classes.

  Returns:
    accuracy over the test samples whose class is a head class.
  """
  in_head = head_mask[labels]
  head_ids = np.flatnonzero(head_mask)
  pred = head_ids[np.argmax(logits[in_head][:, head_ids], -1)]
  return float(np.mean(pred == labels[in_head]))
