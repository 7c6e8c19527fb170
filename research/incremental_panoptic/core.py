"""Pure functions of METHODS.md M4: old-model pseudo labels, target merging, distillation.

All functions work on one image with fixed (padded) shapes and are jit-compatible; use
``jax.vmap`` for a batch. String and threshold arguments are configuration: they are checked
in Python (at trace time) and must be Python constants, not traced values.

Conventions:
  * ``C`` real classes; class logits have ``C + 1`` entries, index ``C`` is *no-object*.
  * Mask logits and true masks share one resolution ``[H, W]`` (e.g. the model's stride-4
    mask resolution; downsample the true masks before calling).
  * A mask probability is ``sigmoid(mask_logit)``; the *binarised* prediction of a query is
    ``prob >= 0.5`` (Mask2Former's binarisation), used for IoU matching and for the original
    pixel count.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

BINARIZE_THRESHOLD = 0.5
OVERLAP_RULES = ("drop_matched", "remove_true_pixels", "drop_matched_true_wins")
WEIGHTINGS = ("one_minus_no_object", "none", "squared")
REDUCTIONS = ("mean", "weighted_mean")
KD_FORMS = ("fold_new_into_no_object", "log_softmax_all")
# Finite stand-in for -inf: excluded classes get probability exactly 0 without NaN gradients.
_EXCLUDED_LOGIT = -1e9


def check_class_split(
  old_classes: Sequence[int], new_classes: Sequence[int], num_classes: int
) -> np.ndarray:
  """Validates an old/new class split and returns the old-class mask (METHODS.md M4 step 1).

  Args:
    old_classes: ids of the classes the historical model knows.
    new_classes: ids of the classes the fine-tuning images are labelled with.
    num_classes: total number of real classes ``C``.

  Returns:
    ``old_class_mask``: numpy bool ``[C]``, True for old classes.

  Raises:
    ValueError: on an empty side, duplicates, ids outside ``[0, C)`` or old/new overlap.
  """
  if not isinstance(num_classes, int) or num_classes < 2:
    raise ValueError(f"num_classes={num_classes!r} is not allowed: must be an int >= 2")
  for name, ids in (("old_classes", old_classes), ("new_classes", new_classes)):
    ids = list(ids)
    if not ids:
      raise ValueError(f"{name}=[] is not allowed: {name} must not be empty")
    if any(not isinstance(i, (int, np.integer)) or not 0 <= i < num_classes for i in ids):
      raise ValueError(
        f"{name}={ids} is not allowed: ids must be ints in [0, num_classes={num_classes})"
      )
    if len(set(ids)) != len(ids):
      raise ValueError(f"{name}={ids} is not allowed: ids must be unique")
  overlap = sorted(set(old_classes) & set(new_classes))
  if overlap:
    raise ValueError(
      f"new_classes={list(new_classes)} is not allowed: classes {overlap} are also in "
      f"old_classes; new classes must be disjoint from old classes"
    )
  mask = np.zeros(num_classes, dtype=bool)
  mask[list(old_classes)] = True
  return mask


def check_class_steps(class_steps: Sequence[Sequence[int]], num_classes: int) -> None:
  """Validates the classes of each incremental step (step 0 first); raises ``ValueError``.

  Every step must name at least one class, every id must be an int in ``[0, num_classes)``,
  no class may appear twice (in one step or two) and together the steps must cover every
  class, so that each class is learnt in exactly one step. At least two steps are needed.
  """
  steps = [list(s) for s in class_steps]
  if len(steps) < 2:
    raise ValueError(
      f"class_steps={steps} is not allowed: give step 0 and at least one incremental step"
    )
  seen: dict[int, int] = {}
  for t, ids in enumerate(steps):
    if not ids:
      raise ValueError(f"class_steps[{t}]=[] is not allowed: every step needs a new class")
    bad = [i for i in ids if not isinstance(i, (int, np.integer)) or not 0 <= i < num_classes]
    if bad:
      raise ValueError(
        f"class_steps[{t}]={ids} is not allowed: classes {bad} are unknown (ids must be "
        f"ints in [0, num_classes={num_classes}))"
      )
    for i in ids:
      if i in seen:
        raise ValueError(
          f"class_steps[{t}]={ids} is not allowed: class {i} is also in class_steps"
          f"[{seen[i]}]; each class is learnt in exactly one step"
        )
      seen[i] = t
  missing = sorted(set(range(num_classes)) - set(seen))
  if missing:
    raise ValueError(
      f"class_steps={steps} is not allowed: classes {missing} are in no step; every class "
      f"in [0, {num_classes}) must be learnt in one step"
    )


def check_pseudo_label_config(
  *,
  match_iou: float,
  noise_threshold: float,
  max_owners: int,
  min_area_ratio: float,
  query_score_threshold: float,
  overlap_rule: str,
  min_component_area: int = 0,
) -> None:
  """Validates the pseudo-label settings (METHODS.md M4 step 3); raises ``ValueError``."""
  for name, value in (
    ("match_iou", match_iou),
    ("noise_threshold", noise_threshold),
    ("min_area_ratio", min_area_ratio),
    ("query_score_threshold", query_score_threshold),
  ):
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
      raise ValueError(f"{name}={value!r} is not allowed: {name} must be a number in [0, 1]")
  if not isinstance(max_owners, int) or max_owners < 1:
    raise ValueError(f"max_owners={max_owners!r} is not allowed: max_owners must be an int >= 1")
  if overlap_rule not in OVERLAP_RULES:
    raise ValueError(f"overlap_rule={overlap_rule!r} is not allowed: use one of {OVERLAP_RULES}")
  if not isinstance(min_component_area, int) or min_component_area < 0:
    raise ValueError(
      f"min_component_area={min_component_area!r} is not allowed: must be an int >= 0"
    )


def _check_shapes(hist_class_logits, hist_mask_logits, true_masks, true_valid, old_class_mask):
  q, c1 = hist_class_logits.shape
  if hist_mask_logits.ndim != 3 or hist_mask_logits.shape[0] != q:
    raise ValueError(
      f"hist_mask_logits.shape={hist_mask_logits.shape} is not allowed: expected [Q={q}, H, W]"
    )
  if old_class_mask.shape != (c1 - 1,):
    raise ValueError(
      f"old_class_mask.shape={old_class_mask.shape} is not allowed: expected [C={c1 - 1}] "
      f"for class logits with C + 1 = {c1} entries"
    )
  if true_masks.ndim != 3 or true_masks.shape[1:] != hist_mask_logits.shape[1:]:
    raise ValueError(
      f"true_masks.shape={true_masks.shape} is not allowed: expected [T, "
      f"{hist_mask_logits.shape[1]}, {hist_mask_logits.shape[2]}] (the mask-logit resolution)"
    )
  if true_valid.shape != true_masks.shape[:1]:
    raise ValueError(
      f"true_valid.shape={true_valid.shape} is not allowed: expected [T={true_masks.shape[0]}]"
    )


def query_class_confidence(class_logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Predicted real class and its probability per query.

  Args:
    class_logits: ``[Q, C + 1]`` logits (last = no-object).

  Returns:
    ``(classes [Q] int32, confidence [Q] float)``: argmax over the ``C`` real classes (ties go
    to the lowest id) of the softmax over all ``C + 1`` entries, and that probability
    (the patent's "max class probability").
  """
  probs = jax.nn.softmax(class_logits, axis=-1)[:, :-1]
  return jnp.argmax(probs, axis=-1).astype(jnp.int32), jnp.max(probs, axis=-1)


def select_old_class_queries(
  hist_class_logits: jax.Array, old_class_mask: jax.Array, query_score_threshold: float = 0.0
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Old-class objects of the historical prediction (METHODS.md M4 step 3).

  A query is an old-class object iff (a) its argmax over all ``C + 1`` probabilities is not
  no-object (ties with no-object count as an object), (b) its predicted real class (argmax over
  the ``C`` real classes) is old, and (c) that class probability is ``> query_score_threshold``
  (0 by default, i.e. no extra threshold; Mask2Former's panoptic inference uses 0.8).

  Args:
    hist_class_logits: ``[Q, C + 1]`` historical class logits.
    old_class_mask: bool ``[C]``.
    query_score_threshold: extra minimum class probability.

  Returns:
    ``(classes [Q] int32, confidence [Q] float, selected [Q] bool)``.
  """
  classes, confidence = query_class_confidence(hist_class_logits)
  no_object = jax.nn.softmax(hist_class_logits, axis=-1)[:, -1]
  is_object = confidence >= no_object
  is_old = jnp.asarray(old_class_mask, bool)[classes]
  selected = is_object & is_old & (confidence > query_score_threshold)
  return classes, confidence, selected


def mask_iou(masks_a: jax.Array, masks_b: jax.Array) -> jax.Array:
  """Pairwise IoU of binary masks.

  Args:
    masks_a: bool ``[N, H, W]``.
    masks_b: bool ``[M, H, W]``.

  Returns:
    ``[N, M]`` IoU; 0 where the union is empty.
  """
  a = masks_a.reshape(masks_a.shape[0], -1).astype(jnp.float32)
  b = masks_b.reshape(masks_b.shape[0], -1).astype(jnp.float32)
  inter = a @ b.T
  union = a.sum(-1)[:, None] + b.sum(-1)[None, :] - inter
  return jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 0.0)


def drop_matched_masks(
  binary_masks: jax.Array,
  selected: jax.Array,
  true_masks: jax.Array,
  true_valid: jax.Array,
  match_iou: float = 0.5,
) -> jax.Array:
  """Drops old-class masks that match a true-label mask (METHODS.md M4 step 3).

  Args:
    binary_masks: bool ``[Q, H, W]`` binarised historical masks.
    selected: bool ``[Q]`` old-class queries.
    true_masks: bool ``[T, H, W]``.
    true_valid: bool ``[T]``; padded true masks never match.
    match_iou: a mask matches when its IoU with a valid true mask is ``>= match_iou``.

  Returns:
    bool ``[Q]``: selected queries that match no valid true mask.
  """
  iou = mask_iou(binary_masks, true_masks)
  matched = jnp.any((iou >= match_iou) & true_valid[None, :], axis=-1)
  return selected & ~matched


def component_sizes(masks: jax.Array) -> jax.Array:
  """Size of the 4-connected component each pixel belongs to, per mask.

  Labels are propagated (each on-pixel takes the smallest label among itself and its on
  neighbours) until nothing changes, inside ``lax.while_loop``, so it runs under jit and vmap.

  Args:
    masks: bool ``[Q, H, W]``.

  Returns:
    int32 ``[Q, H, W]``: the pixel count of the pixel's component, 0 off the mask.
  """
  q, h, w = masks.shape
  big = h * w
  start = jnp.where(masks, jnp.arange(big, dtype=jnp.int32).reshape(1, h, w), big)

  def shifted(labels):
    pad = jnp.pad(labels, ((0, 0), (1, 1), (1, 1)), constant_values=big)
    vertical = jnp.minimum(pad[:, :-2, 1:-1], pad[:, 2:, 1:-1])
    return jnp.minimum(vertical, jnp.minimum(pad[:, 1:-1, :-2], pad[:, 1:-1, 2:]))

  def body(carry):
    labels, _ = carry
    new = jnp.where(masks, jnp.minimum(labels, shifted(labels)), big)
    return new, jnp.any(new != labels)

  labels, _ = jax.lax.while_loop(lambda c: c[1], body, (start, jnp.array(True)))
  flat = labels.reshape(q, big)
  counts = jax.vmap(lambda x: jnp.zeros((big + 1,), jnp.int32).at[x].add(1))(flat)
  sizes = jnp.take_along_axis(counts, flat, axis=1)
  return jnp.where(masks, sizes.reshape(q, h, w), 0)


def remove_noisy_pixels(
  mask_probs: jax.Array, keep: jax.Array, noise_threshold: float = 0.5, min_component_area: int = 0
) -> jax.Array:
  """Removes noisy pixels from the kept masks (METHODS.md M4 step 3).

  Two rules, both applied: pixels with probability below ``noise_threshold`` are noise (a
  threshold above the binarisation threshold 0.5 removes the uncertain rim of a mask); then
  4-connected pieces of what is left with fewer than ``min_component_area`` pixels are noise
  (specks away from the object).

  Args:
    mask_probs: ``[Q, H, W]`` mask probabilities.
    keep: bool ``[Q]`` kept queries.
    noise_threshold: pixels with probability ``< noise_threshold`` are noise.
    min_component_area: components with fewer pixels are removed (0 or 1: none).

  Returns:
    bool ``[Q, H, W]``, all False for queries not kept.
  """
  masks = (mask_probs >= noise_threshold) & keep[:, None, None]
  if min_component_area > 1:
    masks = masks & (component_sizes(masks) >= min_component_area)
  return masks


def remove_true_pixels(masks: jax.Array, true_masks: jax.Array, true_valid: jax.Array) -> jax.Array:
  """Removes pixels covered by any valid true mask (CoMFormer variant of M4 step 3).

  Args:
    masks: bool ``[Q, H, W]`` pseudo masks.
    true_masks: bool ``[T, H, W]``.
    true_valid: bool ``[T]``.

  Returns:
    bool ``[Q, H, W]``.
  """
  covered = jnp.any(true_masks & true_valid[:, None, None], axis=0)
  return masks & ~covered[None]


def resolve_overlaps(
  masks: jax.Array, pixel_confidence: jax.Array, max_owners: int = 1
) -> jax.Array:
  """Gives over-shared pixels to the most confident mask (METHODS.md M4 step 3).

  A pixel that belongs to more than ``max_owners`` masks is kept only in the mask with the
  highest pixel confidence (ties: lowest query index), as the patent says ("the modified mask
  with the maximum confidence is the final mask of that pixel"); a pixel with at most
  ``max_owners`` owners stays in all of them.

  Args:
    masks: bool ``[Q, H, W]``.
    pixel_confidence: ``[Q, H, W]``, ``max-class-prob x mask-prob``.
    max_owners: allowed number of owners per pixel.

  Returns:
    bool ``[Q, H, W]``.
  """
  owners = jnp.sum(masks, axis=0)
  winner = jnp.argmax(jnp.where(masks, pixel_confidence, -jnp.inf), axis=0)
  is_winner = jnp.arange(masks.shape[0])[:, None, None] == winner[None]
  return masks & ((owners <= max_owners)[None] | is_winner)


def filter_by_area(
  final_masks: jax.Array, original_counts: jax.Array, min_area_ratio: float = 0.5
) -> jax.Array:
  """Deletes empty pseudo masks and those that lost too much area (METHODS.md M4 step 3).

  Args:
    final_masks: bool ``[Q, H, W]`` after noise removal and overlap resolution.
    original_counts: ``[Q]`` original pixel counts (binarised historical masks, before any
      filtering).
    min_area_ratio: a mask is deleted when ``final / original < min_area_ratio``.

  Returns:
    bool ``[Q]``: non-empty and ``final >= min_area_ratio * original`` (a non-empty mask with
    original count 0, possible only when ``noise_threshold < 0.5``, is kept).
  """
  final_counts = jnp.sum(final_masks, axis=(1, 2))
  return (final_counts > 0) & (final_counts >= min_area_ratio * original_counts)


def old_class_pseudo_labels(
  hist_class_logits: jax.Array,
  hist_mask_logits: jax.Array,
  true_masks: jax.Array,
  true_valid: jax.Array,
  old_class_mask: jax.Array,
  *,
  match_iou: float = 0.5,
  noise_threshold: float = 0.5,
  max_owners: int = 1,
  min_area_ratio: float = 0.5,
  query_score_threshold: float = 0.0,
  overlap_rule: str = "drop_matched",
  min_component_area: int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Pseudo labels for old classes from the historical prediction (METHODS.md M4 step 3).

  Steps (each a function of this module):
    1. :func:`select_old_class_queries`: old-class objects of the historical prediction.
    2. ``overlap_rule='drop_matched'`` (default, the patent): :func:`drop_matched_masks` drops
       each one whose binarised mask has IoU ``>= match_iou`` with a valid true mask.
       ``overlap_rule='remove_true_pixels'`` (CoMFormer): nothing is dropped; instead
       :func:`remove_true_pixels` removes true-mask pixels after step 3 (``match_iou`` unused).
       ``overlap_rule='drop_matched_true_wins'``: both, so that the union of true and pseudo
       labels stays one panoptic labelling (every pixel has at most one owner, the true one
       where there is one), as ``max_owners=1`` asks among the pseudo masks.
    3. :func:`remove_noisy_pixels`: pixels with mask prob ``< noise_threshold`` are removed,
       then 4-connected pieces smaller than ``min_component_area`` pixels.
    4. :func:`resolve_overlaps` with pixel confidence ``max-class-prob x mask-prob``.
    5. :func:`filter_by_area`: delete empty masks and those with
       ``final count / original count < min_area_ratio``, where the *original* count is the
       pixel count of the binarised historical mask (``prob >= 0.5``) before steps 2-4 (the
       patent's "first number": pixels of the predicted target mask with the preset mask
       value; this is also Mask2Former's ``original_area``). (This function's own defaults,
       ``noise_threshold=0.5`` and ``min_component_area=0``, switch noise removal off; the
       experiment's config sets 0.7 and 2.)

  Args:
    hist_class_logits: ``[Q, C + 1]`` historical class logits.
    hist_mask_logits: ``[Q, H, W]`` historical mask logits.
    true_masks: bool ``[T, H, W]`` true (new-class) masks at the same resolution.
    true_valid: bool ``[T]``.
    old_class_mask: bool ``[C]``.
    match_iou: IoU for "matches a true-label mask".
    noise_threshold: mask probability below which a pixel is noise.
    max_owners: pixels with more owners than this go to the most confident mask.
    min_area_ratio: minimal final / original pixel-count ratio.
    query_score_threshold: extra minimal class probability of a selected query.
    overlap_rule: one of ``OVERLAP_RULES``.
    min_component_area: connected pieces of a kept mask below this pixel count are noise.

  Returns:
    ``(pseudo_masks [Q, H, W] bool, pseudo_classes [Q] int32, pseudo_valid [Q] bool)``,
    indexed like the historical queries; invalid entries have an all-False mask and class 0.
    The matching confidence for ordering is :func:`query_class_confidence` of the same logits.
  """
  check_pseudo_label_config(
    match_iou=match_iou,
    noise_threshold=noise_threshold,
    max_owners=max_owners,
    min_area_ratio=min_area_ratio,
    query_score_threshold=query_score_threshold,
    overlap_rule=overlap_rule,
    min_component_area=min_component_area,
  )
  old_class_mask = jnp.asarray(old_class_mask, bool)
  true_masks = jnp.asarray(true_masks, bool)
  true_valid = jnp.asarray(true_valid, bool)
  _check_shapes(hist_class_logits, hist_mask_logits, true_masks, true_valid, old_class_mask)
  classes, confidence, selected = select_old_class_queries(
    hist_class_logits, old_class_mask, query_score_threshold
  )
  mask_probs = jax.nn.sigmoid(hist_mask_logits)
  binary = mask_probs >= BINARIZE_THRESHOLD
  original_counts = jnp.sum(binary, axis=(1, 2))
  keep = selected
  if overlap_rule != "remove_true_pixels":
    keep = drop_matched_masks(binary, selected, true_masks, true_valid, match_iou)
  masks = remove_noisy_pixels(mask_probs, keep, noise_threshold, min_component_area)
  if overlap_rule != "drop_matched":
    masks = remove_true_pixels(masks, true_masks, true_valid)
  masks = resolve_overlaps(masks, confidence[:, None, None] * mask_probs, max_owners)
  valid = filter_by_area(masks, original_counts, min_area_ratio)
  return masks & valid[:, None, None], jnp.where(valid, classes, 0), valid


def merge_targets(
  true_classes: jax.Array,
  true_masks: jax.Array,
  true_valid: jax.Array,
  pseudo_classes: jax.Array,
  pseudo_masks: jax.Array,
  pseudo_valid: jax.Array,
  max_targets: int,
  pseudo_scores: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Union of true and pseudo labels as padded targets (METHODS.md M4 step 4 input).

  Valid true labels come first (in their order), then valid pseudo labels in decreasing
  ``pseudo_scores`` (ties and ``pseudo_scores=None``: query order), then padding. When there
  are more than ``max_targets`` valid labels, the pseudo labels at the end of that order (the
  lowest-scored ones) are dropped and counted; true labels are never dropped, which is why
  ``max_targets >= T`` is required.

  Args:
    true_classes: int ``[T]``.
    true_masks: bool ``[T, H, W]``.
    true_valid: bool ``[T]``.
    pseudo_classes: int ``[P]``.
    pseudo_masks: bool ``[P, H, W]``.
    pseudo_valid: bool ``[P]``.
    max_targets: static output length ``M >= T``.
    pseudo_scores: optional ``[P]`` confidences (e.g. :func:`query_class_confidence`).

  Returns:
    ``(classes [M] int32, masks [M, H, W] bool, valid [M] bool, num_dropped [] int32)``;
    padded entries have class 0 and an all-False mask.
  """
  t, p = true_classes.shape[0], pseudo_classes.shape[0]
  if not isinstance(max_targets, int) or max_targets < t:
    raise ValueError(
      f"max_targets={max_targets!r} is not allowed: must be an int >= the number of true "
      f"label slots T={t}"
    )
  if true_masks.shape[1:] != pseudo_masks.shape[1:]:
    raise ValueError(
      f"pseudo_masks.shape={pseudo_masks.shape} is not allowed: masks must match "
      f"true_masks.shape[1:]={true_masks.shape[1:]}"
    )
  if pseudo_scores is None:
    pseudo_scores = jnp.zeros((p,), jnp.float32)
  classes = jnp.concatenate([true_classes, pseudo_classes]).astype(jnp.int32)
  masks = jnp.concatenate([true_masks, pseudo_masks]).astype(bool)
  valid = jnp.concatenate([true_valid, pseudo_valid]).astype(bool)
  group = jnp.where(valid, jnp.concatenate([jnp.zeros(t), jnp.ones(p)]), 2.0)
  secondary = jnp.concatenate([jnp.zeros(t), -pseudo_scores.astype(jnp.float32)])
  order = jnp.lexsort((jnp.arange(t + p), secondary, group))
  pad = max(0, max_targets - (t + p))
  order = jnp.concatenate([order, jnp.full((pad,), t + p, order.dtype)])[:max_targets]
  classes = jnp.concatenate([classes, jnp.zeros((1,), jnp.int32)])[order]
  masks = jnp.concatenate([masks, jnp.zeros((1,) + masks.shape[1:], bool)])[order]
  out_valid = jnp.concatenate([valid, jnp.zeros((1,), bool)])[order]
  classes = jnp.where(out_valid, classes, 0)
  masks = masks & out_valid[:, None, None]
  num_dropped = (jnp.sum(valid) - jnp.sum(out_valid)).astype(jnp.int32)
  return classes, masks, out_valid, num_dropped


def teacher_log_probs(
  hist_class_logits: jax.Array, old_class_mask: jax.Array, temperature: float = 1.0
) -> jax.Array:
  """Log-probabilities of the historical model over its own classes: old classes + no-object.

  The historical model of an incremental step knows only the old classes; its distribution is
  the softmax of its logits over the old classes and no-object (the new-class logits, never
  trained, are left out, as if its classifier had only those outputs: CoMFormer's teacher).

  Args:
    hist_class_logits: ``[..., C + 1]`` (no gradient flows to them).
    old_class_mask: bool ``[C]`` (may be traced).
    temperature: softmax temperature.

  Returns:
    ``[..., C + 1]`` log-probabilities; new-class entries are ``_EXCLUDED_LOGIT``-scale
    (probability exactly 0).
  """
  known = jnp.concatenate([jnp.asarray(old_class_mask, bool), jnp.ones((1,), bool)])
  hist = jax.lax.stop_gradient(hist_class_logits) / temperature
  return jax.nn.log_softmax(jnp.where(known, hist, _EXCLUDED_LOGIT), axis=-1)


def student_log_probs(
  cur_class_logits: jax.Array, old_class_mask: jax.Array, form: str, temperature: float = 1.0
) -> jax.Array:
  """Log-probabilities of the current model on the historical model's classes (M4 step 5).

  ``form='fold_new_into_no_object'`` (default, METHODS.md M4): the softmax over all ``C + 1``
  classes, with the probability of every new class added to no-object, so that a query that
  drifts from an old class to no-object *or* to a new class moves mass away from where the
  historical model put it. ``form='log_softmax_all'`` (CoMFormer): the log-softmax over all
  classes, read at the old classes and at no-object (the new-class mass is simply missing, so
  drift to a new class is penalised too).

  Args:
    cur_class_logits: ``[..., C + 1]``.
    old_class_mask: bool ``[C]``.
    form: one of ``KD_FORMS``.
    temperature: softmax temperature.

  Returns:
    ``[..., C + 1]``: entries at the old classes and at no-object (others are unused).
  """
  if form not in KD_FORMS:
    raise ValueError(f"form={form!r} is not allowed: use one of {KD_FORMS}")
  log_p = jax.nn.log_softmax(cur_class_logits / temperature, axis=-1)
  if form == "log_softmax_all":
    return log_p
  new = ~jnp.asarray(old_class_mask, bool)
  folded = jnp.concatenate([new, jnp.ones((1,), bool)])
  log_no_object = jax.nn.logsumexp(jnp.where(folded, log_p, -jnp.inf), axis=-1)
  return log_p.at[..., -1].set(log_no_object)


def distillation_weights(
  hist_class_logits: jax.Array, weighting: str, old_class_mask: jax.Array | None = None
) -> jax.Array:
  """Per-query distillation weight from the historical no-object probability (M4 step 5).

  Args:
    hist_class_logits: ``[..., C + 1]``.
    weighting: ``'one_minus_no_object'`` (default of METHODS.md: ``w = 1 - p_no-object``),
      ``'squared'`` (``(1 - p_no-object)**2``: CoMFormer's ``gamma = 2``, also decreasing in
      ``p_no-object``, which the patent allows) or ``'none'`` (``w = 1``, ablation).
    old_class_mask: bool ``[C]``; ``p_no-object`` is then that of :func:`teacher_log_probs`
      (over old classes + no-object); None: the softmax over all ``C + 1`` logits.

  Returns:
    ``[...]`` weights (no gradient flows to the historical logits).
  """
  if weighting not in WEIGHTINGS:
    raise ValueError(f"weighting={weighting!r} is not allowed: use one of {WEIGHTINGS}")
  if old_class_mask is None:
    p_no_object = jax.nn.softmax(jax.lax.stop_gradient(hist_class_logits), axis=-1)[..., -1]
  else:
    p_no_object = jnp.exp(teacher_log_probs(hist_class_logits, old_class_mask)[..., -1])
  p_object = 1.0 - p_no_object
  if weighting == "one_minus_no_object":
    return p_object
  if weighting == "squared":
    return p_object**2
  return jnp.ones_like(p_object)


def distillation_loss(
  cur_class_logits: jax.Array,
  hist_class_logits: jax.Array,
  old_class_mask: jax.Array,
  *,
  weighting: str = "one_minus_no_object",
  temperature: float = 1.0,
  reduction: str = "mean",
  form: str = "fold_new_into_no_object",
) -> jax.Array:
  """Distillation over every class of the historical prediction, no-object included (M4 step 5).

  Per query ``i`` (any leading shape: one image ``[Q, C + 1]`` or a batch ``[B, Q, C + 1]``):
  ``KL_i = sum_{c in old + no-object} p_hist(c) (log p_hist(c) - log p_cur(c)) * T**2`` with
  ``p_hist`` from :func:`teacher_log_probs` and ``log p_cur`` from :func:`student_log_probs`
  (``form``). Both drifts that forget an old class, to no-object and to a new class, give a
  positive loss whose gradient pulls the query back. The weight ``w_i`` is
  :func:`distillation_weights`'s rule applied to the same historical distribution (at the
  same temperature, as CoMFormer).

  Args:
    cur_class_logits: ``[..., Q, C + 1]`` current-model logits.
    hist_class_logits: same shape, historical-model logits (treated as constants).
    old_class_mask: bool ``[C]`` (may be traced).
    weighting: see :func:`distillation_weights`.
    temperature: softmax temperature ``> 0``.
    reduction: ``'mean'`` (default): ``sum_i w_i KL_i / (number of queries)``, so queries the
      historical model sees as empty contribute little; ``'weighted_mean'`` (CoMFormer):
      ``sum_i w_i KL_i / sum_i w_i`` over every query given (the whole batch).
    form: see :func:`student_log_probs`.

  Returns:
    Scalar loss.
  """
  if not isinstance(temperature, (int, float)) or temperature <= 0:
    raise ValueError(f"temperature={temperature!r} is not allowed: temperature must be > 0")
  if reduction not in REDUCTIONS:
    raise ValueError(f"reduction={reduction!r} is not allowed: use one of {REDUCTIONS}")
  if weighting not in WEIGHTINGS:
    raise ValueError(f"weighting={weighting!r} is not allowed: use one of {WEIGHTINGS}")
  if cur_class_logits.shape != hist_class_logits.shape:
    raise ValueError(
      f"cur_class_logits.shape={cur_class_logits.shape} is not allowed: must equal "
      f"hist_class_logits.shape={hist_class_logits.shape}"
    )
  old = jnp.asarray(old_class_mask, bool)
  if old.shape != (cur_class_logits.shape[-1] - 1,):
    raise ValueError(
      f"old_class_mask.shape={old.shape} is not allowed: expected "
      f"[C={cur_class_logits.shape[-1] - 1}]"
    )
  log_p_hist = teacher_log_probs(hist_class_logits, old, temperature)
  p_object = 1.0 - jnp.exp(log_p_hist[..., -1])
  weights = {"one_minus_no_object": p_object, "squared": p_object**2}.get(
    weighting, jnp.ones_like(p_object)
  )
  log_p_cur = student_log_probs(cur_class_logits, old, form, temperature)
  known = jnp.concatenate([old, jnp.ones((1,), bool)])
  kl = jnp.sum(jnp.where(known, jnp.exp(log_p_hist) * (log_p_hist - log_p_cur), 0.0), -1)
  kl = kl * temperature**2
  if reduction == "mean":
    return jnp.mean(weights * kl)
  return jnp.sum(weights * kl) / jnp.maximum(jnp.sum(weights), 1e-8)
