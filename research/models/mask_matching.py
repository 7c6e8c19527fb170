"""Mask2Former set prediction: matching costs, Hungarian matching, SetCriterion, inference.

Used by METHODS.md M4 (class-incremental panoptic fine-tuning), steps 4 (matching), 5 (task
loss) and 6 (panoptic segmentation by the fine-tuned model).

Shapes are fixed and padded so that everything here runs under `jax.jit` and `jax.vmap`:

- predictions per image: `class_logits [Q, C+1]` (index `C` is *no-object*) and
  `mask_logits [Q, h, w]`;
- targets per image: `target_classes [T]` (any value where padded), `target_masks [T, h, w]`
  (bool or float in [0, 1]) and `target_valid [T]` bool.

Masks are compared at the prediction resolution `[h, w]`: bring the targets there first with
`resize_masks`. (Mask2Former instead compares 12544 points sampled from the upsampled masks;
full-resolution comparison is the exact version of the same per-pixel means.)

When an image has more valid targets than queries, only `Q` of them can be matched: the
Hungarian step matches `Q` valid targets (the ones giving the cheapest assignment) and
reports the others as unmatched. Call `check_num_targets` on the host to reject such data.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.optimize

_HIGHEST = jax.lax.Precision.HIGHEST
SOLVERS = ("auto", "optax", "scipy")


def _check_non_negative(**values: float) -> None:
  for name, value in values.items():
    if not value >= 0:
      raise ValueError(f"{name}={value} is not allowed: {name} must be >= 0")


def _check_unit_interval(**values: float) -> None:
  for name, value in values.items():
    if not 0.0 <= value <= 1.0:
      raise ValueError(f"{name}={value} is not allowed: {name} must be in [0, 1]")


def check_num_targets(num_valid, num_queries: int) -> None:
  """Host-side check that every image has at most as many valid targets as queries.

  Args:
    num_valid: number of valid targets, an int or an array of per-image counts `[B]`.
    num_queries: the number of queries `Q` of the model.

  Raises:
    ValueError: if some image holds more valid targets than `num_queries`; only `Q` of its
      targets could be matched.
  """
  most = int(np.max(np.asarray(num_valid))) if np.size(num_valid) else 0
  if most > num_queries:
    raise ValueError(
      f"num_valid_targets={most} is not allowed: an image may hold at most "
      f"num_queries={num_queries} valid targets"
    )


def resize_masks(masks: jax.Array, shape: tuple[int, int]) -> jax.Array:
  """Resizes masks to the prediction resolution by bilinear sampling at its pixel centres.

  This is the value Mask2Former's `point_sample` (`grid_sample`, `align_corners=False`)
  reads from a target mask at the centre of each prediction pixel; halving the resolution
  gives 2x2 block means.

  Args:
    masks: `[..., H, W]` bool or float masks.
    shape: the target `(h, w)`.

  Returns:
    `[..., h, w]` float32 soft masks with values in [0, 1].
  """
  masks = masks.astype(jnp.float32)
  resized = jax.image.resize(
    masks, masks.shape[:-2] + tuple(shape), method="linear", antialias=False
  )
  return jnp.clip(resized, 0.0, 1.0)


def pad_target_costs(cost: jax.Array, target_valid: jax.Array) -> jax.Array:
  """Gives padded targets a cost above every valid cost, so they are matched last.

  The value is `max(valid costs) + 1` (finite and on the scale of the data): with `Q >= T`
  it does not change which queries the valid targets get; with more targets than queries it
  makes the matching prefer valid targets.

  Args:
    cost: `[Q, T]` matching cost.
    target_valid: `[T]` bool.

  Returns:
    `[Q, T]` cost with padded columns replaced.
  """
  valid = jnp.broadcast_to(target_valid[None, :], cost.shape)
  highest = jnp.max(jnp.where(valid, cost, -jnp.inf), initial=0.0)
  return jnp.where(valid, cost, highest + 1.0)


def matching_cost(
  class_logits: jax.Array,
  mask_logits: jax.Array,
  target_classes: jax.Array,
  target_masks: jax.Array,
  target_valid: jax.Array,
  *,
  w_class: float = 2.0,
  w_bce: float = 5.0,
  w_dice: float = 5.0,
) -> jax.Array:
  """Mask2Former's HungarianMatcher cost between queries and targets (METHODS.md M4 step 4).

  `cost = w_class * (-p(target class)) + w_bce * BCE + w_dice * dice`, where BCE is the
  sigmoid cross-entropy averaged over pixels and dice is
  `1 - (2 a.b + 1) / (sum a + sum b + 1)` with `a = sigmoid(mask_logits)`. Both are computed
  for all pairs with matmuls, as Mask2Former's `batch_sigmoid_ce_loss` and `batch_dice_loss`.

  Args:
    class_logits: `[Q, C+1]` class logits, last index no-object.
    mask_logits: `[Q, h, w]` mask logits.
    target_classes: `[T]` int classes in `[0, C)` (anything where padded).
    target_masks: `[T, h, w]` bool or float masks at the prediction resolution.
    target_valid: `[T]` bool, False for padding.
    w_class: weight of the class cost.
    w_bce: weight of the sigmoid BCE cost.
    w_dice: weight of the dice cost.

  Returns:
    `[Q, T]` float32 cost; padded targets get a cost above every valid one.
  """
  _check_non_negative(w_class=w_class, w_bce=w_bce, w_dice=w_dice)
  num_queries, num_targets = class_logits.shape[0], target_classes.shape[0]
  probs = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)
  classes = jnp.where(target_valid, target_classes, 0)
  cost_class = -probs[:, classes]

  logits = mask_logits.reshape(num_queries, -1).astype(jnp.float32)
  targets = target_masks.reshape(num_targets, -1).astype(jnp.float32)
  num_pixels = logits.shape[1]
  loss_if_positive = jax.nn.softplus(-logits)
  loss_if_negative = jax.nn.softplus(logits)
  cost_bce = (
    jnp.matmul(loss_if_positive, targets.T, precision=_HIGHEST)
    + jnp.matmul(loss_if_negative, 1.0 - targets.T, precision=_HIGHEST)
  ) / num_pixels

  mask_probs = jax.nn.sigmoid(logits)
  numerator = 2.0 * jnp.matmul(mask_probs, targets.T, precision=_HIGHEST)
  denominator = mask_probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
  cost_dice = 1.0 - (numerator + 1.0) / (denominator + 1.0)

  cost = w_class * cost_class + w_bce * cost_bce + w_dice * cost_dice
  return pad_target_costs(cost, target_valid)


def resolve_solver(solver: str) -> str:
  """The Hungarian solver to run: ``'auto'`` is scipy on CPU and optax elsewhere.

  On CPU scipy's ``linear_sum_assignment`` (a host callback) is several times faster per
  image than optax's in-graph solver (``launch/bench_incremental_panoptic.py``); on
  accelerators the in-graph solver avoids a device-host round trip.

  Args:
    solver: one of ``SOLVERS``.

  Returns:
    ``'optax'`` or ``'scipy'``.

  Raises:
    ValueError: for a solver not in ``SOLVERS``.
  """
  if solver not in SOLVERS:
    raise ValueError(f"solver={solver!r} is not allowed: solver must be one of {list(SOLVERS)}")
  if solver == "auto":
    return "scipy" if jax.default_backend() == "cpu" else "optax"
  return solver


def _scipy_assignment(cost: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Host side of the scipy solver: ``linear_sum_assignment`` on each valid sub-problem.

  Padded targets all carry the same cost (``pad_target_costs``), so solving the valid columns
  alone and then pairing the padded columns with unused queries gives the same total cost as
  solving the padded problem, with less work (the valid sub-problem is what Mask2Former
  solves).

  Args:
    cost: ``[..., Q, T]`` costs (any leading batch dimensions, from ``vmap``).
    valid: ``[..., T]`` bool; its leading dimensions broadcast against those of ``cost``.

  Returns:
    ``rows, cols`` ``[..., min(Q, T)]`` int32, the matched pairs of each matrix.
  """
  cost, valid = np.asarray(cost), np.asarray(valid)
  (q, t), batch = cost.shape[-2:], np.broadcast_shapes(cost.shape[:-2], valid.shape[:-1])
  flat = np.broadcast_to(cost, (*batch, q, t)).reshape(-1, q, t)
  flat_valid = np.broadcast_to(valid, (*batch, t)).reshape(-1, t)
  k = min(q, t)
  rows = np.empty((flat.shape[0], k), np.int32)
  cols = np.empty_like(rows)
  all_finite = np.isfinite(flat).all()  # one check for the batch; the loop is the hot path
  for n, (matrix, is_valid) in enumerate(zip(flat, flat_valid)):
    sub = matrix[:, is_valid]
    if not all_finite:  # A NaN or inf cost must not stop the program: it is matched last.
      finite = np.isfinite(sub)
      sub = np.where(finite, sub, sub[finite].max(initial=0.0) + 1.0)
    r, c = scipy.optimize.linear_sum_assignment(sub)
    m = len(r)
    rows[n, :m], cols[n, :m] = r, np.flatnonzero(is_valid)[c]
    if m < k:  # padded columns take the first queries left unused
      unused = np.ones(q, bool)
      unused[r] = False
      rows[n, m:] = np.flatnonzero(unused)[: k - m]
      cols[n, m:] = np.flatnonzero(~is_valid)[: k - m]
  return rows.reshape(*batch, -1), cols.reshape(*batch, -1)


def _assignment(
  cost: jax.Array, target_valid: jax.Array, solver: str
) -> tuple[jax.Array, jax.Array]:
  """Minimum-cost ``(rows, cols)`` pairs, ``[min(Q, T)]`` each, of a padded ``[Q, T]`` cost."""
  if resolve_solver(solver) == "optax":
    return optax.assignment.hungarian_algorithm(cost)
  pairs = jax.ShapeDtypeStruct((min(cost.shape),), jnp.int32)
  return jax.pure_callback(
    _scipy_assignment, (pairs, pairs), cost, target_valid, vmap_method="expand_dims"
  )


def hungarian_match(
  cost: jax.Array, target_valid: jax.Array, *, solver: str = "auto"
) -> tuple[jax.Array, jax.Array]:
  """Minimum-cost one-to-one matching of targets to queries (METHODS.md M4 step 4).

  Solves the assignment on the `[Q, T]` cost after giving padded targets a cost above all
  valid ones (`pad_target_costs`). With `Q >= T` every target is assigned a distinct query
  and the valid ones get an optimal assignment of the valid sub-problem. With `Q < T` only `Q`
  targets are matched (valid ones first); the rest are reported unmatched. No gradient flows
  through the matching. Both solvers work under `jax.jit` and `jax.vmap` and reach the same
  (minimum) assignment cost; with ties they may pick different optimal assignments.

  Args:
    cost: `[Q, T]` matching cost.
    target_valid: `[T]` bool, False for padding.
    solver: `'optax'` (`optax.assignment.hungarian_algorithm`, in the graph), `'scipy'`
      (`scipy.optimize.linear_sum_assignment` through `jax.pure_callback`) or `'auto'`
      (scipy on CPU, optax elsewhere; see `resolve_solver`).

  Returns:
    `query_index_for_target` `[T]` int32 (0 where unmatched) and `matched_mask` `[T]` bool
    (valid and matched).
  """
  cost = pad_target_costs(jax.lax.stop_gradient(cost), target_valid)
  num_targets = cost.shape[1]
  rows, cols = _assignment(cost, target_valid, solver)
  query_index_for_target = jnp.zeros(num_targets, jnp.int32).at[cols].set(rows)
  assigned = jnp.zeros(num_targets, bool).at[cols].set(True)
  return query_index_for_target, assigned & target_valid


def query_class_targets(
  query_index_for_target: jax.Array,
  matched_mask: jax.Array,
  target_classes: jax.Array,
  num_queries: int,
  no_object_class: int,
) -> jax.Array:
  """Class target per query: the matched target's class, else no-object.

  Args:
    query_index_for_target: `[T]` int query matched to each target.
    matched_mask: `[T]` bool.
    target_classes: `[T]` int classes.
    num_queries: `Q`.
    no_object_class: the no-object index `C`.

  Returns:
    `[Q]` int32 class targets in `[0, C]`.
  """
  index = jnp.where(matched_mask, query_index_for_target, num_queries)
  classes = jnp.full(num_queries, no_object_class, jnp.int32)
  return classes.at[index].set(target_classes.astype(jnp.int32), mode="drop")


def classification_loss(
  class_logits: jax.Array, query_classes: jax.Array, *, no_object_weight: float = 0.1
) -> jax.Array:
  """Weighted cross-entropy over all queries, as Mask2Former's `loss_labels`.

  Class weights are 1 except `no_object_weight` for no-object (the last class), normalised
  like `torch.nn.functional.cross_entropy(weight=...)`: `sum(w_y * nll) / sum(w_y)` over every
  query of every image given.

  Args:
    class_logits: `[..., Q, C+1]` class logits.
    query_classes: `[..., Q]` int class targets (`C` = no-object), from
      `query_class_targets`.
    no_object_weight: weight of the no-object class (Mask2Former's `eos_coef`), > 0.

  Returns:
    Scalar loss.
  """
  if not no_object_weight > 0:
    raise ValueError(
      f"no_object_weight={no_object_weight} is not allowed: no_object_weight must be > 0"
    )
  no_object_class = class_logits.shape[-1] - 1
  log_probs = jax.nn.log_softmax(class_logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, query_classes[..., None], axis=-1)[..., 0]
  weights = jnp.where(query_classes == no_object_class, no_object_weight, 1.0)
  return jnp.sum(weights * nll) / jnp.sum(weights)


def dice_loss(mask_logits: jax.Array, target_masks: jax.Array) -> jax.Array:
  """Per-mask dice loss `1 - (2 a.b + 1) / (sum a + sum b + 1)`, `a = sigmoid(logits)`.

  Args:
    mask_logits: `[..., h, w]` logits.
    target_masks: `[..., h, w]` bool or float masks.

  Returns:
    `[...]` dice loss per mask.
  """
  probs = jax.nn.sigmoid(mask_logits.astype(jnp.float32))
  targets = target_masks.astype(jnp.float32)
  numerator = 2.0 * jnp.sum(probs * targets, axis=(-2, -1))
  denominator = jnp.sum(probs, axis=(-2, -1)) + jnp.sum(targets, axis=(-2, -1))
  return 1.0 - (numerator + 1.0) / (denominator + 1.0)


def mask_losses(
  mask_logits: jax.Array,
  target_masks: jax.Array,
  query_index_for_target: jax.Array,
  matched_mask: jax.Array,
  target_valid: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """Sigmoid BCE and dice on matched (query, target) pairs, as Mask2Former's `loss_masks`.

  Each loss is summed over matched pairs (BCE as a per-pair mean over pixels) and divided by
  `num_masks = max(number of valid targets, 1)` counted over every image given.

  Args:
    mask_logits: `[..., Q, h, w]` mask logits.
    target_masks: `[..., T, h, w]` masks at the prediction resolution.
    query_index_for_target: `[..., T]` int.
    matched_mask: `[..., T]` bool.
    target_valid: `[..., T]` bool.

  Returns:
    `(bce, dice)` scalars.
  """
  matched_logits = jnp.take_along_axis(
    mask_logits, query_index_for_target[..., None, None], axis=-3
  ).astype(jnp.float32)
  targets = target_masks.astype(jnp.float32)
  bce = jnp.mean(optax.sigmoid_binary_cross_entropy(matched_logits, targets), axis=(-2, -1))
  dice = dice_loss(matched_logits, targets)
  num_masks = jnp.maximum(jnp.sum(target_valid), 1)
  return (
    jnp.sum(jnp.where(matched_mask, bce, 0.0)) / num_masks,
    jnp.sum(jnp.where(matched_mask, dice, 0.0)) / num_masks,
  )


def set_criterion_loss(
  class_logits: jax.Array,
  mask_logits: jax.Array,
  target_classes: jax.Array,
  target_masks: jax.Array,
  target_valid: jax.Array,
  *,
  w_class: float = 2.0,
  w_bce: float = 5.0,
  w_dice: float = 5.0,
  no_object_weight: float = 0.1,
  solver: str = "auto",
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mask2Former's SetCriterion with deep supervision (METHODS.md M4 steps 4 and 5).

  Every decoder layer is matched to the targets on its own (with the same weights as the
  loss, as Mask2Former's matcher) and its losses `w_class * CE + w_bce * BCE + w_dice * dice`
  are summed over layers. The last layer is the final prediction; a single output is passed
  as `x[None]`, a list of layer outputs as `jnp.stack(list)`.

  Args:
    class_logits: `[L, B, Q, C+1]` class logits per layer.
    mask_logits: `[L, B, Q, h, w]` mask logits per layer.
    target_classes: `[B, T]` int classes in `[0, C)`.
    target_masks: `[B, T, h, w]` masks at the prediction resolution (see `resize_masks`).
    target_valid: `[B, T]` bool.
    w_class: weight of the classification loss and cost.
    w_bce: weight of the mask BCE loss and cost.
    w_dice: weight of the dice loss and cost.
    no_object_weight: weight of the no-object class in the classification loss.
    solver: Hungarian solver, one of `SOLVERS` (see `hungarian_match`).

  Returns:
    `(loss, metrics)`: the total loss over layers, and the unweighted final-layer terms
    `loss_class`, `loss_bce`, `loss_dice`, the weighted sum over earlier layers `loss_aux`,
    and `loss`.
  """
  _check_non_negative(w_class=w_class, w_bce=w_bce, w_dice=w_dice)
  image_cost = functools.partial(matching_cost, w_class=w_class, w_bce=w_bce, w_dice=w_dice)
  match_image = functools.partial(hungarian_match, solver=resolve_solver(solver))
  classes_for_queries = functools.partial(
    query_class_targets,
    num_queries=class_logits.shape[-2],
    no_object_class=class_logits.shape[-1] - 1,
  )

  def layer_losses(layer_class_logits, layer_mask_logits):
    cost = jax.vmap(image_cost)(
      layer_class_logits, layer_mask_logits, target_classes, target_masks, target_valid
    )
    query_index, matched = jax.vmap(match_image)(cost, target_valid)
    query_classes = jax.vmap(classes_for_queries)(query_index, matched, target_classes)
    loss_class = classification_loss(
      layer_class_logits, query_classes, no_object_weight=no_object_weight
    )
    loss_bce, loss_dice = mask_losses(
      layer_mask_logits, target_masks, query_index, matched, target_valid
    )
    return loss_class, loss_bce, loss_dice

  loss_class, loss_bce, loss_dice = jax.vmap(layer_losses)(class_logits, mask_logits)
  per_layer = w_class * loss_class + w_bce * loss_bce + w_dice * loss_dice
  loss = jnp.sum(per_layer)
  metrics = {
    "loss": loss,
    "loss_class": loss_class[-1],
    "loss_bce": loss_bce[-1],
    "loss_dice": loss_dice[-1],
    "loss_aux": jnp.sum(per_layer[:-1]),
  }
  return loss, metrics


def panoptic_inference(
  class_logits: jax.Array,
  mask_logits: jax.Array,
  *,
  thing_mask: jax.Array,
  object_mask_threshold: float = 0.8,
  overlap_threshold: float = 0.8,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Mask2Former's `panoptic_inference` for one image, jit-compatible (METHODS.md M4 step 6).

  A query is kept when its most probable class (no-object included) is not no-object and
  that probability exceeds `object_mask_threshold` (for thresholds >= 0.5 this is the same as
  "max non-no-object probability > threshold"). Each pixel goes to the kept query with the
  largest `score * sigmoid(mask)`; a kept query becomes a segment when it wins some pixels,
  has pixels with `sigmoid(mask) >= 0.5`, `won area / area(sigmoid(mask) >= 0.5) >=
  overlap_threshold` (Mask2Former's areas), and some won pixel has `sigmoid(mask) >= 0.5`;
  those pixels form the segment. Stuff segments of one class are merged into the first such
  query. Upsample `mask_logits` to the image size beforehand if wanted.

  Args:
    class_logits: `[Q, C+1]` class logits, last index no-object.
    mask_logits: `[Q, H, W]` mask logits.
    thing_mask: `[C]` bool, True for thing classes.
    object_mask_threshold: minimum class probability of a kept query, in [0, 1].
    overlap_threshold: minimum kept fraction of a query's mask, in [0, 1].

  Returns:
    `segment_map` `[H, W]` int32 with segment id `q + 1` for query `q` (0 = void),
    `segment_classes` `[Q]` int32 class of segment `q + 1` (-1 where invalid) and
    `segment_valid` `[Q]` bool.
  """
  _check_unit_interval(
    object_mask_threshold=object_mask_threshold, overlap_threshold=overlap_threshold
  )
  num_queries, no_object_class = class_logits.shape[0], class_logits.shape[1] - 1
  probs = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)
  scores, labels = jnp.max(probs, axis=-1), jnp.argmax(probs, axis=-1).astype(jnp.int32)
  keep = (labels != no_object_class) & (scores > object_mask_threshold)

  mask_probs = jax.nn.sigmoid(mask_logits.astype(jnp.float32))
  prob_masks = jnp.where(keep[:, None, None], scores[:, None, None] * mask_probs, -1.0)
  winner = jnp.argmax(prob_masks, axis=0)
  query_ids = jnp.arange(num_queries)
  won = winner[None] == query_ids[:, None, None]
  binary = mask_probs >= 0.5
  won_area = jnp.sum(won, axis=(1, 2))
  original_area = jnp.sum(binary, axis=(1, 2))
  final_area = jnp.sum(won & binary, axis=(1, 2))
  accepted = (
    keep
    & (won_area > 0)
    & (original_area > 0)
    & (final_area > 0)
    & (won_area >= overlap_threshold * original_area)
  )

  is_thing = jnp.asarray(thing_mask)[jnp.minimum(labels, no_object_class - 1)]
  stuff = accepted & ~is_thing
  same_stuff = stuff[:, None] & stuff[None, :] & (labels[:, None] == labels[None, :])
  representative = jnp.where(stuff, jnp.argmax(same_stuff, axis=1), query_ids)
  query_segment_id = jnp.where(accepted, representative + 1, 0).astype(jnp.int32)

  winner_binary = jnp.take_along_axis(binary, winner[None], axis=0)[0]
  segment_map = jnp.where(winner_binary, query_segment_id[winner], 0)
  segment_valid = accepted & (representative == query_ids)
  segment_classes = jnp.where(segment_valid, labels, -1)
  return segment_map, segment_classes, segment_valid
