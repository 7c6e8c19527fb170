"""Tests of the Mask2Former matching, SetCriterion and panoptic inference against references."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from research.models import mask_matching as mm

SOLVERS = ("optax", "scipy")


def _hungarian_match(cost, valid, solver):
  return jax.jit(functools.partial(mm.hungarian_match, solver=solver))(cost, valid)


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _bce_mean(logit, target):
  """Mean over pixels of -[t log s(x) + (1-t) log(1-s(x))], float64 loops."""
  total = 0.0
  for x, t in zip(logit.ravel(), target.ravel(), strict=True):
    s = 1.0 / (1.0 + np.exp(-float(x)))
    total += -(t * np.log(s) + (1.0 - t) * np.log(1.0 - s))
  return total / logit.size


def _dice(logit, target):
  p = _sigmoid(logit.astype(np.float64)).ravel()
  t = target.astype(np.float64).ravel()
  return 1.0 - (2.0 * np.sum(p * t) + 1.0) / (p.sum() + t.sum() + 1.0)


def _random_targets(rng, num_targets, num_valid, num_classes, hw):
  classes = rng.integers(0, num_classes, num_targets)
  masks = rng.random((num_targets, *hw)) < 0.4
  valid = np.arange(num_targets) < num_valid
  return classes, masks, valid


# ---------------------------------------------------------------- hungarian_match


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("num_queries,num_targets", [(7, 4), (5, 5), (9, 1)])
def test_hungarian_match_total_cost_equals_scipy(num_queries, num_targets, solver):
  rng = np.random.default_rng(num_queries * 10 + num_targets)
  for _ in range(3):
    cost = rng.normal(size=(num_queries, num_targets)).astype(np.float32)
    query, matched = _hungarian_match(jnp.asarray(cost), jnp.ones(num_targets, bool), solver)
    query, matched = np.asarray(query), np.asarray(matched)
    rows, cols = linear_sum_assignment(cost)
    assert matched.all()
    assert len(set(query.tolist())) == num_targets
    np.testing.assert_allclose(
      cost[query, np.arange(num_targets)].sum(), cost[rows, cols].sum(), rtol=1e-5
    )


@pytest.mark.parametrize("solver", SOLVERS)
def test_hungarian_match_padded_targets_do_not_change_valid_assignment(solver):
  rng = np.random.default_rng(1)
  num_queries, num_targets, num_valid = 6, 5, 3
  for _ in range(3):
    cost = rng.normal(size=(num_queries, num_targets)).astype(np.float32)
    # Padded columns are tempting: very cheap or non-finite.
    cost[:, num_valid:] = rng.choice([-1e4, np.nan, -np.inf], size=(num_queries, 2))
    valid = np.arange(num_targets) < num_valid
    query, matched = _hungarian_match(jnp.asarray(cost), jnp.asarray(valid), solver)
    query, matched = np.asarray(query), np.asarray(matched)
    np.testing.assert_array_equal(matched, valid)
    assert len(set(query.tolist())) == num_targets
    rows, cols = linear_sum_assignment(cost[:, :num_valid])
    np.testing.assert_allclose(
      cost[query[:num_valid], np.arange(num_valid)].sum(), cost[rows, cols].sum(), rtol=1e-5
    )


@pytest.mark.parametrize("solver", SOLVERS)
def test_hungarian_match_more_valid_targets_than_queries_matches_q_valid_ones(solver):
  rng = np.random.default_rng(2)
  num_queries, num_targets, num_valid = 3, 6, 5
  cost = rng.normal(size=(num_queries, num_targets)).astype(np.float32)
  cost[:, num_valid:] = -100.0
  valid = np.arange(num_targets) < num_valid
  query, matched = _hungarian_match(jnp.asarray(cost), jnp.asarray(valid), solver)
  query, matched = np.asarray(query), np.asarray(matched)
  assert matched.sum() == num_queries
  assert not matched[num_valid:].any()
  assert len(set(query[matched].tolist())) == num_queries
  rows, cols = linear_sum_assignment(cost[:, :num_valid])
  np.testing.assert_allclose(
    cost[query[matched], np.flatnonzero(matched)].sum(), cost[rows, cols].sum(), rtol=1e-5
  )


@pytest.mark.parametrize("solver", SOLVERS)
def test_hungarian_match_under_jit_and_vmap_compiles_once(solver):
  chex.clear_trace_counter()  # the counter is per function, across the parametrisation
  rng = np.random.default_rng(3)
  batch, num_queries, num_targets = 4, 6, 4
  costs = rng.normal(size=(batch, num_queries, num_targets)).astype(np.float32)
  valid = np.array([[True] * 4, [True, True, False, False], [True] * 3 + [False], [False] * 4])

  def batched_match(c, v):
    return jax.vmap(functools.partial(mm.hungarian_match, solver=solver))(c, v)

  match = jax.jit(chex.assert_max_traces(batched_match, n=1))
  for _ in range(2):
    query, matched = match(jnp.asarray(costs), jnp.asarray(valid))
  query, matched = np.asarray(query), np.asarray(matched)
  chex.assert_shape(query, (batch, num_targets))
  np.testing.assert_array_equal(matched, valid)
  for b in range(batch):
    cols = np.flatnonzero(valid[b])
    if not cols.size:
      continue
    rows_ref, cols_ref = linear_sum_assignment(costs[b][:, cols])
    np.testing.assert_allclose(
      costs[b][query[b, cols], cols].sum(), costs[b][rows_ref, cols[cols_ref]].sum(), rtol=1e-5
    )


@pytest.mark.parametrize("num_queries,num_targets", [(8, 5), (4, 6)])
def test_solvers_reach_the_same_cost_under_jit_and_nested_vmap(num_queries, num_targets):
  """optax and scipy: equal assignment costs on [L, B, Q, T] padded problems (issue 18)."""
  rng = np.random.default_rng(num_queries + num_targets)
  layers, batch = 2, 3
  costs = rng.normal(size=(layers, batch, num_queries, num_targets)).astype(np.float32)
  costs[0, 0, 0] = costs[0, 0, 1]  # a tie: the two solvers may pick different assignments
  valid = rng.random((batch, num_targets)) < 0.7
  valid[0] = True
  valid[1] = False

  def match(solver):
    one = functools.partial(mm.hungarian_match, solver=solver)
    batched = jax.jit(jax.vmap(lambda c: jax.vmap(one)(c, jnp.asarray(valid))))
    return [np.asarray(a) for a in batched(jnp.asarray(costs))]

  results = {solver: match(solver) for solver in SOLVERS}
  np.testing.assert_array_equal(results["optax"][1], results["scipy"][1])  # matched masks
  for layer in range(layers):
    for b in range(batch):
      cols = np.flatnonzero(valid[b])
      if not cols.size:
        assert not results["scipy"][1][layer, b].any()
        continue
      rows_ref, cols_ref = linear_sum_assignment(costs[layer, b][:, cols])
      best = costs[layer, b][rows_ref, cols[cols_ref]].sum()
      for solver, (query, matched) in results.items():
        picked = np.flatnonzero(matched[layer, b])
        assert len(picked) == min(num_queries, len(cols)), solver
        assert len(set(query[layer, b, picked].tolist())) == len(picked), solver
        total = costs[layer, b][query[layer, b, picked], picked].sum()
        np.testing.assert_allclose(total, best, rtol=1e-5, err_msg=solver)


def test_resolve_solver():
  assert mm.resolve_solver("auto") == ("scipy" if jax.default_backend() == "cpu" else "optax")
  assert mm.resolve_solver("optax") == "optax"
  with pytest.raises(ValueError, match="solver='lapjv' is not allowed"):
    mm.resolve_solver("lapjv")


def test_check_num_targets():
  mm.check_num_targets(np.array([2, 5]), 5)
  with pytest.raises(ValueError, match="num_valid_targets=6 is not allowed"):
    mm.check_num_targets(np.array([2, 6]), 5)


# ---------------------------------------------------------------- matching_cost


def test_matching_cost_matches_numpy_loops():
  rng = np.random.default_rng(4)
  num_queries, num_targets, num_valid, num_classes, hw = 4, 3, 2, 3, (3, 4)
  class_logits = rng.normal(size=(num_queries, num_classes + 1)).astype(np.float32)
  mask_logits = (3 * rng.normal(size=(num_queries, *hw))).astype(np.float32)
  classes, masks, valid = _random_targets(rng, num_targets, num_valid, num_classes, hw)
  weights = {"w_class": 2.0, "w_bce": 5.0, "w_dice": 3.0}

  cost = np.asarray(
    mm.matching_cost(
      jnp.asarray(class_logits),
      jnp.asarray(mask_logits),
      jnp.asarray(classes),
      jnp.asarray(masks),
      jnp.asarray(valid),
      **weights,
    )
  )
  chex.assert_shape(cost, (num_queries, num_targets))
  probs = _softmax(class_logits.astype(np.float64))
  for q in range(num_queries):
    for t in range(num_valid):
      expected = (
        -weights["w_class"] * probs[q, classes[t]]
        + weights["w_bce"] * _bce_mean(mask_logits[q], masks[t])
        + weights["w_dice"] * _dice(mask_logits[q], masks[t])
      )
      np.testing.assert_allclose(cost[q, t], expected, rtol=1e-4, atol=1e-5)
  assert (cost[:, num_valid:] > cost[:, :num_valid].max()).all()


def test_matching_cost_rejects_negative_weight():
  with pytest.raises(ValueError, match="w_dice=-1.0 is not allowed"):
    mm.matching_cost(
      jnp.zeros((2, 3)),
      jnp.zeros((2, 2, 2)),
      jnp.zeros(1, int),
      jnp.zeros((1, 2, 2)),
      jnp.ones(1, bool),
      w_dice=-1.0,
    )


def test_resize_masks_halving_gives_block_means():
  # Bilinear sampling at the output pixel centres (align_corners=False) of a 2x smaller grid
  # lands between four input pixels: the 2x2 block mean.
  masks = np.random.default_rng(9).random((2, 4, 6)).astype(np.float32)
  expected = masks.reshape(2, 2, 2, 3, 2).mean(axis=(2, 4))
  np.testing.assert_allclose(mm.resize_masks(jnp.asarray(masks), (2, 3)), expected, atol=1e-6)


# ---------------------------------------------------------------- losses


def _torch_weighted_ce(logits, targets, no_object_weight):
  """F.cross_entropy(weight=w, reduction='mean'): sum_i w[y_i] nll_i / sum_i w[y_i]."""
  logits = logits.reshape(-1, logits.shape[-1]).astype(np.float64)
  targets = targets.ravel()
  class_weights = np.ones(logits.shape[-1])
  class_weights[-1] = no_object_weight
  numerator = denominator = 0.0
  for row, y in zip(logits, targets, strict=True):
    log_norm = np.log(np.sum(np.exp(row - row.max()))) + row.max()
    numerator += class_weights[y] * (log_norm - row[y])
    denominator += class_weights[y]
  return numerator / denominator


def test_classification_loss_matches_torch_weighted_ce_normalisation():
  rng = np.random.default_rng(5)
  batch, num_queries, num_classes = 2, 5, 3
  logits = rng.normal(size=(batch, num_queries, num_classes + 1)).astype(np.float32)
  targets = rng.integers(0, num_classes + 1, (batch, num_queries))
  targets[0, :3] = num_classes
  loss = mm.classification_loss(jnp.asarray(logits), jnp.asarray(targets), no_object_weight=0.1)
  np.testing.assert_allclose(loss, _torch_weighted_ce(logits, targets, 0.1), rtol=1e-5)


def test_classification_loss_rejects_zero_no_object_weight():
  with pytest.raises(ValueError, match="no_object_weight=0.0 is not allowed"):
    mm.classification_loss(jnp.zeros((2, 3)), jnp.zeros(2, int), no_object_weight=0.0)


def test_query_class_targets():
  classes = mm.query_class_targets(
    jnp.array([3, 0, 1]), jnp.array([True, True, False]), jnp.array([7, 8, 9]), 5, 10
  )
  np.testing.assert_array_equal(classes, [8, 10, 10, 7, 10])


def _numpy_mask_losses(mask_logits, target_masks, query, matched, valid):
  bce = dice = 0.0
  for b in range(mask_logits.shape[0]):
    for t in range(target_masks.shape[1]):
      if matched[b, t]:
        bce += _bce_mean(mask_logits[b, query[b, t]], target_masks[b, t])
        dice += _dice(mask_logits[b, query[b, t]], target_masks[b, t])
  num_masks = max(valid.sum(), 1)
  return bce / num_masks, dice / num_masks


def test_mask_losses_match_numpy():
  rng = np.random.default_rng(6)
  batch, num_queries, num_targets, hw = 2, 4, 3, (3, 3)
  mask_logits = (2 * rng.normal(size=(batch, num_queries, *hw))).astype(np.float32)
  target_masks = rng.random((batch, num_targets, *hw)) < 0.5
  query = np.array([[2, 0, 1], [3, 1, 0]])
  valid = np.array([[True, True, False], [True, False, False]])
  bce, dice = mm.mask_losses(
    jnp.asarray(mask_logits),
    jnp.asarray(target_masks),
    jnp.asarray(query),
    jnp.asarray(valid),
    jnp.asarray(valid),
  )
  bce_ref, dice_ref = _numpy_mask_losses(mask_logits, target_masks, query, valid, valid)
  np.testing.assert_allclose([bce, dice], [bce_ref, dice_ref], rtol=1e-5)


def test_mask_losses_without_targets_are_zero():
  bce, dice = mm.mask_losses(
    jnp.ones((1, 2, 2, 2)),
    jnp.ones((1, 1, 2, 2)),
    jnp.zeros((1, 1), int),
    jnp.zeros((1, 1), bool),
    jnp.zeros((1, 1), bool),
  )
  np.testing.assert_array_equal([bce, dice], [0.0, 0.0])


@pytest.mark.parametrize("solver", SOLVERS)
def test_set_criterion_loss_matches_numpy_with_scipy_matching(solver):
  rng = np.random.default_rng(7)
  layers, batch, num_queries, num_targets, num_classes, hw = 2, 2, 5, 3, 3, (4, 4)
  class_logits = rng.normal(size=(layers, batch, num_queries, num_classes + 1))
  mask_logits = 2 * rng.normal(size=(layers, batch, num_queries, *hw))
  class_logits, mask_logits = class_logits.astype(np.float32), mask_logits.astype(np.float32)
  target_classes = rng.integers(0, num_classes, (batch, num_targets))
  target_masks = rng.random((batch, num_targets, *hw)) < 0.4
  valid = np.array([[True, True, True], [True, False, False]])
  w_class, w_bce, w_dice = 2.0, 5.0, 5.0

  loss_fn = functools.partial(mm.set_criterion_loss, solver=solver)
  loss_and_grad = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))
  (loss, metrics), grads = loss_and_grad(
    jnp.asarray(class_logits),
    jnp.asarray(mask_logits),
    jnp.asarray(target_classes),
    jnp.asarray(target_masks),
    jnp.asarray(valid),
  )
  chex.assert_tree_all_finite(grads)

  expected_per_layer = []
  for layer in range(layers):
    query = np.zeros((batch, num_targets), int)
    query_classes = np.full((batch, num_queries), num_classes)
    for b in range(batch):
      probs = _softmax(class_logits[layer, b].astype(np.float64))
      cols = np.flatnonzero(valid[b])
      cost = np.array(
        [
          [
            -w_class * probs[q, target_classes[b, t]]
            + w_bce * _bce_mean(mask_logits[layer, b, q], target_masks[b, t])
            + w_dice * _dice(mask_logits[layer, b, q], target_masks[b, t])
            for t in cols
          ]
          for q in range(num_queries)
        ]
      )
      rows, assigned = linear_sum_assignment(cost)
      query[b, cols[assigned]] = rows
      query_classes[b, rows] = target_classes[b, cols[assigned]]
    ce = _torch_weighted_ce(class_logits[layer], query_classes, 0.1)
    bce, dice = _numpy_mask_losses(mask_logits[layer], target_masks, query, valid, valid)
    expected_per_layer.append((ce, bce, dice))
  totals = [w_class * ce + w_bce * bce + w_dice * dice for ce, bce, dice in expected_per_layer]

  np.testing.assert_allclose(loss, sum(totals), rtol=1e-4)
  np.testing.assert_allclose(
    [metrics["loss_class"], metrics["loss_bce"], metrics["loss_dice"]],
    expected_per_layer[-1],
    rtol=1e-4,
  )
  np.testing.assert_allclose(metrics["loss_aux"], totals[0], rtol=1e-4)


# ---------------------------------------------------------------- panoptic_inference


def _mask2former_panoptic_reference(class_logits, mask_logits, thing, threshold, overlap):
  """NumPy transcription of Mask2Former's MaskFormer.panoptic_inference loop."""
  num_classes = class_logits.shape[-1] - 1
  probs = _softmax(class_logits)
  scores, labels = probs.max(-1), probs.argmax(-1)
  kept = np.flatnonzero((labels != num_classes) & (scores > threshold))
  segment_map = np.zeros(mask_logits.shape[1:], int)
  classes = {}
  if not kept.size:
    return segment_map, classes
  masks = _sigmoid(mask_logits[kept])
  mask_ids = (scores[kept, None, None] * masks).argmax(0)
  stuff_memory, current = {}, 0
  for k, query in enumerate(kept):
    pred_class = int(labels[query])
    mask_area = (mask_ids == k).sum()
    original_area = (masks[k] >= 0.5).sum()
    mask = (mask_ids == k) & (masks[k] >= 0.5)
    if mask_area > 0 and original_area > 0 and mask.sum() > 0:
      if mask_area / original_area < overlap:
        continue
      if not thing[pred_class]:
        if pred_class in stuff_memory:
          segment_map[mask] = stuff_memory[pred_class]
          continue
        stuff_memory[pred_class] = current + 1
      current += 1
      segment_map[mask] = current
      classes[current] = pred_class
  return segment_map, classes


def _canonical(segment_map):
  """Relabels ids by first appearance so two maps with renamed ids compare equal."""
  order = {}
  for value in segment_map.ravel():
    if value and value not in order:
      order[value] = len(order) + 1
  return np.vectorize(lambda v: order.get(v, 0))(segment_map)


def _pixel_classes(segment_map, classes):
  return np.array([classes.get(int(v), -1) for v in segment_map.ravel()]).reshape(segment_map.shape)


_panoptic_inference = jax.jit(
  mm.panoptic_inference, static_argnames=("object_mask_threshold", "overlap_threshold")
)


def _run_inference(class_logits, mask_logits, thing, **thresholds):
  outputs = _panoptic_inference(
    jnp.asarray(class_logits), jnp.asarray(mask_logits), thing_mask=jnp.asarray(thing), **thresholds
  )
  return tuple(np.asarray(x) for x in outputs)


def test_panoptic_inference_crafted_case():
  # Classes: 0 = thing, 1 and 2 = stuff, 3 = no-object. Image 4x4.
  big = 10.0
  class_logits = np.full((6, 4), -big, np.float32)
  class_logits[0, 0] = big  # thing, top-left 2x2
  class_logits[1, 1] = big  # stuff 1, bottom half
  class_logits[2, 1] = big  # stuff 1 again, top-right 2x2: merged into query 1's segment
  class_logits[3, 3] = big  # no-object: dropped
  class_logits[4, 2] = big  # stuff 2 overlapping query 0 mostly: fails the overlap test
  class_logits[5, 0] = 0.5 * big  # thing with its mask everywhere...
  class_logits[5, 3] = 0.5 * big  # ...but probability 0.5 < 0.8: dropped
  region = np.zeros((6, 4, 4), bool)
  region[0, :2, :2] = True
  region[1, 2:, :] = True
  region[2, :2, 2:] = True
  region[3, :, :] = True
  region[4, :2, :2] = True
  region[4, 0, 2] = True
  region[5, :, :] = True
  mask_logits = np.where(region, 4.0, -4.0).astype(np.float32)
  mask_logits[0][region[0]] = 6.0  # query 0 beats query 4 on their shared pixels
  mask_logits[4, 0, 2] = 6.0  # query 4 wins 1 of its 5 pixels: 0.2 < 0.7, that pixel is void

  segment_map, classes, valid = _run_inference(
    class_logits, mask_logits, np.array([1, 0, 0]), overlap_threshold=0.7
  )
  # Query 2 keeps 3 of its 4 pixels (0.75 >= 0.7): merged into query 1's stuff segment.
  expected = np.array([[1, 1, 0, 2], [1, 1, 2, 2], [2, 2, 2, 2], [2, 2, 2, 2]])
  np.testing.assert_array_equal(segment_map, expected)
  np.testing.assert_array_equal(valid, [True, True, False, False, False, False])
  np.testing.assert_array_equal(classes, [0, 1, -1, -1, -1, -1])


def test_panoptic_inference_nothing_kept_gives_void():
  class_logits = np.zeros((3, 3), np.float32)
  class_logits[:, 2] = 5.0
  segment_map, classes, valid = _run_inference(
    class_logits, np.ones((3, 2, 2), np.float32), np.array([1, 0])
  )
  np.testing.assert_array_equal(segment_map, 0)
  assert not valid.any()
  np.testing.assert_array_equal(classes, -1)


def _random_queries(rng, num_queries, num_classes, hw):
  """Peaked class logits and rectangle-shaped noisy masks, so segments compete and merge."""
  class_logits = rng.normal(size=(num_queries, num_classes + 1))
  class_logits[np.arange(num_queries), rng.integers(0, num_classes + 1, num_queries)] += 5.0
  region = np.zeros((num_queries, *hw), bool)
  for q in range(num_queries):
    top, left = rng.integers(0, hw[0] - 2, 2)
    height, width = rng.integers(2, 7, 2)
    region[q, top : top + height, left : left + width] = True
  mask_logits = np.where(region, 3.0, -3.0) + 1.5 * rng.normal(size=region.shape)
  return class_logits.astype(np.float32), mask_logits.astype(np.float32)


def test_panoptic_inference_matches_mask2former_loop_on_random_inputs():
  # With this seed the scenes include rejected queries, merged stuff and void pixels.
  rng = np.random.default_rng(8)
  thing = np.array([1, 1, 0, 0], bool)
  thresholds = {"object_mask_threshold": 0.6, "overlap_threshold": 0.5}
  for _ in range(4):
    class_logits, mask_logits = _random_queries(rng, 8, 4, (8, 8))
    segment_map, classes, valid = _run_inference(class_logits, mask_logits, thing, **thresholds)
    ref_map, ref_classes = _mask2former_panoptic_reference(
      class_logits, mask_logits, thing, *thresholds.values()
    )
    np.testing.assert_array_equal(_canonical(segment_map), _canonical(ref_map))
    ours = {q + 1: c for q, c in enumerate(classes) if valid[q]}
    np.testing.assert_array_equal(
      _pixel_classes(segment_map, ours), _pixel_classes(ref_map, ref_classes)
    )
    assert valid.sum() == len(ref_classes)
    assert set(np.unique(segment_map)) - {0} == set(np.flatnonzero(valid) + 1)


def test_panoptic_inference_rejects_bad_threshold():
  with pytest.raises(ValueError, match="overlap_threshold=1.5 is not allowed"):
    mm.panoptic_inference(
      jnp.zeros((2, 3)), jnp.zeros((2, 2, 2)), thing_mask=jnp.ones(2, bool), overlap_threshold=1.5
    )
