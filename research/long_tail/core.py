"""Pure functions of method M3: head/whole-set dual-loss training for long-tailed data.

METHODS.md M3 (seed 002): the classes with the most training samples form the head set; a
softmax cross-entropy over the head classes (head branch) and a triplet loss on PK-sampled
embeddings of the whole set (whole-set branch) update the same network in the same step;
inference is nearest class mean (NCM) on L2-normalised embeddings.

Host-side helpers (head split, label maps, shot-group accuracy) use numpy; the losses and NCM
are jit-compatible jax functions with fixed shapes and optional validity masks for padding.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

HEAD_MODES = ("threshold", "ratio", "count")
MINING_MODES = ("batch_hard", "batch_all", "soft_margin")
_NORM_EPS = 1e-12


# ----------------------------------------------------------------------------------------------
# Head set (METHODS.md M3 step 1), host side.


def _check_class_counts(class_counts) -> np.ndarray:
  counts = np.asarray(class_counts)
  if counts.ndim != 1 or counts.size == 0:
    raise ValueError(
      f"class_counts with shape {counts.shape} is not allowed: class_counts must be a non-empty "
      "1-D array of per-class sample counts"
    )
  if not np.issubdtype(counts.dtype, np.integer) or np.any(counts < 0):
    raise ValueError(
      f"class_counts={counts.tolist()} is not allowed: counts must be non-negative integers"
    )
  return counts.astype(np.int64)


def _top_k_strict(counts: np.ndarray, k: int) -> np.ndarray:
  """The top-`k` classes by count, dropping every class tied with the first one left out."""
  if k >= counts.size:
    return np.ones(counts.size, dtype=bool)
  first_left_out = np.sort(counts)[::-1][k]
  return counts > first_left_out


def head_classes(class_counts, mode: str, threshold=None, ratio=None, top_n=None) -> np.ndarray:
  """Splits the classes into head and non-head by their training-sample counts.

  METHODS.md M3 step 1 (seed 002, steps s12: "classes with more training data than a preset
  threshold", "the classes with the most training data, by a preset ratio or number").

  * ``'threshold'``: head = classes with ``count > threshold``.
  * ``'ratio'``: head = the top ``k = ceil(ratio * C)`` classes by count, ``ratio`` in (0, 1].
  * ``'count'``: head = the top ``k = top_n`` classes by count, ``1 <= top_n <= C``.

  Ties at the cut (ratio and count modes): every class whose count equals the count of the
  first class left out is *excluded* too, so the head set may have fewer than ``k`` classes but
  never more, and every head class has strictly more samples than every non-head class. If this
  leaves no head class (e.g. all counts equal and ``k < C``), a ``ValueError`` is raised.

  Args:
    class_counts: ``[C]`` non-negative integer training-sample counts per class.
    mode: one of ``'threshold'``, ``'ratio'``, ``'count'``.
    threshold: the count threshold ``T`` (mode ``'threshold'``).
    ratio: the head fraction ``r`` of classes, in (0, 1] (mode ``'ratio'``).
    top_n: the number ``n`` of head classes (mode ``'count'``).

  Returns:
    ``[C]`` bool mask, True for head classes.

  Raises:
    ValueError: unknown mode, missing or out-of-range mode argument, bad counts, or an empty
      head set.
  """
  counts = _check_class_counts(class_counts)
  num_classes = counts.size
  if mode == "threshold":
    if threshold is None:
      raise ValueError("threshold=None is not allowed: mode 'threshold' needs a number threshold")
    head = counts > threshold
  elif mode == "ratio":
    if ratio is None or not 0.0 < ratio <= 1.0:
      raise ValueError(f"ratio={ratio} is not allowed: ratio must be in (0, 1] for mode 'ratio'")
    # The small tolerance keeps e.g. ceil(0.3 * 10) at 3 despite 0.3 * 10 = 3.0000000000000004.
    head = _top_k_strict(counts, math.ceil(ratio * num_classes - 1e-9))
  elif mode == "count":
    if top_n is None or int(top_n) != top_n or not 1 <= top_n <= num_classes:
      raise ValueError(
        f"top_n={top_n} is not allowed: top_n must be an integer in [1, {num_classes}] "
        "(the number of classes) for mode 'count'"
      )
    head = _top_k_strict(counts, int(top_n))
  else:
    raise ValueError(f"mode={mode!r} is not allowed: mode must be one of {HEAD_MODES}")
  if not head.any():
    raise ValueError(
      f"the head set is empty for mode={mode!r} (threshold={threshold}, ratio={ratio}, "
      f"top_n={top_n}) and class_counts={counts.tolist()}: choose a smaller threshold or a "
      "larger ratio/top_n (classes tied at the cut are excluded)"
    )
  return head


def head_label_map(head_mask) -> np.ndarray:
  """Maps original class ids to head-classifier indices (METHODS.md M3 step 2).

  Head classes are numbered ``0 .. H-1`` in increasing original class id; the inverse map is
  ``np.flatnonzero(head_mask)``. Remap labels with ``head_label_map(mask)[labels]``.

  Args:
    head_mask: ``[C]`` bool mask of head classes (from `head_classes`).

  Returns:
    ``[C]`` int32 array: the head index of each head class, -1 for non-head classes.
  """
  mask = np.asarray(head_mask)
  if mask.ndim != 1 or mask.dtype != np.bool_:
    raise ValueError(
      f"head_mask with dtype {mask.dtype} and shape {mask.shape} is not allowed: head_mask must "
      "be a 1-D bool array"
    )
  label_map = np.full(mask.shape, -1, dtype=np.int32)
  label_map[mask] = np.arange(int(mask.sum()), dtype=np.int32)
  return label_map


def log_prior(class_counts) -> np.ndarray:
  """Log class prior ``log(n_c / sum n)`` from training counts, for `logit_adjusted_ce`.

  Args:
    class_counts: ``[C]`` positive integer training-sample counts.

  Returns:
    ``[C]`` float32 log prior.
  """
  counts = _check_class_counts(class_counts)
  if np.any(counts == 0):
    raise ValueError(
      f"class_counts={counts.tolist()} is not allowed: the log prior needs every count > 0"
    )
  return np.log(counts / counts.sum()).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Triplet losses (METHODS.md M3 step 3), jit-compatible.


def _check_margin(margin) -> None:
  if not float(margin) >= 0.0:
    raise ValueError(f"margin={margin} is not allowed: margin must be >= 0")


def pairwise_distances(emb: jax.Array, squared: bool = False) -> jax.Array:
  """Euclidean distances between all rows, with a finite gradient at zero distance.

  Args:
    emb: ``[B, D]`` embeddings.
    squared: return squared distances.

  Returns:
    ``[B, B]`` distances; exactly 0 on the diagonal.
  """
  sq_norms = jnp.sum(emb * emb, axis=-1)
  gram = jnp.matmul(emb, emb.T, precision=jax.lax.Precision.HIGHEST)
  d2 = jnp.maximum(sq_norms[:, None] + sq_norms[None, :] - 2.0 * gram, 0.0)
  d2 = jnp.where(jnp.eye(emb.shape[0], dtype=bool), 0.0, d2)
  if squared:
    return d2
  # Double `where` so that sqrt's infinite derivative at 0 never meets the chain rule.
  nonzero = d2 > 0.0
  return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, d2, 1.0)), 0.0)


def _pair_masks(labels: jax.Array, valid: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """``[B, B]`` masks of valid (anchor, positive) pairs (same label, not self) and negatives."""
  batch = labels.shape[0]
  valid = jnp.ones((batch,), bool) if valid is None else valid.astype(bool)
  both_valid = valid[:, None] & valid[None, :]
  same = labels[:, None] == labels[None, :]
  positive = same & ~jnp.eye(batch, dtype=bool) & both_valid
  negative = ~same & both_valid
  return positive, negative


def _hardest_pairs(emb, labels, squared, valid):
  """Per anchor: hardest positive and negative distance, and whether the anchor has both."""
  dist = pairwise_distances(emb, squared)
  positive, negative = _pair_masks(labels, valid)
  anchor_ok = positive.any(axis=1) & negative.any(axis=1)
  d_ap = jnp.max(jnp.where(positive, dist, 0.0), axis=1)
  d_an = jnp.min(jnp.where(negative, dist, jnp.inf), axis=1)
  return d_ap, jnp.where(anchor_ok, d_an, 0.0), anchor_ok


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of ``values`` over ``mask``; 0 when the mask is empty."""
  total = jnp.sum(jnp.where(mask, values, 0.0))
  return total / jnp.maximum(jnp.sum(mask), 1).astype(values.dtype)


def batch_hard_triplet_loss(
  emb: jax.Array,
  labels: jax.Array,
  margin: float,
  *,
  squared: bool = False,
  valid: jax.Array | None = None,
) -> jax.Array:
  """Batch-hard triplet loss (Hermans et al. 2017), METHODS.md M3 step 3 default.

  Per anchor ``a``: ``relu(max_p d(a, p) - min_n d(a, n) + margin)`` over positives ``p != a``
  with the anchor's label and negatives ``n`` with another label, all valid. The mean runs over
  anchors that have at least one positive and one negative; with none the loss is 0.

  Args:
    emb: ``[B, D]`` embeddings.
    labels: ``[B]`` integer class labels.
    margin: margin ``m >= 0`` (a Python number).
    squared: use squared Euclidean distances.
    valid: optional ``[B]`` bool mask; False rows (padding) take no part.

  Returns:
    Scalar loss.
  """
  _check_margin(margin)
  d_ap, d_an, anchor_ok = _hardest_pairs(emb, labels, squared, valid)
  return _masked_mean(jax.nn.relu(d_ap - d_an + margin), anchor_ok)


def _soft_margin_triplet_loss(
  emb: jax.Array, labels: jax.Array, squared: bool, valid: jax.Array | None
) -> jax.Array:
  """Soft-margin batch-hard triplet loss ``softplus(d_ap - d_an)`` (Hermans et al. 2017).

  METHODS.md M3 step 3 option 'soft_margin'. Same hardest pairs and anchor averaging as
  `batch_hard_triplet_loss`; there is no margin. Arguments and result as in `triplet_loss`.
  """
  d_ap, d_an, anchor_ok = _hardest_pairs(emb, labels, squared, valid)
  return _masked_mean(jax.nn.softplus(d_ap - d_an), anchor_ok)


def _batch_all_triplet_loss(
  emb: jax.Array, labels: jax.Array, margin: float, squared: bool, valid: jax.Array | None
) -> jax.Array:
  """Batch-all triplet loss, METHODS.md M3 step 3 option 'batch_all'.

  ``relu(d(a, p) - d(a, n) + margin)`` over every valid triplet (``p != a`` same label as
  ``a``, ``n`` another label), averaged over the triplets whose loss is > 0 (Hermans et al.
  2017 "BA≠0", as in the common TF implementation); 0 when no triplet is active. Uses a
  ``[B, B, B]`` intermediate.

  Arguments and result as in `triplet_loss`.
  """
  _check_margin(margin)
  dist = pairwise_distances(emb, squared)
  positive, negative = _pair_masks(labels, valid)
  triplet_ok = positive[:, :, None] & negative[:, None, :]
  losses = jax.nn.relu(dist[:, :, None] - dist[:, None, :] + margin)
  return _masked_mean(losses, triplet_ok & (losses > 0.0))


def triplet_loss(
  emb: jax.Array,
  labels: jax.Array,
  *,
  mining: str = "batch_hard",
  margin: float = 0.3,
  squared: bool = False,
  valid: jax.Array | None = None,
) -> jax.Array:
  """Triplet loss with the chosen mining, METHODS.md M3 step 3.

  Args:
    emb: ``[B, D]`` embeddings.
    labels: ``[B]`` integer class labels.
    mining: ``'batch_hard'`` (default), ``'batch_all'`` or ``'soft_margin'``.
    margin: margin ``m >= 0`` (a Python number); unused by ``'soft_margin'``.
    squared: use squared Euclidean distances.
    valid: optional ``[B]`` bool mask; False rows (padding) take no part.

  Returns:
    Scalar loss.
  """
  _check_margin(margin)
  if mining == "batch_hard":
    return batch_hard_triplet_loss(emb, labels, margin, squared=squared, valid=valid)
  if mining == "batch_all":
    return _batch_all_triplet_loss(emb, labels, margin, squared, valid)
  if mining == "soft_margin":
    return _soft_margin_triplet_loss(emb, labels, squared, valid)
  raise ValueError(f"mining={mining!r} is not allowed: mining must be one of {MINING_MODES}")


# ----------------------------------------------------------------------------------------------
# Classification losses and the dual loss (METHODS.md M3 steps 2 and 4).


def _masked_ce(logits: jax.Array, labels: jax.Array, valid: jax.Array | None) -> jax.Array:
  """Mean softmax cross-entropy over valid rows; 0 when none is valid."""
  valid = jnp.ones(labels.shape, bool) if valid is None else valid.astype(bool)
  safe_labels = jnp.where(valid, labels, 0)
  per_example = optax.softmax_cross_entropy_with_integer_labels(logits, safe_labels)
  return _masked_mean(per_example, valid)


def logit_adjusted_ce(
  logits: jax.Array,
  labels: jax.Array,
  log_prior: jax.Array,
  tau: float = 1.0,
  *,
  valid: jax.Array | None = None,
) -> jax.Array:
  """Logit-adjusted softmax cross-entropy (Menon et al. 2021, loss form), M3 baseline.

  ``mean_i -log softmax(logits_i + tau * log_prior)[labels_i]``; predict with the raw logits.

  Args:
    logits: ``[B, C]`` logits.
    labels: ``[B]`` integer labels in ``[0, C)``.
    log_prior: ``[C]`` log class prior (see `log_prior`).
    tau: temperature ``tau >= 0`` (a Python number).
    valid: optional ``[B]`` bool mask; False rows (padding) take no part.

  Returns:
    Scalar loss.
  """
  if not float(tau) >= 0.0:
    raise ValueError(f"tau={tau} is not allowed: tau must be >= 0")
  return _masked_ce(logits + tau * log_prior, labels, valid)


def dual_loss(
  head_logits: jax.Array,
  head_labels: jax.Array,
  tri_embeddings: jax.Array,
  tri_labels: jax.Array,
  *,
  lambda_ce: float,
  lambda_tri: float,
  mining: str = "batch_hard",
  margin: float = 0.3,
  squared: bool = False,
  head_valid: jax.Array | None = None,
  tri_valid: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """``lambda_ce * CE(head batch) + lambda_tri * Triplet(PK batch)``, METHODS.md M3 step 4.

  Args:
    head_logits: ``[Bh, H]`` head-classifier logits of the head batch.
    head_labels: ``[Bh]`` head-class indices in ``[0, H)`` (see `head_label_map`).
    tri_embeddings: ``[Bt, D]`` embeddings of the PK batch from the whole set.
    tri_labels: ``[Bt]`` original class labels of the PK batch.
    lambda_ce: weight of the head cross-entropy, >= 0.
    lambda_tri: weight of the triplet loss, >= 0 (not both zero).
    mining: triplet mining, see `triplet_loss`.
    margin: triplet margin, see `triplet_loss`.
    squared: use squared Euclidean distances in the triplet loss.
    head_valid: optional ``[Bh]`` bool mask of real head-batch rows.
    tri_valid: optional ``[Bt]`` bool mask of real PK-batch rows.

  Returns:
    ``(loss, metrics)`` with scalar metrics ``loss``, ``ce``, ``triplet`` and
    ``head_accuracy`` (softmax top-1 on the valid head-batch rows).
  """
  for name, value in (("lambda_ce", lambda_ce), ("lambda_tri", lambda_tri)):
    if not float(value) >= 0.0:
      raise ValueError(f"{name}={value} is not allowed: {name} must be >= 0")
  if lambda_ce == 0 and lambda_tri == 0:
    raise ValueError("lambda_ce=0 and lambda_tri=0 is not allowed: one weight must be > 0")
  ce = _masked_ce(head_logits, head_labels, head_valid)
  tri = triplet_loss(
    tri_embeddings, tri_labels, mining=mining, margin=margin, squared=squared, valid=tri_valid
  )
  loss = lambda_ce * ce + lambda_tri * tri
  head_valid = jnp.ones(head_labels.shape, bool) if head_valid is None else head_valid
  correct = jnp.argmax(head_logits, axis=-1) == head_labels
  metrics = {
    "loss": loss,
    "ce": ce,
    "triplet": tri,
    "head_accuracy": _masked_mean(correct.astype(jnp.float32), head_valid.astype(bool)),
  }
  return loss, metrics


# ----------------------------------------------------------------------------------------------
# Nearest-class-mean inference (METHODS.md M3 step 5).


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """``x / ||x||`` along ``axis``; zero vectors stay zero."""
  norm = jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
  return x / jnp.maximum(norm, _NORM_EPS)


def class_presence(
  labels: jax.Array, num_classes: int, valid: jax.Array | None = None
) -> jax.Array:
  """``[C]`` bool mask of the classes with at least one valid sample in ``labels`` ``[N]``."""
  weights = jnp.ones(labels.shape) if valid is None else valid.astype(jnp.float32)
  return jax.ops.segment_sum(weights, labels, num_segments=num_classes) > 0


def class_means(
  embeddings: jax.Array,
  labels: jax.Array,
  num_classes: int,
  valid: jax.Array | None = None,
) -> jax.Array:
  """Re-normalised mean of the L2-normalised embeddings per class, METHODS.md M3 step 5.

  Args:
    embeddings: ``[N, D]`` training-set embeddings.
    labels: ``[N]`` integer labels in ``[0, C)``.
    num_classes: ``C``.
    valid: optional ``[N]`` bool mask of real rows.

  Returns:
    ``[C, D]`` unit class means; a zero row for classes without samples (pass
    `class_presence` to `ncm_predict` so they are never predicted).
  """
  unit = l2_normalize(embeddings)
  if valid is not None:
    unit = jnp.where(valid[:, None], unit, 0.0)
  sums = jax.ops.segment_sum(unit, labels, num_segments=num_classes)
  return l2_normalize(sums)


def ncm_predict(embeddings: jax.Array, means: jax.Array, present_mask: jax.Array) -> jax.Array:
  """Nearest-class-mean prediction by cosine similarity, METHODS.md M3 step 5.

  Args:
    embeddings: ``[B, D]`` query embeddings.
    means: ``[C, D]`` class means (from `class_means`).
    present_mask: ``[C]`` bool, classes that may be predicted (at least one must be True).

  Returns:
    ``[B]`` int32 predicted class ids, always a present class.
  """
  sims = jnp.matmul(
    l2_normalize(embeddings), l2_normalize(means).T, precision=jax.lax.Precision.HIGHEST
  )
  sims = jnp.where(present_mask[None, :], sims, -jnp.inf)
  return jnp.argmax(sims, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# Evaluation by shot group (METHODS.md M3 "Measure"), host side.


def shot_group_accuracy(
  pred, labels, train_class_counts, many: int = 100, few: int = 20
) -> dict[str, float | np.ndarray]:
  """Accuracy overall and for many-, medium- and few-shot classes.

  Groups by training count: many ``count > many``, few ``count < few``, medium otherwise
  (Liu et al. 2019 OLTR convention with defaults 100/20). A group's accuracy is the mean of its
  classes' accuracies over classes that have test samples (OLTR convention; on a balanced test
  set this equals the per-sample mean); NaN for a group without such classes. ``overall`` is the
  mean over all test samples.

  Args:
    pred: ``[N]`` predicted class ids.
    labels: ``[N]`` true class ids in ``[0, C)``.
    train_class_counts: ``[C]`` training-sample counts per class.
    many: classes with more training samples than this are many-shot.
    few: classes with fewer training samples than this are few-shot; ``few <= many``.

  Returns:
    Dict with floats ``overall``, ``many``, ``medium``, ``few`` and ``per_class``, a ``[C]``
    float array of per-class accuracies (NaN for classes without test samples).
  """
  counts = _check_class_counts(train_class_counts)
  pred, labels = np.asarray(pred), np.asarray(labels)
  if pred.shape != labels.shape or labels.ndim != 1 or labels.size == 0:
    raise ValueError(
      f"pred shape {pred.shape} and labels shape {labels.shape} are not allowed: both must be "
      "the same non-empty 1-D shape"
    )
  if labels.min() < 0 or labels.max() >= counts.size:
    raise ValueError(
      f"labels in [{labels.min()}, {labels.max()}] are not allowed: labels must be in "
      f"[0, {counts.size}) (the length of train_class_counts)"
    )
  if few > many:
    raise ValueError(f"few={few} and many={many} are not allowed: few must be <= many")
  correct = (pred == labels).astype(np.float64)
  num_test = np.bincount(labels, minlength=counts.size)
  num_correct = np.bincount(labels, weights=correct, minlength=counts.size)
  tested = num_test > 0
  per_class = np.full(counts.size, np.nan)
  per_class[tested] = num_correct[tested] / num_test[tested]

  def group_mean(group: np.ndarray) -> float:
    members = group & tested
    return float(per_class[members].mean()) if members.any() else float("nan")

  return {
    "overall": float(correct.mean()),
    "many": group_mean(counts > many),
    "medium": group_mean((counts >= few) & (counts <= many)),
    "few": group_mean(counts < few),
    "per_class": per_class,
  }
