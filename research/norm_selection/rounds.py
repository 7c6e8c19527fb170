"""Host-side bookkeeping of method M2's hard-example loop (METHODS.md M2 steps 3-7).

Seed 001: after training on the first training set, "test the remaining samples of each
classified sample set with the trained model and remove the correctly classified ones; judge
whether the number of remaining samples meets a preset condition; if not, draw m samples from
each classified sample set by norm value, add them to the first training set, train again, and
go back to testing".

Everything here is pure host-side numpy except ``run_selection_loop`` and ``run_budget_loop``,
which call the caller's training, prediction and selection callables. With deterministic
callables a loop is a pure function of its start state, so a driver resumes a killed run by
running the loop again and letting ``train_fn`` restore the rounds already trained (the M2
experiment does this with one ``fit`` phase per round).

Label budget: the budget counts training-set samples (labels used for training). Step 5's
correctness test reads the labels of the pool, as the patent does (its sample set is labelled);
those reads are counted apart (``label_reads``: every read, repeats included; ``labels_seen``:
distinct samples whose label was used or read), since the equal-budget baselines never read a
pool label.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from research.norm_selection import core

DRAW_RULES = ("norm", "random")
MEAN_OVER = ("original", "pool")

STOP_REASONS = (
  "pool_empty",
  "label_budget",
  "max_rounds",
  "max_remaining_per_class",
  "max_remaining_fraction",
  "selection_empty",
)
ROUND_RECORD_KEYS = (
  "round",
  "num_labels",
  "num_new",
  "num_tested",
  "num_correct",
  "num_remaining",
  "label_reads",
  "labels_seen",
)


@dataclasses.dataclass(frozen=True, eq=False)
class SelectionState:
  """State of the selection loop between rounds (host-side numpy, compared field by field).

  Attributes:
    labels: ``[N]`` int64 true class labels (Step 5's correctness test).
    groups: ``[N]`` int64 group ids used for per-class selection and stop conditions (the
      labels, or k-means clusters for an unlabelled pool; METHODS.md M2 step 1).
    num_groups: number of groups ``G``.
    train_indices: ``[T]`` int64 training-set indices in the order they were added, distinct.
    remaining: ``[N]`` bool, True for samples still in the pool (neither drawn nor removed).
    removed: ``[N]`` bool, True for pool samples removed as correctly classified (Step 5).
    read: ``[N]`` bool, True for samples whose label Step 5 has read (tested in the pool).
    label_reads: pool labels read by Step 5 so far, one per sample and round (repeats count).
    round: number of completed rounds (draw + train + test).
    history: one record per completed round: ``ROUND_RECORD_KEYS`` ints plus the caller's
      evaluation metrics (floats).
    stop_reason: None while running, else one of ``STOP_REASONS``.
  """

  labels: np.ndarray
  groups: np.ndarray
  num_groups: int
  train_indices: np.ndarray
  remaining: np.ndarray
  removed: np.ndarray
  read: np.ndarray
  label_reads: int = 0
  round: int = 0
  history: tuple[dict[str, Any], ...] = ()
  stop_reason: str | None = None


def initial_state(labels, *, groups=None, num_groups=None, pool_mask=None) -> SelectionState:
  """The state before the first draw: empty training set, the whole pool remaining.

  Args:
    labels: ``[N]`` non-negative integer class labels.
    groups: ``[N]`` group ids for balanced selection (default: ``labels``); e.g. k-means
      clusters from ``core.group_ids``.
    num_groups: explicit number of groups (each id in ``[0, num_groups)`` must occur);
      default ``max(groups) + 1``.
    pool_mask: ``[N]`` bool, the samples that form the pool (default: all).

  Returns:
    The initial ``SelectionState``.

  Raises:
    ValueError: bad labels, groups, ``num_groups`` or ``pool_mask``.
  """
  labels, _ = core.validate_class_ids(labels, None)
  groups = labels if groups is None else np.asarray(groups)
  if groups.shape != labels.shape:
    raise ValueError(
      f"groups with shape {groups.shape} is not allowed: groups must match labels {labels.shape}"
    )
  groups, num_groups = core.validate_class_ids(groups, num_groups, name="groups")
  pool = np.ones(labels.shape, bool) if pool_mask is None else np.asarray(pool_mask)
  core.validate_candidate_mask(pool, labels.size)
  return SelectionState(
    labels=labels,
    groups=groups,
    num_groups=num_groups,
    train_indices=np.zeros((0,), np.int64),
    remaining=pool.copy(),
    removed=np.zeros(labels.shape, bool),
    read=np.zeros(labels.shape, bool),
  )


def group_pool(
  labels, images, grouping: str, num_clusters=None, rng=None, num_classes=None
) -> tuple[np.ndarray, int]:
  """Group ids of the pool (METHODS.md M2 step 1): labels, or k-means of pixel vectors.

  Args:
    labels: ``[N]`` class labels.
    images: ``[N, H, W, C]`` uint8 images (their pixel vectors are clustered).
    grouping: ``'labels'`` or ``'kmeans'`` (``core.kmeans``, ott-jax).
    num_clusters: k of the k-means grouping.
    rng: PRNG key of the k-means grouping.
    num_classes: the number of classes of the labels grouping (default ``max(labels) + 1``).

  Returns:
    ``([N] int64 group ids, G)``; empty k-means clusters are dropped and the rest renumbered
    densely to ``[0, G)``.
  """
  if grouping == "labels":
    return core.validate_class_ids(labels, num_classes)
  pixels = np.asarray(images).reshape(len(labels), -1).astype(np.float32) / 255.0
  ids = core.group_ids(None, embeddings=pixels, num_clusters=num_clusters, rng=rng)
  _, dense = np.unique(ids, return_inverse=True)
  return dense.astype(np.int64), int(dense.max()) + 1


def pool_indices(state: SelectionState) -> np.ndarray:
  """``[P]`` int64 indices of the remaining pool, ascending (the order ``predict_fn`` sees)."""
  return np.flatnonzero(state.remaining).astype(np.int64)


def original_pool(state: SelectionState) -> np.ndarray:
  """``[N]`` bool, the pool the loop started from (training set + removed + remaining)."""
  original = state.remaining | state.removed
  original[state.train_indices] = True
  return original


def add_samples(state: SelectionState, new_indices) -> SelectionState:
  """Adds drawn samples to the training set and takes them out of the pool.

  METHODS.md M2 step 3 (first training set) and step 7 (add m more per class).

  Args:
    state: current state.
    new_indices: ``[S]`` distinct indices, all in the remaining pool.

  Returns:
    The state with ``new_indices`` appended to ``train_indices`` (in the given order).

  Raises:
    ValueError: duplicates, or indices out of range, already trained on or removed.
  """
  new = np.asarray(new_indices)
  if new.ndim != 1 or (new.size and not np.issubdtype(new.dtype, np.integer)):
    raise ValueError(
      f"new_indices with shape {new.shape} and dtype {new.dtype} is not allowed: "
      "new_indices must be a 1-D integer array"
    )
  new = new.astype(np.int64)
  num = state.remaining.size
  if new.size and (new.min() < 0 or new.max() >= num):
    raise ValueError(f"new_indices={new.tolist()} is not allowed: indices must be in [0, {num})")
  unique, counts = np.unique(new, return_counts=True)
  if np.any(counts > 1):
    raise ValueError(
      f"new_indices with duplicates {unique[counts > 1].tolist()} is not allowed: a sample "
      "can be drawn only once"
    )
  outside = new[~state.remaining[new]]
  if outside.size:
    raise ValueError(
      f"new_indices {outside.tolist()} is not allowed: they are not in the remaining pool "
      "(already in the training set, removed as correctly classified, or never in the pool)"
    )
  remaining = state.remaining.copy()
  remaining[new] = False
  return dataclasses.replace(
    state, train_indices=np.concatenate([state.train_indices, new]), remaining=remaining
  )


def remove_correct(state: SelectionState, predictions_on_pool) -> SelectionState:
  """Removes the correctly classified samples from the pool.

  METHODS.md M2 step 5 (seed 001: "test the remaining samples ... to remove the samples whose
  class is judged correctly").

  Args:
    state: current state.
    predictions_on_pool: ``[P]`` predicted class ids, or ``[P, K]`` logits/probabilities
      (argmax), for ``pool_indices(state)`` in that order.

  Returns:
    The state with correct pool samples moved from ``remaining`` to ``removed``, every pool
    sample marked ``read`` and ``label_reads`` grown by the pool size.

  Raises:
    ValueError: predictions not aligned with the pool.
  """
  pool = pool_indices(state)
  preds = np.asarray(predictions_on_pool)
  if preds.ndim == 2:
    preds = np.argmax(preds, axis=1)
  if preds.shape != pool.shape:
    raise ValueError(
      f"predictions_on_pool with shape {np.shape(predictions_on_pool)} is not allowed: it must "
      f"be [P] class ids or [P, K] scores for the P={pool.size} remaining pool samples"
    )
  correct = pool[preds == state.labels[pool]]
  remaining, removed, read = state.remaining.copy(), state.removed.copy(), state.read.copy()
  remaining[correct] = False
  removed[correct] = True
  read[pool] = True  # step 5 reads the label of every sample it tests
  return dataclasses.replace(
    state,
    remaining=remaining,
    removed=removed,
    read=read,
    label_reads=state.label_reads + int(pool.size),
  )


def _optional_count(name: str, value, minimum: int) -> None:
  if value is None:
    return
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    raise ValueError(f"{name}={value!r} is not allowed: {name} must be None or an int >= {minimum}")


def validate_stop_kwargs(
  *, max_remaining_per_class=None, max_remaining_fraction=None, label_budget=None, max_rounds=None
) -> None:
  """Checks the stop-condition settings of ``stop_reason`` (see there)."""
  _optional_count("max_remaining_per_class", max_remaining_per_class, 0)
  _optional_count("label_budget", label_budget, 1)
  _optional_count("max_rounds", max_rounds, 1)
  if max_remaining_fraction is not None and (
    isinstance(max_remaining_fraction, bool)
    or not isinstance(max_remaining_fraction, numbers.Real)
    or not 0.0 <= max_remaining_fraction <= 1.0
  ):
    raise ValueError(
      f"max_remaining_fraction={max_remaining_fraction!r} is not allowed: "
      "max_remaining_fraction must be None or a number in [0, 1]"
    )


def stop_reason(
  state: SelectionState,
  *,
  max_remaining_per_class=None,
  max_remaining_fraction=None,
  label_budget=None,
  max_rounds=None,
) -> str | None:
  """The preset stop condition that holds for ``state``, or None to go on.

  METHODS.md M2 step 6 (seed 001: "judge whether the number of remaining samples in each
  classified sample set meets a preset condition"). Conditions, checked in this order (the
  first that holds is returned); None disables a condition:

  * ``'pool_empty'``: no sample left in the pool (always on);
  * ``'label_budget'``: the training set holds ``>= label_budget`` samples;
  * ``'max_rounds'``: ``state.round >= max_rounds``;
  * ``'max_remaining_per_class'``: every group has ``<= max_remaining_per_class`` samples left
    in the pool (the patent's per-class condition, ``tau``);
  * ``'max_remaining_fraction'``: every group has ``<= max_remaining_fraction`` times its
    original pool size left (original pool = remaining + removed + training set).

  Args:
    state: current state.
    max_remaining_per_class: ``tau``, int >= 0.
    max_remaining_fraction: fraction in [0, 1].
    label_budget: int >= 1.
    max_rounds: int >= 1.

  Returns:
    One of ``STOP_REASONS`` or None.

  Raises:
    ValueError: a setting out of range.
  """
  validate_stop_kwargs(
    max_remaining_per_class=max_remaining_per_class,
    max_remaining_fraction=max_remaining_fraction,
    label_budget=label_budget,
    max_rounds=max_rounds,
  )
  left = np.bincount(state.groups[state.remaining], minlength=state.num_groups)
  if left.sum() == 0:
    return "pool_empty"
  if label_budget is not None and state.train_indices.size >= label_budget:
    return "label_budget"
  if max_rounds is not None and state.round >= max_rounds:
    return "max_rounds"
  if max_remaining_per_class is not None and np.all(left <= max_remaining_per_class):
    return "max_remaining_per_class"
  if max_remaining_fraction is not None:
    original_left = np.bincount(state.groups[original_pool(state)], minlength=state.num_groups)
    if np.all(left <= max_remaining_fraction * original_left):
      return "max_remaining_fraction"
  return None


def truncate_per_class(indices, groups, max_count: int) -> np.ndarray:
  """Cuts a draw to ``max_count`` samples, fairly across groups.

  Picks are taken in rounds: the first pick of every group (ascending group id), then the
  second pick of every group, and so on, until ``max_count`` is reached. Each group keeps a
  prefix of its own picks (for ``core.select_per_class`` with the default ``a`` this prefix is
  exactly the rule's choice at the smaller per-class count), and the groups' kept counts differ
  by at most one unless a group had fewer picks. The kept indices keep their original order.

  Args:
    indices: ``[S]`` drawn indices, each group's picks in priority order.
    groups: ``[N]`` group ids.
    max_count: the most samples to keep (<= 0 keeps none).

  Returns:
    ``[min(S, max(max_count, 0))]`` int64 indices.
  """
  indices = np.asarray(indices, np.int64)
  if max_count >= indices.size:
    return indices
  group = np.asarray(groups)[indices]
  by_group = np.argsort(group, kind="stable")
  rank = np.empty(indices.size, np.int64)
  rank[by_group] = core.rank_within_blocks(group[by_group])
  keep = np.zeros(indices.size, bool)
  keep[np.lexsort((group, rank))[: max(max_count, 0)]] = True
  return indices[keep]


def _check_choice(name: str, value, allowed) -> None:
  if value not in allowed:
    raise ValueError(f"{name}={value!r} is not allowed: {name} must be one of {allowed}")


def norm_select_fn(
  norms, m: int, a=None, mean_over: str = "original"
) -> Callable[[SelectionState, Any], np.ndarray]:
  """The method's ``select_fn`` for ``run_selection_loop``: ``core.select_per_class`` on the pool.

  METHODS.md M2 steps 3 and 7: up to ``m`` samples per group from its remaining pool, nearest
  the group's mean norm.

  Args:
    norms: ``[N]`` norm values (``core.norm_values``).
    m: samples per group and round.
    a: samples from the upper side (default ``ceil(m / 2)``).
    mean_over: ``'original'`` (default): each group's mean norm over its original pool (the
      patent's "mean norm value of the classified sample set", fixed over the rounds);
      ``'pool'``: over its current remaining pool (recomputed every round).

  Returns:
    ``select_fn(state, params) -> indices`` (``params`` unused).

  Raises:
    ValueError: unknown ``mean_over``.
  """
  _check_choice("mean_over", mean_over, MEAN_OVER)
  norms = np.asarray(norms)

  def select_fn(state: SelectionState, params) -> np.ndarray:
    del params  # The norm rule does not depend on the model.
    mean_mask = original_pool(state) if mean_over == "original" else state.remaining
    return core.select_per_class(
      norms, state.groups, state.remaining, m, a, num_classes=state.num_groups, mean_mask=mean_mask
    )

  return select_fn


def random_select_fn(m: int, rng: jax.Array) -> Callable[[SelectionState, Any], np.ndarray]:
  """The ablation's ``select_fn``: ``m`` per group uniformly at random from the remaining pool.

  Issue 16's control for the norm rule: the same loop (steps 4-7, correct samples removed)
  with step 3's norm ranking replaced by a class-balanced random draw
  (``core.select_class_balanced_random``), a fresh draw each round from
  ``fold_in(rng, state.round)``.

  Args:
    m: samples per group and round.
    rng: PRNG key of the loop (e.g. per seed).

  Returns:
    ``select_fn(state, params) -> indices`` (``params`` unused).
  """

  def select_fn(state: SelectionState, params) -> np.ndarray:
    del params
    key = jax.random.fold_in(rng, state.round)
    return core.select_class_balanced_random(
      state.groups, state.remaining, m, key, num_classes=state.num_groups
    )

  return select_fn


def draw_select_fn(
  draw_rule: str, *, norms, m: int, a=None, mean_over: str = "original", rng=None
) -> Callable[[SelectionState, Any], np.ndarray]:
  """``select_fn`` of a loop by its draw rule: ``'norm'`` (step 3) or ``'random'`` (ablation).

  Args:
    draw_rule: one of ``DRAW_RULES``.
    norms: ``[N]`` norm values (unused by ``'random'``).
    m: samples per group and round.
    a: samples from the upper side (``'norm'`` only).
    mean_over: ``'original'`` or ``'pool'`` (``'norm'`` only; see ``norm_select_fn``).
    rng: PRNG key, needed by ``'random'``.

  Raises:
    ValueError: unknown ``draw_rule``, or ``'random'`` without ``rng``.
  """
  _check_choice("draw_rule", draw_rule, DRAW_RULES)
  if draw_rule == "norm":
    return norm_select_fn(norms, m, a, mean_over)
  if rng is None:
    raise ValueError("rng=None is not allowed with draw_rule='random': the draw needs a key")
  return random_select_fn(m, rng)


def labels_seen(state: SelectionState) -> int:
  """Distinct samples whose label the loop used (training set) or read (Step 5's tests)."""
  seen = state.read.copy()
  seen[state.train_indices] = True
  return int(seen.sum())


def _round_record(state, num_new, num_tested, num_correct, metrics) -> dict[str, Any]:
  record = {
    "round": state.round,
    "num_labels": int(state.train_indices.size),
    "num_new": int(num_new),
    "num_tested": int(num_tested),
    "num_correct": int(num_correct),
    "num_remaining": int(state.remaining.sum()),
    "label_reads": int(state.label_reads),
    "labels_seen": labels_seen(state),
  }
  clash = sorted(set(metrics) & set(record))
  if clash:
    raise ValueError(
      f"eval_fn metrics {clash} are not allowed: they clash with the round record's keys "
      f"{ROUND_RECORD_KEYS}"
    )
  record.update({name: float(value) for name, value in metrics.items()})
  return record


def _train_round(state, new, train_fn, params, warm_start):
  """Adds the draw to the training set and trains: ``(state after the draw, new params)``."""
  state = add_samples(state, new)
  return state, train_fn(state, params if warm_start else None)


def _close_round(state, num_new, num_tested, num_correct, eval_fn, params) -> SelectionState:
  """Records the round (with ``eval_fn``'s metrics) and counts it as completed."""
  metrics = eval_fn(params) if eval_fn is not None else {}
  record = _round_record(state, num_new, num_tested, num_correct, metrics)
  return dataclasses.replace(state, round=state.round + 1, history=(*state.history, record))


def run_selection_loop(
  state: SelectionState,
  *,
  select_fn: Callable[[SelectionState, Any], Any],
  train_fn: Callable[[SelectionState, Any], Any],
  predict_fn: Callable[[Any, np.ndarray], Any],
  stop_kwargs: Mapping[str, Any] | None = None,
  warm_start: bool = True,
  eval_fn: Callable[[Any], Mapping[str, float]] | None = None,
) -> tuple[SelectionState, Any]:
  """Runs selection rounds until a stop condition holds.

  METHODS.md M2 steps 3-7. Each round: ``select_fn`` draws from the pool (step 3, or step 7
  after the first round); the draw is cut to the label budget if needed
  (``truncate_per_class``); the samples join the training set; ``train_fn`` trains (step 4,
  warm-started from the previous round's params by default, from scratch when
  ``warm_start=False``); ``predict_fn`` tests the remaining pool and the correct samples are
  removed (step 5); the round is recorded and ``stop_reason`` is checked (step 6, only after a
  round, so the first training set is always trained on).

  The callables must be deterministic functions of their arguments (derive per-round keys
  from ``state.round``, e.g. with ``jax.random.fold_in``): the loop is then a pure function of
  ``state``, which is what lets a driver resume a killed run by running it again.

  Args:
    state: the state to start from (``initial_state``).
    select_fn: ``(state, params) -> [S] indices`` from the remaining pool, each group's picks
      in priority order (``params`` is None before the first training); e.g.
      ``norm_select_fn``, or a ``core`` baseline wrapped likewise.
    train_fn: ``(state, warm_params or None) -> params``; ``state`` is the state after the
      round's draw: ``state.train_indices`` ``[T]`` is the training set and this is round
      ``state.round + 1``.
    predict_fn: ``(params, indices [P]) -> [P] class ids or [P, K] scores``.
    stop_kwargs: keyword arguments of ``stop_reason``; ``label_budget`` also caps every draw.
    warm_start: pass the previous params to ``train_fn`` (default) or None (from scratch).
    eval_fn: optional ``params -> {name: float}`` metrics (e.g. test accuracy), stored in the
      round record under the same keys every round.

  Returns:
    ``(final state, params of the last round)``.

  Raises:
    ValueError: bad ``stop_kwargs`` or a draw that is not in the pool.
  """
  stop_kwargs = dict(stop_kwargs or {})
  validate_stop_kwargs(**stop_kwargs)
  label_budget = stop_kwargs.get("label_budget")
  params = None
  while True:
    new = np.asarray(select_fn(state, params), np.int64)
    if label_budget is not None:
      new = truncate_per_class(new, state.groups, label_budget - state.train_indices.size)
    if new.size == 0:
      return dataclasses.replace(state, stop_reason="selection_empty"), params
    state, params = _train_round(state, new, train_fn, params, warm_start)
    pool = pool_indices(state)
    predictions = predict_fn(params, pool) if pool.size else np.zeros((0,), np.int64)
    num_removed = int(state.removed.sum())
    state = remove_correct(state, predictions)
    num_correct = int(state.removed.sum()) - num_removed
    state = _close_round(state, new.size, pool.size, num_correct, eval_fn, params)
    state = dataclasses.replace(state, stop_reason=stop_reason(state, **stop_kwargs))
    if state.stop_reason is not None:
      return state, params


def run_budget_loop(
  state: SelectionState,
  *,
  budgets: Sequence[int],
  select_fn: Callable[[SelectionState, Any, int], Any],
  train_fn: Callable[[SelectionState, Any], Any],
  warm_start: bool = True,
  eval_fn: Callable[[Any], Mapping[str, float]] | None = None,
) -> tuple[SelectionState, Any]:
  """Runs a baseline's rounds at given label budgets (the equal-budget comparison of M2).

  METHODS.md M2 "Measure": the baselines are compared with the norm loop at the budgets the
  loop reached. Round ``r`` draws ``budgets[r] - len(train set)`` samples from the pool with
  ``select_fn`` (cut to that count), trains and evaluates. Unlike ``run_selection_loop`` no
  sample is removed from the pool for being classified correctly: a baseline may draw any
  sample not yet in its training set. The callables must be deterministic, as there.

  Args:
    state: the state to start from (``initial_state``).
    budgets: strictly increasing label budgets (ints >= 1), one per round.
    select_fn: ``(state, params, num_select) -> [S] indices`` from the pool, in priority order;
      ``params`` is None before the first training.
    train_fn: ``(state after the draw, warm_params or None) -> params``, as in
      ``run_selection_loop``.
    warm_start: pass the previous params to ``train_fn`` (default) or None.
    eval_fn: optional ``params -> {name: float}`` metrics stored in each round record.

  Returns:
    ``(final state, params of the last round)``; the stop reason is ``'label_budget'`` after
    the last budget, ``'pool_empty'`` when nothing is left to draw.

  Raises:
    ValueError: budgets not strictly increasing positive ints, or a draw that is not in the
      pool.
  """
  budgets = [int(b) for b in budgets]
  if not budgets or budgets[0] < 1 or any(b <= a for a, b in zip(budgets, budgets[1:])):
    raise ValueError(
      f"budgets={budgets} is not allowed: budgets must be a non-empty, strictly increasing "
      "list of ints >= 1"
    )
  params = None
  while state.round < len(budgets):
    need = budgets[state.round] - state.train_indices.size
    if not state.remaining.any():
      return dataclasses.replace(state, stop_reason="pool_empty"), params
    new = np.asarray(select_fn(state, params, need), np.int64)[: max(need, 0)]
    state, params = _train_round(state, new, train_fn, params, warm_start)
    state = _close_round(state, new.size, 0, 0, eval_fn, params)
  return dataclasses.replace(state, stop_reason="label_budget"), params
