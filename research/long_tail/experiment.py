"""Experiment of method M3: head-set CE plus whole-set triplet loss on long-tailed data.

METHODS.md M3 (seed 002). For each imbalance ratio of `config.data.imbalance_ratios` and each
seed, five methods train the same ResNet in the same harness (same steps, same images per
step, the generic `steps.train_step` with a method-specific loss, `train_loop` with
checkpoints):

* `dual` (the method): one compiled step takes a head batch (random or PK from the head set,
  step 2) and a PK batch from the whole set (step 3) and minimises
  `lambda_ce * CE(head classes) + lambda_tri * triplet` (step 4; the head classifier is the
  head-class rows of the shared classifier layer, so all methods share one model); inference
  is the nearest class mean of normalised embeddings over all classes, class means from the
  training set (step 5), and the head classifier's softmax is reported for the head classes.
* `ce` (plain cross-entropy, random batches), `ce_balanced` (class-balanced sampling),
  `logit_adjusted` (Menon et al. 2021 loss, raw-logit prediction): argmax of the logits.
* `triplet` (triplet loss only, PK batches from the whole set): nearest class mean.

Accuracy on the balanced test set is reported overall and per many/medium/few-shot group
(thresholds `config.eval.many` / `config.eval.few` on the training counts), as mean and
spread over seeds, with a per-class accuracy plot against class size and a 2-D PCA plot of
the test embeddings.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import ml_collections
import numpy as np

from research import config_checks, losses
from research.data import samplers
from research.long_tail import core
from research.metrics.seeds import mean_std
from research.supervised import classification
from research.training import harness, loop, parallel, report, state, steps

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METHODS = ("dual", "ce", "ce_balanced", "logit_adjusted", "triplet")
METHOD_NAMES = {
  "dual": "dual loss (M3: head CE + PK triplet)",
  "ce": "plain CE",
  "ce_balanced": "CE, class-balanced sampling",
  "logit_adjusted": "logit-adjusted CE",
  "triplet": "triplet only",
}
NCM_METHODS = ("dual", "triplet")
DATASETS = ("digits", "cifar10", "cifar100")
HEAD_SAMPLING = ("random", "pk")
GROUPS = ("overall", "many", "medium", "few")


# ----------------------------------------------------------------------------------------------
# Configuration.


def validate(config: ml_collections.ConfigDict) -> None:
  """Fails at once, naming the field, on any value the experiment cannot use."""
  config_checks.check_choice(config, "data.name", DATASETS)
  ratios = config_checks.get_field(config, "data.imbalance_ratios")
  if not isinstance(ratios, tuple | list) or not ratios:
    raise config_checks.ConfigError(
      f"config.data.imbalance_ratios={ratios!r} is not allowed: give a non-empty tuple of ratios"
    )
  for r in ratios:
    if isinstance(r, bool) or not isinstance(r, int | float) or r < 1:
      raise config_checks.ConfigError(
        f"config.data.imbalance_ratios={tuple(ratios)!r} is not allowed: every ratio must be a "
        "number >= 1"
      )
  mode = config_checks.check_choice(config, "head.mode", core.HEAD_MODES)
  if mode == "threshold":
    config_checks.check_int(config, "head.threshold", 0)
  elif mode == "ratio":
    config_checks.check_float(config, "head.ratio", 0.0, 1.0, exclusive_minimum=True)
  else:
    config_checks.check_int(config, "head.top_n", 1)
  sampling = config_checks.check_choice(config, "head.sampling", HEAD_SAMPLING)
  head_batch = config_checks.check_int(config, "train.head_batch_size", 1)
  if sampling == "pk":
    head_p = config_checks.check_int(config, "head.p", 1)
    if head_batch % head_p:
      raise config_checks.ConfigError(
        f"config.head.p={head_p} is not allowed: it must divide "
        f"config.train.head_batch_size={head_batch}"
      )
  p = config_checks.check_int(config, "triplet.p", 2)
  config_checks.check_int(config, "triplet.k", 2)
  config_checks.check_choice(config, "triplet.mining", core.MINING_MODES)
  config_checks.check_float(config, "triplet.margin", 0.0)
  lambda_ce = config_checks.check_float(config, "loss.lambda_ce", 0.0)
  lambda_tri = config_checks.check_float(config, "loss.lambda_tri", 0.0)
  if lambda_ce == 0 and lambda_tri == 0:
    raise config_checks.ConfigError(
      "config.loss.lambda_ce=0 and config.loss.lambda_tri=0 is not allowed: one must be > 0"
    )
  config_checks.check_float(config, "loss.logit_adjust_tau", 0.0)
  few = config_checks.check_int(config, "eval.few", 0)
  config_checks.check_int(config, "eval.many", few)
  methods = config_checks.get_field(config, "methods")
  if not isinstance(methods, tuple | list) or "dual" not in methods or set(methods) - set(METHODS):
    raise config_checks.ConfigError(
      f"config.methods={methods!r} is not allowed: give 'dual' and any of {METHODS}"
    )
  config_checks.check_int(config, "num_seeds", 1)
  config_checks.check_int(config, "seed", 0)
  config_checks.check_int(config, "train.steps", 1)
  batch = config_checks.check_int(config, "train.batch_size", 1)
  if batch % p or batch // p < 2:
    raise config_checks.ConfigError(
      f"config.train.batch_size={batch} is not allowed: the triplet-only baseline draws P x K = "
      f"batch_size images, so it must be a multiple of config.triplet.p={p} with K >= 2"
    )
  config_checks.check_int(config, "train.eval_batch_size", 1)
  config_checks.check_int(config, "train.log_every", 1)
  config_checks.check_int(config, "train.checkpoint_every", 0)
  config_checks.check_int(config, "model.embedding_dim", 2)


def config_for_ratio(config: ml_collections.ConfigDict, ratio: float) -> ml_collections.ConfigDict:
  """A copy of `config` whose `data.imbalance_ratio` is `ratio` (read by the data loader)."""
  out = config.copy_and_resolve_references()
  with out.unlocked():
    out.data.imbalance_ratio = float(ratio)
  return out


def head_mask_from_config(config: ml_collections.ConfigDict, counts: np.ndarray) -> np.ndarray:
  """The head set of METHODS.md M3 step 1 from the training counts ([C] bool)."""
  h = config.head
  return core.head_classes(
    counts, h.mode, threshold=h.get("threshold"), ratio=h.get("ratio"), top_n=h.get("top_n")
  )


def check_p_fits(config: ml_collections.ConfigDict, num_classes: int, num_head: int) -> None:
  """P of the PK samplers must not exceed the classes it draws from (whole set, head set)."""
  if config.triplet.p > num_classes:
    raise config_checks.ConfigError(
      f"config.triplet.p={config.triplet.p} is not allowed: it must be <= the number of classes "
      f"({num_classes})"
    )
  if config.head.sampling == "pk" and config.head.p > num_head:
    raise config_checks.ConfigError(
      f"config.head.p={config.head.p} is not allowed: it must be <= the number of head classes "
      f"({num_head})"
    )


# ----------------------------------------------------------------------------------------------
# Pure loss functions (`loss_fn(params, batch, rng) -> (loss, metrics)` for `steps.train_step`).


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
  every method shares one architecture; the softmax runs over the head classes only.

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
) -> tuple[jax.Array, dict]:
  """Triplet-only baseline: the whole-set branch of M3 alone ({"pk_image", "pk_label"})."""
  emb = _forward(model, params, batch["pk_image"], rng, augment)["embedding"]
  tri = core.triplet_loss(emb, batch["pk_label"], mining=mining, margin=margin)
  return tri, {"triplet": tri}


def embed_eval_step(params: Any, batch: dict, *, model: Any, num_classes: int) -> dict:
  """Logits, embeddings and pooled features of a padded batch, for `harness.evaluate`.

  Returns:
    {"confusion": [C, C] counts of the logits' argmax, "embedding": [B, D], "pooled": [B, F],
     "logits": [B, C]}.
  """
  out = model.apply({"params": params}, steps.images_to_float(batch["image"]))
  logits = out["logits"]
  return {
    "confusion": steps.confusion_counts(
      batch["label"], jnp.argmax(logits, -1), batch["valid"], num_classes
    ),
    "embedding": out["embedding"],
    "pooled": out["pooled"],
    "logits": logits,
  }


# ----------------------------------------------------------------------------------------------
# Per-method set-up: model, loss, batch streams.


def _streams(config, method: str, train: dict, head_mask: np.ndarray, seed: int) -> dict:
  """{prefix: (arrays, sampler)}: the batch streams of one method; batch keys are prefix+key."""
  labels = train["label"]
  num_classes = len(head_mask)
  batch, p = config.train.batch_size, config.triplet.p
  if method in ("ce", "logit_adjusted"):
    return {"": (train, samplers.RandomSampler(len(labels), batch, seed))}
  if method == "ce_balanced":
    return {"": (train, samplers.ClassBalancedSampler(labels, batch, seed, num_classes))}
  if method == "triplet":
    return {"pk_": (train, samplers.PKSampler(labels, p, batch // p, seed, num_classes))}
  in_head = head_mask[labels]
  head_train = {
    "image": train["image"][in_head],
    "label": core.head_label_map(head_mask)[labels][in_head],
  }
  head_batch = config.train.head_batch_size
  if config.head.sampling == "pk":
    head_sampler = samplers.PKSampler(
      head_train["label"],
      config.head.p,
      head_batch // config.head.p,
      seed + 7919,
      int(head_mask.sum()),
    )
  else:
    head_sampler = samplers.RandomSampler(len(head_train["label"]), head_batch, seed + 7919)
  pk_sampler = samplers.PKSampler(labels, p, config.triplet.k, seed, num_classes)
  return {"head_": (head_train, head_sampler), "pk_": (train, pk_sampler)}


def streams_batch_fn(streams: dict, mesh) -> Any:
  """`batch_fn(step)` merging every stream's batch (keys prefixed), placed on the mesh."""

  def batch_fn(step: int) -> dict:
    out = {}
    for prefix, (arrays, sampler) in streams.items():
      idx = samplers.process_slice(sampler.indices(step), jax.process_index(), jax.process_count())
      out.update({prefix + k: arrays[k][idx] for k in ("image", "label")})
    return parallel.shard_batch(out, mesh)

  return batch_fn


def images_per_step(config, method: str) -> int:
  """Training images one step of `method` sees (the compute budget per step)."""
  if method == "dual":
    return config.train.head_batch_size + config.triplet.p * config.triplet.k
  return config.train.batch_size


def method_loss_fn(config, method: str, model: Any, head_mask, counts) -> Any:
  """The `loss_fn(params, batch, rng)` of a method for `steps.train_step`."""
  augment = bool(config.data.augment)
  tri = dict(mining=config.triplet.mining, margin=float(config.triplet.margin), augment=augment)
  if method == "dual":
    return functools.partial(
      dual_loss_fn,
      model=model,
      head_classes=np.flatnonzero(head_mask),
      lambda_ce=float(config.loss.lambda_ce),
      lambda_tri=float(config.loss.lambda_tri),
      **tri,
    )
  if method == "triplet":
    return functools.partial(triplet_loss_fn, model=model, **tri)
  prior = core.log_prior(counts) if method == "logit_adjusted" else None
  return functools.partial(
    ce_loss_fn,
    model=model,
    log_prior=prior,
    tau=float(config.loss.logit_adjust_tau),
    augment=augment,
  )


# ----------------------------------------------------------------------------------------------
# Evaluation (METHODS.md M3 step 5 and "Measure").


def predict(
  method: str,
  train_out: dict,
  test_out: dict,
  train_labels: np.ndarray,
  num_classes: int,
) -> np.ndarray:
  """[N_test] predictions: nearest class mean (all classes) or the logits' argmax."""
  if method in NCM_METHODS:
    means = core.class_means(
      jnp.asarray(train_out["embedding"]), jnp.asarray(train_labels), num_classes
    )
    present = core.class_presence(jnp.asarray(train_labels), num_classes)
    return np.asarray(core.ncm_predict(jnp.asarray(test_out["embedding"]), means, present))
  return np.argmax(test_out["logits"], -1)


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


def pca_2d(x: np.ndarray) -> np.ndarray:
  """[N, D] -> [N, 2] projection on the two leading principal components."""
  centred = x - x.mean(0, keepdims=True)
  _, _, vt = np.linalg.svd(centred, full_matrices=False)
  return centred @ vt[:2].T


def plot_embeddings(panels: dict[str, tuple[np.ndarray, np.ndarray]], num_classes: int, path: str):
  """Side-by-side 2-D PCA scatter plots: {title: ([N, D] features, [N] labels)}."""
  fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
  palette = report.class_palette(num_classes)
  for ax, (title, (feats, labels)) in zip(axes[0], panels.items()):
    xy = pca_2d(np.asarray(feats, np.float64))
    ax.scatter(xy[:, 0], xy[:, 1], c=palette[labels], s=6)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
  handles = [
    plt.Line2D([], [], marker="o", ls="", color=palette[c], label=str(c))
    for c in range(min(num_classes, 20))
  ]
  axes[0, -1].legend(handles=handles, fontsize=6, loc="center left", bbox_to_anchor=(1, 0.5))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100, bbox_inches="tight")
  plt.close(fig)
  return path


# ----------------------------------------------------------------------------------------------
# Training and evaluation of one (ratio, method).


def _run_method(config, run, shared, data, method: str, head_mask, counts, ratio) -> list[dict]:
  """Trains and evaluates `method` for every seed; returns one result dict per seed.

  `shared` holds what every method reuses (one compilation each): the model, its jitted
  `init`, the optimizer and the compiled eval step.
  """
  num_classes = data["num_classes"]
  model, tx, eval_step = shared["model"], shared["tx"], shared["eval_step"]
  loss_fn = method_loss_fn(config, method, model, head_mask, counts)
  step = parallel.compile_train_step(
    functools.partial(steps.train_step, loss_fn=loss_fn, tx=tx), run.mesh
  )
  results = []
  for i in range(config.num_seeds):
    seed = config.seed + i
    streams = _streams(config, method, data["train"], head_mask, seed)
    for prefix, (_, sampler) in streams.items():
      field = "train.head_batch_size" if prefix == "head_" else "train.batch_size"
      parallel.check_batch_divisible(sampler.batch_size, run.mesh, field)
    rng = jax.random.key(seed)
    sample = jnp.zeros((1,) + data["train"]["image"].shape[1:], jnp.float32)
    params = shared["init"](rng, sample)["params"]
    train_state = parallel.replicate(state.create_train_state(params, tx), run.mesh)
    name = f"rho{ratio:g}_{method}_seed{seed}"
    checkpointer = run.checkpointer(f"{name}_checkpoints")
    train_state, _ = loop.restore_or_init(checkpointer, train_state)
    train_state = loop.train_loop(
      train_state,
      step,
      streams_batch_fn(streams, run.mesh),
      jax.random.fold_in(rng, 1),
      num_steps=config.train.steps,
      checkpointer=checkpointer,
      checkpoint_every=config.train.checkpoint_every,
      log_every=config.train.log_every,
      writer=run.writer,
      examples_per_step=images_per_step(config, method),
      name=name,
    )
    checkpointer.close()
    outs = {
      split: harness.evaluate(
        eval_step,
        train_state.params,
        data[split],
        config.train.eval_batch_size,
        run.mesh,
        ("image", "label"),
        collect=("embedding", "pooled", "logits"),
      )
      for split in ("train", "test")
    }
    test_labels = data["test"]["label"]
    pred = predict(method, outs["train"], outs["test"], data["train"]["label"], num_classes)
    acc = core.shot_group_accuracy(pred, test_labels, counts, config.eval.many, config.eval.few)
    if method == "dual":
      acc["head_softmax"] = head_softmax_accuracy(outs["test"]["logits"], test_labels, head_mask)
    run.writer.write(
      config.train.steps, {k: v for k, v in acc.items() if k != "per_class"}, phase=f"{name}_test"
    )
    features = outs["test"]["embedding" if method in NCM_METHODS else "pooled"]
    results.append({**acc, "features": features})
  return results


def shared_setup(config, run, num_classes: int) -> dict:
  """The model, jitted init, optimizer and compiled eval step shared by every method."""
  parallel.check_batch_divisible(config.train.eval_batch_size, run.mesh, "train.eval_batch_size")
  model = classification.build_model(config, num_classes)
  return {
    "model": model,
    "init": jax.jit(model.init),
    "tx": state.make_optimizer(config.optim, config.train.steps),
    "eval_step": parallel.compile_eval_step(
      functools.partial(embed_eval_step, model=model, num_classes=num_classes)
    ),
  }


def _fmt(mean: float, std: float, n: int) -> str:
  if np.isnan(mean):
    return "n/a"
  return f"{100 * mean:.1f} ± {100 * std:.1f}" if n > 1 else f"{100 * mean:.1f}"


def standing_sentences(stats: dict[str, dict], n: int) -> list[str]:
  """Plain statements of where `dual` stands against each baseline on few-shot and overall.

  A difference no larger than the larger of the two seed spreads (sample std) is called
  'within the seed spread'; with one seed there is no spread and every difference is stated.
  """
  lines = []
  for method, s in stats.items():
    if method == "dual":
      continue
    parts = []
    for group in ("few", "overall"):
      (d_mean, d_std), (b_mean, b_std) = stats["dual"][group], s[group]
      name = "few-shot" if group == "few" else "overall"
      if np.isnan(d_mean) or np.isnan(b_mean):
        parts.append(f"{name} n/a (no such classes)")
        continue
      diff = 100 * (d_mean - b_mean)
      if n > 1 and abs(diff) <= 100 * max(d_std, b_std):
        verdict = "within the seed spread"
      else:
        verdict = "above" if diff > 0 else "below" if diff < 0 else "equal"
      parts.append(f"{name} {diff:+.1f} points ({verdict})")
    lines.append(f"- vs {METHOD_NAMES[method]}: " + "; ".join(parts) + ".")
  return lines


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs M3 and its baselines on every imbalance ratio and seed; writes the report.

  Returns:
    the run summary (also written to `<workdir>/summary.json`).
  """
  validate(config)
  run = harness.start_run(workdir)
  n = config.num_seeds
  sections, metrics, rows = [], {}, []
  setup_rows = []
  shared = {}
  for ratio in config.data.imbalance_ratios:
    data = classification.load_classification_data(config_for_ratio(config, ratio))
    num_classes = data["num_classes"]
    if not shared:
      shared = shared_setup(config, run, num_classes)
    counts = np.bincount(data["train"]["label"], minlength=num_classes)
    head_mask = head_mask_from_config(config, counts)
    check_p_fits(config, num_classes, int(head_mask.sum()))
    results = {
      m: _run_method(config, run, shared, data, m, head_mask, counts, ratio) for m in config.methods
    }
    stats = {
      m: {
        g: mean_std([r[g] for r in rs]) for g in GROUPS + (("head_softmax",) if m == "dual" else ())
      }
      for m, rs in results.items()
    }
    metrics[f"rho{ratio:g}"] = {
      m: {g: {"mean": ms[0], "std": ms[1]} for g, ms in s.items()} for m, s in stats.items()
    }
    many = np.flatnonzero(counts > config.eval.many)
    few = np.flatnonzero(counts < config.eval.few)
    medium = np.setdiff1d(np.arange(num_classes), np.concatenate([many, few]))
    setup_rows.append(
      [
        f"{ratio:g}",
        " ".join(str(c) for c in counts)
        if num_classes <= 20
        else f"{counts.max()} .. {counts.min()}",
        int(counts.sum()),
        f"{len(many)} / {len(medium)} / {len(few)}",
        " ".join(map(str, np.flatnonzero(head_mask)))
        if num_classes <= 20
        else int(head_mask.sum()),
      ]
    )
    table_rows = [
      [METHOD_NAMES[m]]
      + [_fmt(*s[g], n) for g in GROUPS]
      + [_fmt(*s["head_softmax"], n) if m == "dual" else ""]
      for m, s in stats.items()
    ]
    body = report.markdown_table(
      ["method", "overall", "many-shot", "medium-shot", "few-shot", "head softmax (head classes)"],
      table_rows,
    )
    body += "\n\nWhere the dual-loss method stands (difference of means, percentage points):\n\n"
    body += "\n".join(standing_sentences(stats, n))
    sections.append(
      (f"Results, imbalance ratio {ratio:g} (test accuracy %, balanced test set)", body)
    )
    # Per-class accuracy vs class size.
    series = {}
    order = np.argsort(-counts, kind="stable")
    for m, rs in results.items():
      per_class = np.stack([r["per_class"] for r in rs])
      series[METHOD_NAMES[m]] = (
        counts[order].tolist(),
        np.nanmean(per_class, 0)[order].tolist(),
        np.nanstd(per_class, 0)[order] if n > 1 else None,
      )
    per_class_path = run.plot_path(f"per_class_accuracy_rho{ratio:g}.png")
    report.plot_curves(series, "training images of the class", "test accuracy", per_class_path)
    panels = {
      METHOD_NAMES[m] + (" (embedding)" if m in NCM_METHODS else " (pooled features)"): (
        results[m][0]["features"],
        data["test"]["label"],
      )
      for m in ("dual", "ce", "triplet")
      if m in results
    }
    plot_embeddings(panels, num_classes, run.plot_path(f"embeddings_rho{ratio:g}.png"))
    sections.append(
      (
        f"Plots, imbalance ratio {ratio:g}",
        f"![per-class accuracy vs class size](plots/per_class_accuracy_rho{ratio:g}.png)\n\n"
        f"![2-D PCA of test features, seed {config.seed}](plots/embeddings_rho{ratio:g}.png)",
      )
    )
    baselines = [m for m in stats if m != "dual"]
    if ratio == config.data.imbalance_ratios[0] and baselines:
      baseline = "ce" if "ce" in stats else baselines[0]
      for group, label in (("few", "few-shot accuracy"), ("overall", "overall accuracy")):
        rows.append(
          harness.summary_row(
            f"{label} (rho={ratio:g}, {n} seed{'s' if n > 1 else ''})",
            stats["dual"][group][0],
            METHOD_NAMES[baseline],
            stats[baseline][group][0],
          )
        )
  setup = report.markdown_table(
    [
      "imbalance ratio",
      "training images per class",
      "total",
      "many / medium / few classes",
      "head classes",
    ],
    setup_rows,
  )
  setup += "\n\n" + setup_text(config)
  sections.insert(0, ("Set-up", setup))
  title = f"M3 long-tail dual-loss training on {config.data.name}-LT"
  report.write_report(run.workdir, title, sections)
  out = {
    "experiment": "long_tail",
    "dataset": config.data.name,
    "time_s": run.elapsed(),
    "metrics": metrics,
    "rows": rows,
  }
  harness.write_summary(run.workdir, out)
  return out


def setup_text(config: ml_collections.ConfigDict) -> str:
  """The report's description of the protocol."""
  n = config.num_seeds
  budget = ", ".join(f"{m} {images_per_step(config, m)}" for m in config.methods)
  head = config.head
  head_rule = {
    "threshold": f"classes with more than {head.get('threshold')} training images",
    "ratio": f"the top {head.get('ratio')} fraction of classes by count (ties at the cut excluded)",
    "count": f"the top {head.get('top_n')} classes by count (ties at the cut excluded)",
  }[head.mode]
  lines = [
    f"- Same ResNet (stages {tuple(config.model.stage_sizes)}, widths "
    f"{tuple(config.model.widths)}, embedding {config.model.embedding_dim}), optimizer "
    f"{config.optim.name} lr {config.optim.learning_rate} ({config.optim.schedule}), "
    f"{config.train.steps} steps for every method; images per step: {budget}.",
    f"- Head set (step 1): {head_rule}; head batch {config.train.head_batch_size} "
    f"({head.sampling} sampling); PK batch P={config.triplet.p} x K={config.triplet.k} from the "
    f"whole set; triplet {config.triplet.mining}, margin {config.triplet.margin}; "
    f"lambda_ce={config.loss.lambda_ce}, lambda_tri={config.loss.lambda_tri}. The head "
    "classifier is the head-class rows of the shared classifier layer, its softmax over the head "
    "classes only; the triplet loss acts on the L2-normalised embedding.",
    "- Prediction: dual and triplet-only by nearest class mean of the normalised embeddings over "
    "all classes (class means from the long-tailed training set); CE baselines by the argmax of "
    "their logits (logit-adjusted CE: raw logits, tau="
    f"{config.loss.logit_adjust_tau}). 'head softmax' is the dual model's head classifier on the "
    "test images of head classes only.",
    f"- Shot groups by training count: many > {config.eval.many}, few < {config.eval.few}, "
    "medium otherwise (group accuracy = mean of its classes' accuracies).",
    f"- {n} seed{'s' if n > 1 else ''} (model init and batch order); "
    + ("'a ± b' is mean ± sample std over seeds." if n > 1 else "no spread at this size.")
    + " The long-tailed subset itself is fixed (seed 0).",
  ]
  if config.get("notes"):
    lines.append(f"- {config.notes}")
  return "\n".join(lines)
