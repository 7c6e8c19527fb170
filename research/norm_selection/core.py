"""Pure functions of method M2: norm-ranked class-balanced selection.

METHODS.md M2 (seed 001): the sample set is grouped by class (step 1; k-means clusters of
embeddings stand in for classes when the pool is unlabelled), every sample gets a norm value
(step 2: per-pixel weighted channel sum, then an L1/L2/L-inf norm over the pixels), and each
class contributes ``m`` samples nearest its mean norm (step 3: ``a`` from ``norm >= mu`` in
ascending order, ``b = m - a`` from ``norm < mu`` in descending order).

``norm_values`` and ``kmeans`` (ott-jax's) are jit-compiled jax functions; the selection rules
run on the host in vectorised numpy (they sort and index ragged per-class groups, once per
round). The baselines used for equal-budget comparison (random, class-balanced random,
max-entropy, moderate coreset) share the selection rules' conventions:

* inputs are per-sample arrays of length ``N`` plus a ``[N]`` bool ``candidate_mask`` (the
  current pool); only candidates are ever returned;
* the output is a 1-D int64 array of distinct sample indices in *priority order* (per-class
  rules: class-major, ascending class id, each class's picks in its own priority order), so a
  per-class prefix of the output is the rule's choice at a smaller budget;
* ties are broken deterministically by ascending sample index unless a key says otherwise.
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from ott.tools import k_means as ott_k_means

LUMINANCE_WEIGHTS = (0.299, 0.587, 0.114)
NORM_ORDERS = (1, 2, "inf")
KMEANS_INITS = ("k-means++", "random")

# ----------------------------------------------------------------------------------------------
# Norm values (METHODS.md M2 step 2).


def _norm_order(p) -> int | str:
  """Canonical static norm order: 1, 2 or 'inf'."""
  if isinstance(p, str):
    if p == "inf":
      return "inf"
  elif isinstance(p, numbers.Real) and not isinstance(p, bool):
    if p == 1:
      return 1
    if p == 2:
      return 2
    if math.isinf(p) and p > 0:
      return "inf"
  raise ValueError(f"p={p!r} is not allowed: p must be one of 1, 2, inf (or the string 'inf')")


def channel_weights_for(num_channels: int, channel_weights=None) -> np.ndarray:
  """The per-channel weights ``w_c`` of the per-pixel weighted sum ``v = sum_c w_c x_c``.

  METHODS.md M2 step 2 (seed 001: "the weighted average of the pixels of each sample").

  Args:
    num_channels: the number of image channels ``C``.
    channel_weights: ``[C]`` explicit weights, used as given (not renormalised), or None for
      the default: luminance ``(0.299, 0.587, 0.114)`` for 3 channels, otherwise uniform
      ``1 / C`` (so ``1`` for one channel), i.e. always a weighted *mean* as the patent says.

  Returns:
    ``[C]`` float32 weights.

  Raises:
    ValueError: explicit weights of the wrong length or with non-finite entries.
  """
  if channel_weights is None:
    if num_channels == 3:
      return np.asarray(LUMINANCE_WEIGHTS, np.float32)
    return np.full((num_channels,), 1.0 / num_channels, np.float32)
  weights = np.asarray(channel_weights, np.float32)
  if weights.shape != (num_channels,):
    raise ValueError(
      f"channel_weights with shape {weights.shape} is not allowed: channel_weights must have "
      f"length C={num_channels} (one weight per image channel)"
    )
  if not np.all(np.isfinite(weights)):
    raise ValueError(
      f"channel_weights={weights.tolist()} is not allowed: channel_weights must be finite"
    )
  return weights


@functools.partial(jax.jit, static_argnames="order")
def _norm_values_batch(images: jax.Array, weights: jax.Array, order: int | str) -> jax.Array:
  """``[N, H, W, C]`` images -> ``[N]`` norms of the per-pixel weighted channel sums."""
  # Elementwise multiply-and-sum rather than einsum: no reduced-precision matmul on TPU.
  v = jnp.sum(images.astype(jnp.float32) * weights, axis=-1).reshape(images.shape[0], -1)
  if order == 1:
    return jnp.sum(jnp.abs(v), axis=1)
  if order == 2:
    return jnp.sqrt(jnp.sum(v * v, axis=1))
  return jnp.max(jnp.abs(v), axis=1)


def norm_values(images, channel_weights=None, p=2, *, chunk_size: int = 1024) -> jax.Array:
  """Norm value of every sample: ``||v||_p`` over the pixels of ``v = sum_c w_c x_c``.

  METHODS.md M2 step 2 (seed 001: "obtain the weighted average of the pixels of each sample
  and compute each sample's norm value from it"; the norm's order is not given in the patent:
  p = 2 by default, 1 and inf as options).

  The per-chunk computation is jit-compiled. Up to ``chunk_size`` samples run as one batch;
  larger sets are cut on the host into chunks of exactly ``chunk_size`` (the last one
  zero-padded and trimmed), so a large set compiles once and never sits on the device whole.

  Args:
    images: ``[N, H, W, C]`` float images in [0, 1] (numpy or jax; not range-checked).
    channel_weights: ``[C]`` weights or None for the default (see ``channel_weights_for``).
    p: norm order, one of 1, 2, ``inf`` (``float('inf')``, ``np.inf`` or ``'inf'``).
    chunk_size: the largest number of samples processed in one device call, >= 1.

  Returns:
    ``[N]`` float32 norm values.

  Raises:
    ValueError: images not 4-D or of an integer dtype, unknown ``p``, bad weights or
      ``chunk_size``.
  """
  order = _norm_order(p)
  if getattr(images, "ndim", None) != 4:
    raise ValueError(
      f"images with shape {getattr(images, 'shape', None)} is not allowed: images must be a "
      "[N, H, W, C] array"
    )
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(
      f"images of dtype {images.dtype} is not allowed: images must be floats in [0, 1] "
      "(divide uint8 images by 255 first)"
    )
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size!r} is not allowed: chunk_size must be an int >= 1")
  weights = jnp.asarray(channel_weights_for(images.shape[-1], channel_weights))
  num = images.shape[0]
  if num <= chunk_size:
    return _norm_values_batch(jnp.asarray(images), weights, order)
  norms = []
  for start in range(0, num, chunk_size):
    chunk = jnp.asarray(images[start : start + chunk_size])
    valid = chunk.shape[0]
    if valid < chunk_size:
      chunk = jnp.pad(chunk, ((0, chunk_size - valid), (0, 0), (0, 0), (0, 0)))
    norms.append(_norm_values_batch(chunk, weights, order)[:valid])
  return jnp.concatenate(norms)


# ----------------------------------------------------------------------------------------------
# Grouping (METHODS.md M2 step 1): labels, or k-means pseudo-labels for an unlabelled pool.


def uint8_norm_values(images: np.ndarray, channel_weights=None, p=2, chunk: int = 4096):
  """``norm_values`` of uint8 ``[N, H, W, C]`` images, scaled to [0, 1] chunk by chunk.

  The scaling runs on the host per chunk of ``chunk`` images, so a large pool never exists as
  floats all at once.

  Returns:
    ``[N]`` float32 norm values.
  """
  parts = [
    np.asarray(
      norm_values(
        images[i : i + chunk].astype(np.float32) / 255.0, channel_weights, p, chunk_size=chunk
      )
    )
    for i in range(0, len(images), chunk)
  ]
  return np.concatenate(parts)


@functools.partial(jax.jit, static_argnames=("k", "n_init", "max_iterations", "init"))
def _kmeans(
  rng: jax.Array, x: jax.Array, k: int, n_init: int, max_iterations: int, init: str
) -> tuple[jax.Array, jax.Array]:
  """ott-jax k-means: ``([N] int32 cluster ids, [k, D] centroids)``."""
  out = ott_k_means.k_means(x, k, init=init, n_init=n_init, max_iterations=max_iterations, rng=rng)
  return out.assignment.astype(jnp.int32), out.centroids


def kmeans(
  rng: jax.Array,
  embeddings,
  k: int,
  *,
  n_init: int = 10,
  max_iterations: int = 300,
  init: str = "k-means++",
  return_centroids: bool = False,
):
  """k-means cluster ids of embeddings, the pseudo-labels of an unlabelled pool.

  METHODS.md M2 step 1 option (seed 001 mentions unsupervised allocation of the samples).
  This is ott-jax's jittable ``ott.tools.k_means.k_means`` (Lloyd's algorithm to a relative
  centroid-shift tolerance of 1e-4 or ``max_iterations``, best inertia of ``n_init`` runs,
  greedy k-means++ seeding with ``2 + floor(log k)`` local trials as in scikit-learn), wrapped
  in one ``jax.jit`` (``k``, ``n_init``, ``max_iterations`` and ``init`` static). It replaced
  a hand-written k-means++ / fixed-iteration Lloyd loop (issue 16); measured on the digits
  pool (1797 x 64, k = 10, the CPU machine under load, /work/notes/runs/m2/kmeans_bench.txt)
  it reaches scikit-learn's inertia, which the hand-written single-init loop did not always.
  Cluster ids are arbitrary (a permutation of the true groups at best).

  Args:
    rng: PRNG key for the initialisations.
    embeddings: ``[N, D]`` float embeddings.
    k: number of clusters, ``1 <= k <= N``.
    n_init: independent initialisations (the lowest inertia wins), >= 1.
    max_iterations: most Lloyd iterations per initialisation, >= 1.
    init: ``'k-means++'`` (default) or ``'random'`` (k distinct samples).
    return_centroids: also return the ``[k, D]`` centroids.

  Returns:
    ``[N]`` int32 cluster ids in ``[0, k)`` (and the centroids when asked).

  Raises:
    ValueError: embeddings not 2-D or empty, bad ``k``, ``n_init``, ``max_iterations`` or
      ``init``.
  """
  x = jnp.asarray(embeddings, jnp.float32)
  if x.ndim != 2 or x.shape[0] == 0:
    raise ValueError(
      f"embeddings with shape {x.shape} is not allowed: embeddings must be a non-empty [N, D] array"
    )
  if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= x.shape[0]:
    raise ValueError(f"k={k!r} is not allowed: k must be an int in [1, N={x.shape[0]}]")
  for name, value in (("n_init", n_init), ("max_iterations", max_iterations)):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
      raise ValueError(f"{name}={value!r} is not allowed: {name} must be an int >= 1")
  if init not in KMEANS_INITS:
    raise ValueError(f"init={init!r} is not allowed: init must be one of {KMEANS_INITS}")
  assignment, centroids = _kmeans(
    rng, x, k=int(k), n_init=int(n_init), max_iterations=int(max_iterations), init=init
  )
  return (assignment, centroids) if return_centroids else assignment


def group_ids(labels=None, *, embeddings=None, num_clusters=None, rng=None) -> np.ndarray:
  """The class (group) of every sample: its label, or its k-means cluster when unlabelled.

  METHODS.md M2 step 1 (seed 001: "classify the sample set to form several classified sample
  sets"; k-means is the unsupervised option).

  Args:
    labels: ``[N]`` non-negative integer labels, or None for an unlabelled pool.
    embeddings: ``[N, D]`` embeddings, needed when ``labels`` is None.
    num_clusters: number of k-means clusters, needed when ``labels`` is None.
    rng: PRNG key for k-means, needed when ``labels`` is None.

  Returns:
    ``[N]`` int64 group ids.

  Raises:
    ValueError: bad labels, or an unlabelled pool without ``num_clusters``, ``embeddings`` or
      ``rng``.
  """
  if labels is not None:
    return validate_class_ids(labels)[0]
  if num_clusters is None:
    raise ValueError(
      "num_clusters=None is not allowed for a pool without labels: pass labels, or "
      "num_clusters (with embeddings and rng) to group the pool by k-means"
    )
  if embeddings is None or rng is None:
    raise ValueError(
      f"embeddings={'None' if embeddings is None else 'given'} and "
      f"rng={'None' if rng is None else 'given'} are not allowed for a pool without labels: "
      "k-means grouping needs both"
    )
  return np.asarray(kmeans(rng, embeddings, num_clusters), np.int64)


# ----------------------------------------------------------------------------------------------
# Shared validation and helpers of the selection rules.


def _check_int_vector(name: str, values: np.ndarray) -> None:
  if values.ndim != 1:
    raise ValueError(f"{name} with shape {values.shape} is not allowed: {name} must be 1-D")
  if values.size and (not np.issubdtype(values.dtype, np.integer) or values.min() < 0):
    raise ValueError(
      f"{name} of dtype {values.dtype} with minimum {values.min()} is not allowed: {name} must "
      "be non-negative integers"
    )


def _check_count(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
    raise ValueError(f"{name}={value!r} is not allowed: {name} must be an int > 0")
  return int(value)


def validate_candidate_mask(
  candidate_mask, num: int | None = None, name: str = "candidate_mask"
) -> np.ndarray:
  """Checks a candidate (pool) mask.

  Args:
    candidate_mask: ``[N]`` bool array.
    num: the required ``N``, or None for any length.
    name: the argument's name in error messages.

  Returns:
    The mask as a numpy bool array.

  Raises:
    ValueError: not a 1-D bool array of length ``num``.
  """
  mask = np.asarray(candidate_mask)
  if mask.ndim != 1 or (num is not None and mask.shape[0] != num) or mask.dtype != np.bool_:
    wanted = "" if num is None else f" of length N={num}"
    raise ValueError(
      f"{name} with shape {mask.shape} and dtype {mask.dtype} is not allowed: "
      f"{name} must be a 1-D bool array{wanted} (one entry per sample)"
    )
  return mask


def validate_class_ids(labels, num_classes=None, name: str = "labels") -> tuple[np.ndarray, int]:
  """Checks class (or group) ids and finds the number of classes.

  Args:
    labels: ``[N]`` non-negative integer ids.
    num_classes: explicit number of classes ``C``, or None for ``max(labels) + 1``. When
      given, every id in ``[0, C)`` must have at least one sample (an empty class is almost
      always a wrong ``num_classes`` or a filtering bug).
    name: the argument's name in error messages.

  Returns:
    ``([N] int64 ids, C)``.

  Raises:
    ValueError: ids not a 1-D non-negative integer array, ``num_classes`` not a positive int,
      an id ``>= num_classes``, or an empty class.
  """
  labels = np.asarray(labels)
  _check_int_vector(name, labels)
  labels = labels.astype(np.int64)
  if num_classes is None:
    return labels, int(labels.max()) + 1 if labels.size else 0
  num_classes = _check_count("num_classes", num_classes)
  if labels.size and labels.max() >= num_classes:
    raise ValueError(
      f"{name} with maximum {labels.max()} is not allowed: {name} must be < "
      f"num_classes={num_classes}"
    )
  empty = np.flatnonzero(np.bincount(labels, minlength=num_classes) == 0)
  if empty.size:
    raise ValueError(
      f"num_classes={num_classes} is not allowed: class ids {empty.tolist()} have no samples "
      f"in {name} (every class in [0, num_classes) needs at least one)"
    )
  return labels, num_classes


def _per_sample(name: str, values, num: int, ndim: int) -> np.ndarray:
  values = np.asarray(values, np.float64)
  if values.ndim != ndim or values.shape[0] != num:
    raise ValueError(
      f"{name} with shape {values.shape} is not allowed: {name} must be {ndim}-D with N={num} "
      "rows (one per sample)"
    )
  if not np.all(np.isfinite(values)):
    raise ValueError(f"{name} with non-finite entries is not allowed: {name} must be finite")
  return values


def rank_within_blocks(block_ids: np.ndarray) -> np.ndarray:
  """Position of each entry within its run of equal consecutive ids.

  Args:
    block_ids: ``[S]`` ids, equal ids adjacent (e.g. sorted).

  Returns:
    ``[S]`` int64, 0 for the first entry of each run, 1 for the next, ...
  """
  if block_ids.size == 0:
    return np.zeros((0,), np.int64)
  starts = np.r_[True, block_ids[1:] != block_ids[:-1]]
  start_pos = np.maximum.accumulate(np.where(starts, np.arange(block_ids.size), 0))
  return np.arange(block_ids.size) - start_pos


def _take_per_class(cand: np.ndarray, cls: np.ndarray, score: np.ndarray, m: int) -> np.ndarray:
  """The ``m`` lowest-score candidates of each class (ties by index), class-major, by score."""
  order = np.lexsort((cand, score, cls))
  keep = rank_within_blocks(cls[order]) < m
  return cand[order][keep]


# ----------------------------------------------------------------------------------------------
# The selection rule (METHODS.md M2 step 3).


def select_per_class(
  norms, labels, candidate_mask, m: int, a=None, rng=None, *, num_classes=None, mean_mask=None
):
  """Draws up to ``m`` samples per class nearest the class's mean norm.

  METHODS.md M2 step 3 (seed 001: "among the samples whose norm value is greater than or equal
  to the mean norm value of the classified sample set, draw a samples from small to large, and
  among the samples whose norm value is smaller than the mean, draw b samples from large to
  small, a + b = m").

  Per class ``c``, over its candidates only:

  * ``mu_c`` = mean norm (float64) of the class's samples in ``mean_mask``: by default every
    sample of the class in ``labels`` (the patent's "mean norm value of the classified sample
    set", i.e. the class's *original* set, fixed over the rounds of steps 5-7); pass
    ``mean_mask=candidate_mask`` for the mean over the *current pool* (an option);
  * upper side ``norm >= mu_c`` sorted ascending, lower side ``norm < mu_c`` sorted descending;
  * take ``a`` from the upper side and ``b = m - a`` from the lower side; if one side has too
    few, the other side fills up to ``m``; a class with ``<= m`` candidates gives all of them.

  Ties between equal norms are broken by ascending sample index on both sides (or by a random
  order drawn from ``rng`` when given). Output order: class-major (ascending class id); within
  a class the upper and lower picks alternate, starting with the upper side, until the
  shorter side's picks run out. With the default ``a`` a class's first ``k`` picks are then
  exactly this rule's choice for ``m = k``, which the loop uses to cut a draw to a label budget.

  Args:
    norms: ``[N]`` norm values (``norm_values``).
    labels: ``[N]`` non-negative integer class (or cluster) ids.
    candidate_mask: ``[N]`` bool, True for samples that may be drawn (the current pool).
    m: samples per class, > 0.
    a: samples from the upper side, ``0 <= a <= m``; default ``ceil(m / 2)``.
    rng: optional PRNG key; when given, ties between equal norms are broken in a random order
      drawn from it instead of by index.
    num_classes: optional explicit number of classes; each id in ``[0, num_classes)`` must
      have at least one sample in ``labels`` (candidate or not).
    mean_mask: ``[N]`` bool, the samples each class's mean ``mu_c`` is computed over; None
      (default) for all samples (the class's original set). A class with candidates but no
      sample in ``mean_mask`` is an error.

  Returns:
    ``[S]`` int64 distinct candidate indices, ``S = sum_c min(m, candidates of c)``.

  Raises:
    ValueError: bad ``m`` or ``a``, shape mismatches, non-finite norms, bad labels, an empty
      class under an explicit ``num_classes``, or a bad ``mean_mask``.
  """
  m = _check_count("m", m)
  if a is None:
    a = math.ceil(m / 2)
  elif isinstance(a, bool) or not isinstance(a, numbers.Integral) or not 0 <= a <= m:
    raise ValueError(f"a={a!r} is not allowed: a must be an int in [0, m={m}]")
  labels, num_classes = validate_class_ids(labels, num_classes)
  norms = _per_sample("norms", norms, labels.size, 1)
  cand = np.flatnonzero(validate_candidate_mask(candidate_mask, labels.size))
  cls, value = labels[cand], norms[cand]
  if rng is None:
    tie_key = cand
  else:
    tie_key = np.asarray(jax.random.permutation(rng, labels.size))[cand]

  counts = np.bincount(cls, minlength=num_classes)
  if mean_mask is None:
    over = np.arange(labels.size)
  else:
    over = np.flatnonzero(validate_candidate_mask(mean_mask, labels.size, "mean_mask"))
  mean_counts = np.bincount(labels[over], minlength=num_classes)
  no_mean = np.flatnonzero((counts > 0) & (mean_counts == 0))
  if no_mean.size:
    raise ValueError(
      f"mean_mask with no sample of classes {no_mean.tolist()} is not allowed: every class "
      "with candidates needs samples to compute its mean norm over"
    )
  mean = np.bincount(labels[over], weights=norms[over], minlength=num_classes)
  mean = mean / np.maximum(mean_counts, 1)
  upper = value >= mean[cls]
  # Sort by class, then upper side first, then distance from the mean along the side's order.
  order = np.lexsort((tie_key, np.where(upper, value, -value), ~upper, cls))
  cand, cls, upper = cand[order], cls[order], upper[order]
  rank = rank_within_blocks(cls * 2 + ~upper)

  n_up = np.bincount(cls[upper], minlength=num_classes)
  n_lo = counts - n_up
  take_up = np.minimum(n_up, np.maximum(a, m - n_lo))
  take_lo = np.minimum(n_lo, m - take_up)
  keep = rank < np.where(upper, take_up[cls], take_lo[cls])
  cand, cls, upper, rank = cand[keep], cls[keep], upper[keep], rank[keep]

  # Alternate upper/lower picks: pick r of a side goes to slot 2r (+1 for lower) while both
  # sides still have picks, then the longer side's picks follow in order.
  pairs = np.minimum(take_up, take_lo)[cls]
  slot = np.where(rank < pairs, 2 * rank + ~upper, pairs + rank)
  return cand[np.lexsort((slot, cls))].astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Baselines for equal-budget comparison (METHODS.md M2 "Measure").


def select_random(candidate_mask, num_select: int, rng: jax.Array) -> np.ndarray:
  """Uniformly random selection without replacement (baseline).

  Args:
    candidate_mask: ``[N]`` bool, True for samples that may be drawn.
    num_select: total number of samples to draw, > 0 (all candidates if fewer).
    rng: PRNG key.

  Returns:
    ``[min(num_select, candidates)]`` int64 distinct candidate indices in random order.

  Raises:
    ValueError: bad ``num_select`` or mask.
  """
  num_select = _check_count("num_select", num_select)
  mask = validate_candidate_mask(candidate_mask)
  cand = np.flatnonzero(mask)
  # One uniform key per sample (shape [N] whatever the pool size, so it compiles once); the
  # candidates in order of their keys are a uniformly random permutation.
  random_key = np.asarray(jax.random.uniform(rng, (mask.size,)))[cand]
  return cand[np.lexsort((cand, random_key))][:num_select].astype(np.int64)


def select_class_balanced_random(
  labels, candidate_mask, m: int, rng: jax.Array, *, num_classes=None
) -> np.ndarray:
  """Up to ``m`` uniformly random candidates per class (baseline).

  Args:
    labels: ``[N]`` non-negative integer class ids.
    candidate_mask: ``[N]`` bool, True for samples that may be drawn.
    m: samples per class, > 0 (all of a class's candidates if fewer).
    rng: PRNG key.
    num_classes: optional explicit number of classes (no class may be empty).

  Returns:
    ``[S]`` int64 distinct candidate indices, class-major, random order within a class.

  Raises:
    ValueError: bad ``m``, labels or mask.
  """
  m = _check_count("m", m)
  labels, _ = validate_class_ids(labels, num_classes)
  cand = np.flatnonzero(validate_candidate_mask(candidate_mask, labels.size))
  random_score = np.asarray(jax.random.uniform(rng, (labels.size,)))[cand]
  return _take_per_class(cand, labels[cand], random_score, m).astype(np.int64)


def select_max_entropy(probs, candidate_mask, num_select: int) -> np.ndarray:
  """The candidates with the highest predictive entropy (uncertainty baseline).

  Entropy ``H = -sum_k p_k log p_k`` with ``0 log 0 = 0``; ties by ascending index.

  Args:
    probs: ``[N, K]`` predicted class probabilities (rows are not renormalised).
    candidate_mask: ``[N]`` bool, True for samples that may be drawn.
    num_select: total number of samples to draw, > 0 (all candidates if fewer).

  Returns:
    ``[min(num_select, candidates)]`` int64 distinct indices, highest entropy first.

  Raises:
    ValueError: bad ``num_select``, probs not ``[N, K]``, non-finite or negative probs.
  """
  num_select = _check_count("num_select", num_select)
  probs = np.asarray(probs, np.float64)
  if probs.ndim != 2:
    raise ValueError(f"probs with shape {probs.shape} is not allowed: probs must be [N, K]")
  probs = _per_sample("probs", probs, probs.shape[0], 2)
  if np.any(probs < 0):
    raise ValueError("probs with negative entries is not allowed: probs must be >= 0")
  cand = np.flatnonzero(validate_candidate_mask(candidate_mask, probs.shape[0]))
  p = probs[cand]
  entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=1)
  return cand[np.lexsort((cand, -entropy))][:num_select].astype(np.int64)


def select_moderate_coreset(features, labels, candidate_mask, m: int, *, num_classes=None):
  """Moderate coreset (Xia et al., ICLR 2023): per class, samples of median distance.

  Per class, over its candidates: centre = mean feature, ``d_i = ||f_i - centre||_2``, and the
  ``m`` samples with the smallest ``|d_i - median_c(d)|`` are kept (the median is the mean of
  the two middle distances for an even count); ties by ascending index.

  Args:
    features: ``[N, D]`` features (e.g. penultimate-layer embeddings).
    labels: ``[N]`` non-negative integer class ids.
    candidate_mask: ``[N]`` bool, True for samples that may be drawn.
    m: samples per class, > 0 (all of a class's candidates if fewer).
    num_classes: optional explicit number of classes (no class may be empty).

  Returns:
    ``[S]`` int64 distinct candidate indices, class-major, closest to the median first.

  Raises:
    ValueError: bad ``m``, features, labels or mask.
  """
  m = _check_count("m", m)
  labels, num_classes = validate_class_ids(labels, num_classes)
  features = _per_sample("features", features, labels.size, 2)
  cand = np.flatnonzero(validate_candidate_mask(candidate_mask, labels.size))
  cls, feats = labels[cand], features[cand]
  sizes = np.bincount(cls, minlength=num_classes)
  centres = np.zeros((num_classes, features.shape[1]))
  np.add.at(centres, cls, feats)
  centres /= np.maximum(sizes, 1)[:, None]
  dist = np.linalg.norm(feats - centres[cls], axis=1)
  # Median per class from the class-major sorted distances: mean of the middle one or two.
  sorted_dist = dist[np.lexsort((dist, cls))]
  present = sizes > 0
  starts = (np.cumsum(sizes) - sizes)[present]
  median = np.zeros((num_classes,))
  median[present] = 0.5 * (
    sorted_dist[starts + (sizes[present] - 1) // 2] + sorted_dist[starts + sizes[present] // 2]
  )
  return _take_per_class(cand, cls, np.abs(dist - median[cls]), m).astype(np.int64)
