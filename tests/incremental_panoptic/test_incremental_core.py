"""Tests of research/incremental_panoptic/core.py against hand-made 8x8 cases and numpy loops."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references
from scipy import ndimage

from research.incremental_panoptic import core

C = 4  # classes 0, 1 old; 2, 3 new; index 4 = no-object
OLD = np.array([True, True, False, False])


def block(rows, cols, shape=(8, 8)):
  m = np.zeros(shape, bool)
  m[rows[0] : rows[1], cols[0] : cols[1]] = True
  return m


def class_logits(spec):
  """One row per (class, height): logit `height` at `class`, 0 elsewhere."""
  logits = np.zeros((len(spec), C + 1), np.float32)
  for q, (c, h) in enumerate(spec):
    logits[q, c] = h
  return logits


def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


# ----------------------------------------------------------------------------------------------
# Independent numpy loop reference of the whole pipeline (METHODS.md M4 step 3).


def np_pseudo_labels(
  cls_logits,
  mask_logits,
  true_masks,
  true_valid,
  old,
  match_iou=0.5,
  noise_threshold=0.5,
  max_owners=1,
  min_area_ratio=0.5,
  query_score_threshold=0.0,
  overlap_rule="drop_matched",
  min_component_area=0,
):
  q_count, h, w = mask_logits.shape
  probs = np_softmax(cls_logits.astype(np.float64))
  mp = np_sigmoid(mask_logits)
  classes, conf, selected = [], [], []
  for q in range(q_count):
    c = int(np.argmax(probs[q, :-1]))
    classes.append(c)
    conf.append(probs[q, c])
    is_object = int(np.argmax(probs[q])) != probs.shape[1] - 1
    selected.append(is_object and old[c] and probs[q, c] > query_score_threshold)
  original = [(mp[q] >= 0.5).sum() for q in range(q_count)]
  keep = list(selected)
  if overlap_rule in ("drop_matched", "drop_matched_true_wins"):
    for q in range(q_count):
      if not keep[q]:
        continue
      for t in range(true_masks.shape[0]):
        if not true_valid[t]:
          continue
        inter = union = 0
        for y in range(h):
          for x in range(w):
            a, b = mp[q, y, x] >= 0.5, bool(true_masks[t, y, x])
            inter += a and b
            union += a or b
        if union > 0 and inter / union >= match_iou:
          keep[q] = False
  masks = np.zeros((q_count, h, w), bool)
  for q in range(q_count):
    for y in range(h):
      for x in range(w):
        on = keep[q] and mp[q, y, x] >= noise_threshold
        masks[q, y, x] = on
    labels, _ = ndimage.label(masks[q])
    sizes = np.bincount(labels.ravel())
    for y in range(h):
      for x in range(w):
        on = masks[q, y, x] and (
          min_component_area <= 1 or sizes[labels[y, x]] >= min_component_area
        )
        if overlap_rule in ("remove_true_pixels", "drop_matched_true_wins"):
          on = on and not any(true_valid[t] and true_masks[t, y, x] for t in range(len(true_valid)))
        masks[q, y, x] = on
  final = masks.copy()
  for y in range(h):
    for x in range(w):
      owners = [q for q in range(q_count) if masks[q, y, x]]
      if len(owners) > max_owners:
        best = max(owners, key=lambda q: conf[q] * mp[q, y, x])  # first max on ties
        for q in owners:
          final[q, y, x] = q == best
  valid = np.zeros(q_count, bool)
  for q in range(q_count):
    n = final[q].sum()
    valid[q] = n > 0 and (original[q] == 0 or n / original[q] >= min_area_ratio)
  final &= valid[:, None, None]
  return final, np.where(valid, classes, 0), valid


# ----------------------------------------------------------------------------------------------
# The crafted 8x8 scene.
#   q0 old class 0, rows 0-3 cols 0-3 (matches true mask t0 exactly -> dropped)
#   q1 old class 1, rows 4-7 cols 0-7 (p=.88), loses cols 4-7 to the more confident q2 -> 16/32
#   q2 old class 0, rows 4-7 cols 4-7 (p=.95)
#   q3 old class 1, rows 0-3 cols 4-7 (p=.73), loses cols 4-6 to q4 -> 4/16 -> deleted
#   q4 old class 0, rows 0-3 cols 3-6 (p=.95), IoU with t0 = 4/28 -> kept
#   q5 no-object, q6 new class 2: both cover the whole image and are never selected.
# True masks: t0 = rows 0-3 cols 0-3 (valid), t1 = q1's region but padding, t2 empty padding.


def crafted_scene():
  spec = [(0, 4.0), (1, 2.0), (0, 4.0), (1, 2.0), (0, 4.0), (4, 4.0), (2, 4.0)]
  regions = [
    (block((0, 4), (0, 4)), 3.0),
    (block((4, 8), (0, 8)), 2.0),
    (block((4, 8), (4, 8)), 3.0),
    (block((0, 4), (4, 8)), 1.0),
    (block((0, 4), (3, 7)), 3.0),
    (np.ones((8, 8), bool), 3.0),
    (np.ones((8, 8), bool), 3.0),
  ]
  mask_logits = np.stack([np.where(m, v, -5.0) for m, v in regions]).astype(np.float32)
  true_masks = np.stack([block((0, 4), (0, 4)), block((4, 8), (0, 8)), np.zeros((8, 8), bool)])
  true_valid = np.array([True, False, False])
  return class_logits(spec), mask_logits, true_masks, true_valid


def run_pipeline(scene, **kwargs):
  fn = jax.jit(functools.partial(core.old_class_pseudo_labels, **kwargs))
  return [np.asarray(a) for a in fn(*[jnp.asarray(a) for a in scene], jnp.asarray(OLD))]


def test_pipeline_crafted_drop_matched():
  masks, classes, valid = run_pipeline(crafted_scene())
  np.testing.assert_array_equal(valid, [False, True, True, False, True, False, False])
  np.testing.assert_array_equal(classes, [0, 1, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(masks[1], block((4, 8), (0, 4)))
  np.testing.assert_array_equal(masks[2], block((4, 8), (4, 8)))
  # q0 was dropped, so it does not compete for column 3 (it would win the tie otherwise).
  np.testing.assert_array_equal(masks[4], block((0, 4), (3, 7)))
  assert not masks[[0, 3, 5, 6]].any()


def test_pipeline_crafted_remove_true_pixels():
  masks, classes, valid = run_pipeline(crafted_scene(), overlap_rule="remove_true_pixels")
  # q0 loses all its pixels to t0 -> empty; q4 loses column 3 -> 12/16 >= 0.5.
  np.testing.assert_array_equal(valid, [False, True, True, False, True, False, False])
  np.testing.assert_array_equal(masks[4], block((0, 4), (4, 7)))
  np.testing.assert_array_equal(masks[1], block((4, 8), (0, 4)))
  np.testing.assert_array_equal(classes, [0, 1, 0, 0, 0, 0, 0])


def test_pipeline_crafted_drop_matched_true_wins():
  scene = list(crafted_scene())
  t1 = block((6, 8), (6, 8))  # a small true mask inside q1 and q2 (IoU 4/32 and 4/16)
  scene[2] = np.stack([scene[2][0], t1, scene[2][2]])
  scene[3] = np.array([True, True, False])
  masks, classes, valid = run_pipeline(scene, overlap_rule="drop_matched_true_wins")
  # q0 matches t0 and is dropped; the others keep all but the true pixels: q2 loses t1
  # (12/16), q4 loses column 3 of t0 (12/16); q1 still loses columns 4-7 to q2 (16/32).
  np.testing.assert_array_equal(valid, [False, True, True, False, True, False, False])
  np.testing.assert_array_equal(masks[2], block((4, 8), (4, 8)) & ~t1)
  np.testing.assert_array_equal(masks[4], block((0, 4), (4, 7)))
  np.testing.assert_array_equal(masks[1], block((4, 8), (0, 4)))
  np.testing.assert_array_equal(classes, [0, 1, 0, 0, 0, 0, 0])
  # The patent's rule alone leaves q2 on t1's pixels and q4 on t0's column 3.
  literal, _, literal_valid = run_pipeline(scene, overlap_rule="drop_matched")
  np.testing.assert_array_equal(literal_valid, valid)
  np.testing.assert_array_equal(literal[2], block((4, 8), (4, 8)))
  np.testing.assert_array_equal(literal[4], block((0, 4), (3, 7)))


def test_pipeline_crafted_noise_threshold_and_max_owners():
  _, _, valid = run_pipeline(crafted_scene(), noise_threshold=0.9)
  # q1 (p=.88) and q3 (p=.73) are entirely noise at 0.9.
  np.testing.assert_array_equal(valid, [False, False, True, False, True, False, False])
  masks, _, valid = run_pipeline(crafted_scene(), max_owners=2)
  # With two owners allowed nobody loses pixels: q1 and q3 keep their full masks.
  np.testing.assert_array_equal(valid, [False, True, True, True, True, False, False])
  np.testing.assert_array_equal(masks[1], block((4, 8), (0, 8)))
  np.testing.assert_array_equal(masks[3], block((0, 4), (4, 8)))


@pytest.mark.parametrize(
  "kwargs",
  [
    {},
    {"noise_threshold": 0.6, "max_owners": 2, "min_area_ratio": 0.3},
    {"overlap_rule": "remove_true_pixels", "noise_threshold": 0.6},
    {"overlap_rule": "drop_matched_true_wins", "match_iou": 0.2},
    {"match_iou": 0.2, "query_score_threshold": 0.3, "min_area_ratio": 0.8},
    {"noise_threshold": 0.7, "min_component_area": 2, "min_area_ratio": 0.2},
    {
      "overlap_rule": "remove_true_pixels",
      "noise_threshold": 0.6,
      "min_component_area": 3,
      "min_area_ratio": 0.2,
    },  # fmt: skip
  ],
)
def test_pipeline_random_against_numpy_loop(kwargs):
  rs = np.random.RandomState(3)
  q, t = 8, 3
  cls = rs.normal(0, 2, (q, C + 1)).astype(np.float32)
  cls[: q // 2, rs.randint(0, 2)] += 4.0  # half the queries lean to an old class
  # Each query: a random rectangle plus speckle. Discrete logits keep every probability away
  # from the 0.5 / 0.6 thresholds.
  mask_logits = np.full((q, 8, 8), -3.0, np.float32)
  for i in range(q):
    (y0, y1), (x0, x1) = np.sort(rs.randint(0, 8, (2, 2)), axis=1)
    mask_logits[i, y0 : y1 + 1, x0 : x1 + 1] = rs.choice([0.3, 1.0, 2.0, 3.0], (y1 - y0 + 1, 1))
  speckle = rs.rand(q, 8, 8) < 0.1
  mask_logits[speckle] = rs.choice([-1.0, 0.3, 1.0], speckle.sum())
  true_masks = rs.rand(t, 8, 8) < 0.2
  true_masks[0] = mask_logits[0] > 0  # a guaranteed match for query 0
  true_valid = np.array([True, True, False])
  got = run_pipeline((cls, mask_logits, true_masks, true_valid), **kwargs)
  want = np_pseudo_labels(cls, mask_logits, true_masks, true_valid, OLD, **kwargs)
  for g, w in zip(got, want, strict=True):
    np.testing.assert_array_equal(g, w)
  assert want[2].any()  # the case is not trivially empty


def test_pipeline_vmap_jit_compiles_once():
  scene = crafted_scene()
  batch = [jnp.asarray(np.stack([a, a])) for a in scene]

  @jax.jit
  @chex.assert_max_traces(n=1)
  def batched(cls, masks, true_masks, true_valid):
    fn = functools.partial(core.old_class_pseudo_labels, old_class_mask=jnp.asarray(OLD))
    return jax.vmap(fn)(cls, masks, true_masks, true_valid)

  batched(*batch)
  masks, classes, valid = batched(*batch)
  chex.assert_shape(masks, (2, 7, 8, 8))
  np.testing.assert_array_equal(valid[1], [False, True, True, False, True, False, False])


# ----------------------------------------------------------------------------------------------
# Sub-steps.


def test_select_old_class_queries():
  logits = np.array(
    [
      [3.0, 0, 0, 0, 0],  # old class 0, object
      [0, 0, 3.0, 0, 0],  # new class 2
      [1.0, 0, 0, 0, 2.0],  # argmax no-object
      [0, 2.0, 0, 0, 2.0],  # tie with no-object: counts as object, class 1
      [0, 1.0, 0, 0, 0],  # old class 1, low confidence (~0.4)
    ],
    np.float32,
  )
  classes, conf, selected = core.select_old_class_queries(jnp.asarray(logits), jnp.asarray(OLD))
  probs = np_softmax(logits.astype(np.float64))
  np.testing.assert_array_equal(classes, [0, 2, 0, 1, 1])
  np.testing.assert_allclose(conf, probs[np.arange(5), [0, 2, 0, 1, 1]], rtol=1e-6)
  np.testing.assert_array_equal(selected, [True, False, False, True, True])
  _, _, selected = core.select_old_class_queries(jnp.asarray(logits), jnp.asarray(OLD), 0.5)
  np.testing.assert_array_equal(selected, [True, False, False, False, False])


def test_mask_iou_against_loop():
  rs = np.random.RandomState(0)
  a = rs.rand(4, 5, 6) < 0.4
  b = rs.rand(3, 5, 6) < 0.4
  b[2] = False
  a[3] = False
  want = np.zeros((4, 3))
  for i in range(4):
    for j in range(3):
      union = np.logical_or(a[i], b[j]).sum()
      want[i, j] = np.logical_and(a[i], b[j]).sum() / union if union else 0.0
  np.testing.assert_allclose(core.mask_iou(jnp.asarray(a), jnp.asarray(b)), want, rtol=1e-6)


def test_drop_matched_masks():
  true = np.stack([block((0, 4), (0, 4)), block((4, 8), (4, 8)), block((0, 8), (0, 8))])
  true_valid = np.array([True, True, False])
  masks = np.stack(
    [
      block((0, 4), (0, 2)),  # IoU 8/16 = 0.5 with t0 -> dropped (>=)
      block((0, 4), (2, 6)),  # IoU 8/24 with t0 -> kept
      block((4, 8), (4, 8)),  # identical to t1 but not selected -> stays False
      block((0, 8), (0, 8)),  # only matches the padding t2 -> kept
    ]
  )
  selected = np.array([True, True, False, True])
  keep = core.drop_matched_masks(*map(jnp.asarray, (masks, selected, true, true_valid)))
  np.testing.assert_array_equal(keep, [False, True, False, True])
  keep = core.drop_matched_masks(*map(jnp.asarray, (masks, selected, true, true_valid)), 0.3)
  np.testing.assert_array_equal(keep, [False, False, False, True])


def test_remove_noisy_pixels():
  probs = np.array([[[0.2, 0.5], [0.49, 0.9]], [[0.9, 0.9], [0.9, 0.9]]], np.float32)
  out = core.remove_noisy_pixels(jnp.asarray(probs), jnp.array([True, False]))
  np.testing.assert_array_equal(out, [[[False, True], [False, True]], np.zeros((2, 2), bool)])
  out = core.remove_noisy_pixels(jnp.asarray(probs), jnp.array([True, True]), 0.8)
  np.testing.assert_array_equal(out, [[[False, False], [False, True]], np.ones((2, 2), bool)])


def test_remove_true_pixels():
  masks = np.stack([block((0, 8), (0, 8)), block((0, 2), (0, 2))])
  true = np.stack([block((0, 4), (0, 4)), block((4, 8), (4, 8))])
  out = core.remove_true_pixels(jnp.asarray(masks), jnp.asarray(true), jnp.array([True, False]))
  np.testing.assert_array_equal(out[0], ~block((0, 4), (0, 4)))
  assert not np.asarray(out[1]).any()


def test_resolve_overlaps_crafted():
  masks = np.stack([block((0, 8), (0, 4)), block((0, 8), (2, 6)), block((0, 8), (3, 8))])
  conf = np.stack([np.full((8, 8), 0.5), np.full((8, 8), 0.9), np.full((8, 8), 0.2)])
  out = np.asarray(core.resolve_overlaps(jnp.asarray(masks), jnp.asarray(conf)))
  np.testing.assert_array_equal(out[0], block((0, 8), (0, 2)))
  np.testing.assert_array_equal(out[1], block((0, 8), (2, 6)))
  np.testing.assert_array_equal(out[2], block((0, 8), (6, 8)))
  # max_owners=2: only column 3 (three owners) is resolved, to mask 1.
  out = np.asarray(core.resolve_overlaps(jnp.asarray(masks), jnp.asarray(conf), 2))
  np.testing.assert_array_equal(out[0], block((0, 8), (0, 3)))
  np.testing.assert_array_equal(out[1], block((0, 8), (2, 6)))
  np.testing.assert_array_equal(out[2], block((0, 8), (4, 8)))


@pytest.mark.parametrize("max_owners", [1, 2, 3])
def test_resolve_overlaps_against_loop(max_owners):
  rs = np.random.RandomState(max_owners)
  masks = rs.rand(5, 6, 7) < 0.6
  conf = rs.rand(5, 6, 7).astype(np.float32)
  want = masks.copy()
  for y in range(6):
    for x in range(7):
      owners = [q for q in range(5) if masks[q, y, x]]
      if len(owners) > max_owners:
        best = max(owners, key=lambda q: conf[q, y, x])
        for q in owners:
          want[q, y, x] = q == best
  got = core.resolve_overlaps(jnp.asarray(masks), jnp.asarray(conf), max_owners)
  np.testing.assert_array_equal(got, want)


def test_filter_by_area():
  final = np.stack(
    [block((0, 2), (0, 4)), block((0, 2), (0, 3)), np.zeros((8, 8), bool), block((0, 1), (0, 1))]
  )
  original = np.array([16, 16, 10, 0])
  got = core.filter_by_area(jnp.asarray(final), jnp.asarray(original))
  # 8/16 = 0.5 kept (not below), 6/16 deleted, empty deleted, original 0 but non-empty kept.
  np.testing.assert_array_equal(got, [True, False, False, True])
  got = core.filter_by_area(jnp.asarray(final), jnp.asarray(original), 0.3)
  np.testing.assert_array_equal(got, [True, True, False, True])


# ----------------------------------------------------------------------------------------------
# merge_targets.


def test_merge_targets_truncates_lowest_scored_pseudo_labels():
  masks = np.stack([block((i, i + 1), (0, 8)) for i in range(7)])
  true_classes = np.array([2, 3, 3])
  true_valid = np.array([True, False, True])
  pseudo_classes = np.array([0, 1, 0, 1])
  pseudo_valid = np.array([True, True, False, True])
  scores = np.array([0.2, 0.9, 0.95, 0.5], np.float32)
  classes, out_masks, valid, dropped = core.merge_targets(
    *map(jnp.asarray, (true_classes, masks[:3], true_valid)),
    *map(jnp.asarray, (pseudo_classes, masks[3:], pseudo_valid)),
    max_targets=4,
    pseudo_scores=jnp.asarray(scores),
  )
  # Order: t0, t2, then pseudo by score: p1 (0.9), p3 (0.5); p0 (0.2) dropped; p2 invalid.
  np.testing.assert_array_equal(classes, [2, 3, 1, 1])
  np.testing.assert_array_equal(valid, [True] * 4)
  np.testing.assert_array_equal(out_masks, masks[[0, 2, 4, 6]])
  assert int(dropped) == 1


def test_merge_targets_pads_without_scores():
  masks = np.stack([block((i, i + 1), (0, 8)) for i in range(4)])
  classes, out_masks, valid, dropped = core.merge_targets(
    jnp.array([2, 3]),
    jnp.asarray(masks[:2]),
    jnp.array([False, True]),
    jnp.array([1, 0]),
    jnp.asarray(masks[2:]),
    jnp.array([True, True]),
    max_targets=6,
  )
  np.testing.assert_array_equal(classes, [3, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(valid, [True, True, True, False, False, False])
  np.testing.assert_array_equal(out_masks[:3], masks[[1, 2, 3]])
  assert not np.asarray(out_masks[3:]).any()
  assert int(dropped) == 0


def test_merge_targets_rejects_too_small_max_targets():
  z = jnp.zeros((3, 4, 4), bool)
  with pytest.raises(ValueError, match="max_targets=2"):
    core.merge_targets(jnp.zeros(3, int), z, jnp.ones(3, bool), jnp.zeros(3, int), z,
                       jnp.ones(3, bool), max_targets=2)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Distillation loss (METHODS.md M4 step 5): every class of the historical prediction, no-object
# included. References: tests/references.py (written from the patent's sentence and from
# CoMFormer's formula, not from core.py).

FORMS = {"fold_new_into_no_object": True, "log_softmax_all": False}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("weighting", ["one_minus_no_object", "none", "squared"])
@pytest.mark.parametrize("temperature,reduction", [(1.0, "mean"), (2.0, "weighted_mean")])
def test_distillation_loss_against_patent_reference(form, weighting, temperature, reduction):
  rs = np.random.RandomState(1)
  cur = rs.normal(0, 2, (5, C + 1)).astype(np.float32)
  hist = rs.normal(0, 2, (5, C + 1)).astype(np.float32)
  old = np.array([True, False, True, False])
  got = core.distillation_loss(
    jnp.asarray(cur), jnp.asarray(hist), jnp.asarray(old), weighting=weighting,
    temperature=temperature, reduction=reduction, form=form,
  )  # fmt: skip
  want = references.incremental_distillation(
    cur, hist, old, fold=FORMS[form], weighting=weighting, reduction=reduction,
    temperature=temperature,
  )  # fmt: skip
  assert want > 1e-3
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_comformer_distillation_against_its_formula():
  """A batch [B, Q, C + 1], old classes first: CoMFormer normalises over the whole batch."""
  rs = np.random.RandomState(4)
  student = rs.normal(0, 2, (3, 6, C + 1)).astype(np.float32)
  hist = rs.normal(0, 2, (3, 6, C + 1)).astype(np.float32)
  teacher = np.concatenate([hist[..., :2], hist[..., -1:]], -1)  # its old classes + no-object
  got = core.distillation_loss(
    jnp.asarray(student), jnp.asarray(hist), jnp.asarray(OLD), weighting="squared",
    reduction="weighted_mean", form="log_softmax_all",
  )  # fmt: skip
  np.testing.assert_allclose(got, references.comformer_distillation(student, teacher, 2), rtol=1e-5)


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("drift_to", [2, C])  # a new class, no-object
def test_drift_from_an_old_class_is_penalised_and_pulled_back(form, drift_to):
  """The issue's case: historical [4, 1, 0, 0, 0]; the current query +20 on no-object or on a
  new class. p(class 0) falls from ~0.9 to ~1e-8: the loss is large and the gradient lowers
  the drifted logit and raises class 0."""
  hist = jnp.array([[4.0, 1.0, 0.0, 0.0, 0.0]])
  cur = hist.at[0, drift_to].add(20.0)
  loss_fn = functools.partial(core.distillation_loss, old_class_mask=jnp.asarray(OLD), form=form)
  loss, grad = jax.value_and_grad(loss_fn)(cur, hist)
  assert float(loss) > 5.0
  assert float(grad[0, drift_to]) > 0.0 and float(grad[0, 0]) < 0.0
  # A gradient step moves back towards the historical prediction.
  assert float(loss_fn(cur - 0.5 * grad, hist)) < float(loss)
  # Without drift (and a historical model that gives its new classes no mass) nothing to do.
  quiet = jnp.array([[4.0, 1.0, -30.0, -30.0, 0.0]])
  np.testing.assert_allclose(loss_fn(quiet, quiet), 0.0, atol=1e-6)


def test_distillation_gives_no_gradient_to_the_historical_model():
  rs = np.random.RandomState(2)
  cur = jnp.asarray(rs.normal(size=(4, C + 1)).astype(np.float32))
  hist = jnp.asarray(rs.normal(size=(4, C + 1)).astype(np.float32))
  grad_cur, grad_hist = jax.grad(core.distillation_loss, argnums=(0, 1))(cur, hist, OLD)
  chex.assert_tree_all_finite(grad_cur)
  # Every current logit (old, new and no-object) takes part; the teacher gets nothing.
  assert (np.abs(np.asarray(grad_cur)) > 0).all()
  np.testing.assert_array_equal(grad_hist, 0.0)


def test_distillation_weights_decrease_with_no_object():
  hist = np.zeros((3, C + 1), np.float32)
  hist[:, -1] = [-2.0, 0.0, 3.0]
  for weighting in ("one_minus_no_object", "squared"):
    w = np.asarray(core.distillation_weights(jnp.asarray(hist), weighting, OLD))
    assert w[0] > w[1] > w[2] > 0


def test_distillation_traced_class_split_compiles_once():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def loss(cur, hist, old):
    return core.distillation_loss(cur, hist, old)

  z = jnp.ones((2, C + 1))
  a = loss(z, z.at[:, 0].set(3.0), jnp.asarray(OLD))
  b = loss(z, z.at[:, 0].set(3.0), jnp.asarray(~OLD))
  assert float(a) != float(b)


# ----------------------------------------------------------------------------------------------
# Noise removal that does something at the experiment's default.


def test_component_sizes_against_scipy_label():
  rs = np.random.RandomState(5)
  masks = rs.rand(4, 9, 11) < 0.45
  got = np.asarray(jax.jit(core.component_sizes)(jnp.asarray(masks)))
  for q in range(4):
    labels, _ = ndimage.label(masks[q])  # 4-connectivity
    sizes = np.bincount(labels.ravel())
    np.testing.assert_array_equal(got[q], np.where(masks[q], sizes[labels], 0))


def test_remove_noisy_pixels_threshold_and_components():
  probs = np.full((1, 6, 6), 0.1, np.float32)
  probs[0, :3, :3] = 0.95  # a 9-pixel blob
  probs[0, 2, :3] = 0.6  # its uncertain rim
  probs[0, 5, 5] = 0.95  # a one-pixel speck
  keep = jnp.array([True])
  off = np.asarray(core.remove_noisy_pixels(jnp.asarray(probs), keep))
  assert off.sum() == 10  # threshold 0.5, no area rule: binarisation
  on = np.asarray(core.remove_noisy_pixels(jnp.asarray(probs), keep, 0.7, 2))
  np.testing.assert_array_equal(on[0], block((0, 2), (0, 3), (6, 6)))


def test_default_noise_removal_changes_pseudo_labels():
  """The experiment's defaults (0.7, 2) change the crafted scene's pseudo labels; 0.5, 0 do not
  differ from binarisation."""
  from configs import incremental_panoptic_street

  method = incremental_panoptic_street.get_config("demo").method
  scene = list(crafted_scene())
  scene[1] = scene[1].copy()
  scene[1][2, 4:8, 4:8] = 0.5  # q2: a rim with p ~ 0.62
  scene[1][4, 0, 3] = 0.5
  scene[1][2, 0, 0] = 3.0  # q2: a speck far from it
  kwargs = {
    "noise_threshold": method.noise_threshold,
    "min_component_area": method.min_component_area,
  }
  default, _, default_valid = run_pipeline(scene, **kwargs)
  binarised, _, valid = run_pipeline(scene)
  assert (default != binarised).any()
  assert not default[2, 0, 0] and binarised[2, 0, 0]


# ----------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize(
  "steps,match",
  [
    ([[0, 1], [1, 2, 3]], r"class 1 is also in class_steps\[0\]"),
    ([[0, 1], [2]], r"classes \[3\] are in no step"),
    ([[0, 1], [2, 3, 7]], r"classes \[7\] are unknown"),
    ([[0, 1], [], [2, 3]], r"class_steps\[1\]=\[\] is not allowed: every step needs a new class"),
    ([[0, 1, 2, 3]], "at least one incremental step"),
  ],
)
def test_check_class_steps_rejects(steps, match):
  with pytest.raises(ValueError, match=match):
    core.check_class_steps(steps, 4)


def test_check_class_steps_accepts_a_partition():
  core.check_class_steps([[2, 0], [1], [3]], 4)


def test_check_class_split():
  np.testing.assert_array_equal(core.check_class_split([0, 1], [2, 3], 4), OLD)
  with pytest.raises(ValueError, match=r"classes \[1\] are also in old_classes"):
    core.check_class_split([0, 1], [1, 2], 4)
  with pytest.raises(ValueError, match="new_classes=\\[4\\]"):
    core.check_class_split([0], [4], 4)
  with pytest.raises(ValueError, match="old_classes=\\[0, 0\\].*unique"):
    core.check_class_split([0, 0], [2], 4)
  with pytest.raises(ValueError, match="new_classes=\\[\\].*empty"):
    core.check_class_split([0], [], 4)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    ({"match_iou": 1.5}, "match_iou=1.5"),
    ({"max_owners": 0}, "max_owners=0"),
    ({"min_area_ratio": -0.1}, "min_area_ratio=-0.1"),
    ({"overlap_rule": "merge"}, "overlap_rule='merge'"),
    ({"min_component_area": -1}, "min_component_area=-1"),
  ],
)
def test_pseudo_labels_rejects_bad_config(kwargs, match):
  scene = [jnp.asarray(a) for a in crafted_scene()]
  with pytest.raises(ValueError, match=match):
    core.old_class_pseudo_labels(*scene, jnp.asarray(OLD), **kwargs)


def test_pseudo_labels_rejects_bad_shapes():
  cls, masks, true_masks, true_valid = [jnp.asarray(a) for a in crafted_scene()]
  with pytest.raises(ValueError, match="true_masks.shape=\\(3, 4, 4\\)"):
    core.old_class_pseudo_labels(cls, masks, true_masks[:, :4, :4], true_valid, jnp.asarray(OLD))
  with pytest.raises(ValueError, match="old_class_mask.shape=\\(3,\\)"):
    core.old_class_pseudo_labels(cls, masks, true_masks, true_valid, jnp.asarray(OLD[:3]))


@pytest.mark.parametrize(
  "kwargs,match",
  [
    ({"weighting": "linear"}, "weighting='linear'"),
    ({"temperature": 0.0}, "temperature=0.0"),
    ({"reduction": "sum"}, "reduction='sum'"),
  ],
)
def test_distillation_rejects_bad_config(kwargs, match):
  z = jnp.zeros((2, C + 1))
  with pytest.raises(ValueError, match=match):
    core.distillation_loss(z, z, jnp.asarray(OLD), **kwargs)
