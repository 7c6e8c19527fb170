"""Tests of the M2 selection rounds' bookkeeping with fake train / predict callables."""

import dataclasses

import jax
import numpy as np
import pytest

from research.norm_selection import core, rounds

NUM, NUM_CLASSES = 90, 3


def problem(seed=0):
  gen = np.random.default_rng(seed)
  labels = np.arange(NUM) % NUM_CLASSES
  norms = gen.random(NUM).astype(np.float32)
  return labels, norms


class FakeModel:
  """Deterministic stand-in for training: 'params' count the samples seen over warm starts.

  A pool sample i is predicted correctly iff (7 i + params) % period == 0, so the removals
  depend on the training history (a resume with the wrong params would diverge).
  """

  def __init__(self, labels, period=4):
    self.labels, self.period = labels, period
    self.train_calls = []

  def train(self, state, warm):
    self.train_calls.append((state.train_indices.copy(), warm))
    return int(state.train_indices.size) + (0 if warm is None else warm)

  def predict(self, params, indices):
    correct = (7 * indices + params) % self.period == 0
    return np.where(correct, self.labels[indices], (self.labels[indices] + 1) % NUM_CLASSES)


def run(state, model, norms, m=4, **kwargs):
  return rounds.run_selection_loop(
    state,
    select_fn=rounds.norm_select_fn(norms, m),
    train_fn=model.train,
    predict_fn=model.predict,
    **kwargs,
  )


def run_observed(state, model, norms, m=4, **kwargs):
  """`run`, plus the state after every completed round (what each next draw starts from)."""
  completed = []
  rule = rounds.norm_select_fn(norms, m)

  def select_fn(s, params):
    if s.round:
      completed.append(s)
    return rule(s, params)

  final, params = rounds.run_selection_loop(
    state, select_fn=select_fn, train_fn=model.train, predict_fn=model.predict, **kwargs
  )
  return final, params, [*completed, final]


def run_fresh(labels, select_fn, max_rounds, predict_fn=None):
  """`max_rounds` rounds of `select_fn` from the initial state, trained by a new `FakeModel`.

  `predict_fn` replaces the model's own when given. Returns `(final state, model)`.
  """
  model = FakeModel(labels)
  final, _ = rounds.run_selection_loop(
    rounds.initial_state(labels),
    select_fn=select_fn,
    train_fn=model.train,
    predict_fn=model.predict if predict_fn is None else predict_fn,
    stop_kwargs={"max_rounds": max_rounds},
  )
  return final, model


def assert_states_equal(a, b):
  for field in dataclasses.fields(rounds.SelectionState):
    x, y = getattr(a, field.name), getattr(b, field.name)
    if isinstance(x, np.ndarray):
      np.testing.assert_array_equal(x, y, err_msg=field.name)
    else:
      assert x == y, field.name


# ----------------------------------------------------------------------------------------------
# Bookkeeping


def test_loop_invariants_every_round():
  labels, norms = problem()
  model = FakeModel(labels)
  seen = []

  def check(state):
    train = state.train_indices
    assert len(set(train.tolist())) == train.size
    in_train = np.zeros(NUM, bool)
    in_train[train] = True
    # Training set, removed and remaining partition the pool.
    assert not np.any(in_train & state.removed)
    assert not np.any(in_train & state.remaining)
    assert not np.any(state.removed & state.remaining)
    assert np.all(in_train | state.removed | state.remaining)
    if seen:
      previous_train, previous_removed = seen[-1]
      np.testing.assert_array_equal(train[: previous_train.size], previous_train)
      assert not np.any(previous_removed[train[previous_train.size :]])  # removed: never drawn
      assert np.all(state.removed[previous_removed])  # removed: stays removed
    seen.append((train.copy(), state.removed.copy()))

  state, params, completed = run_observed(rounds.initial_state(labels), model, norms)
  for s in completed:
    check(s)
  assert state.stop_reason == "pool_empty"
  assert len(seen) == state.round == len(state.history) == len(model.train_calls)
  assert params == model.train_calls[-1][0].size + model.train_calls[-1][1]


def test_each_round_draws_the_rule_on_the_current_pool():
  labels, norms = problem(1)
  before = []

  def select_fn(state, params):
    before.append(state.remaining.copy())
    return core.select_per_class(norms, state.groups, state.remaining, 4)

  state, model = run_fresh(labels, select_fn, max_rounds=3)
  start = 0
  for remaining, (train, _) in zip(before, model.train_calls, strict=True):
    drawn = train[start:]
    start = train.size
    expected = core.select_per_class(norms, labels, remaining, 4)
    np.testing.assert_array_equal(drawn, expected)
  record = state.history[0]
  assert record["num_new"] == 12 and record["num_labels"] == 12 and record["round"] == 0
  assert record["num_tested"] == NUM - 12
  assert record["num_remaining"] == NUM - 12 - record["num_correct"]


def test_warm_start_and_from_scratch():
  labels, norms = problem()
  warm_model, scratch_model = FakeModel(labels), FakeModel(labels)
  run(rounds.initial_state(labels), warm_model, norms, stop_kwargs={"max_rounds": 3})
  run(
    rounds.initial_state(labels),
    scratch_model,
    norms,
    stop_kwargs={"max_rounds": 3},
    warm_start=False,
  )
  assert [w for _, w in warm_model.train_calls] == [None, 12, 12 + 24]
  assert [w for _, w in scratch_model.train_calls] == [None, None, None]


def test_remove_correct_accepts_scores_and_checks_alignment():
  labels, _ = problem()
  state = rounds.add_samples(rounds.initial_state(labels), [0, 1, 2])
  pool = rounds.pool_indices(state)
  scores = np.zeros((pool.size, NUM_CLASSES))
  scores[np.arange(pool.size), labels[pool]] = 1.0
  scores[::2] = np.roll(scores[::2], 1, axis=1)  # every other one wrong
  after = rounds.remove_correct(state, scores)
  np.testing.assert_array_equal(np.flatnonzero(after.removed), pool[1::2])
  np.testing.assert_array_equal(np.flatnonzero(after.remaining), pool[::2])
  with pytest.raises(ValueError, match="predictions_on_pool with shape"):
    rounds.remove_correct(state, labels)


def test_add_samples_rejects_bad_draws():
  labels, _ = problem()
  state = rounds.add_samples(rounds.initial_state(labels), [5, 3])
  np.testing.assert_array_equal(state.train_indices, [5, 3])
  state = rounds.remove_correct(state, np.where(np.arange(NUM - 2) == 0, labels[0], -1))
  assert state.removed[0]
  with pytest.raises(ValueError, match="duplicates"):
    rounds.add_samples(state, [7, 7])
  with pytest.raises(ValueError, match=r"\[3\] is not allowed: they are not in the remaining"):
    rounds.add_samples(state, [8, 3])
  with pytest.raises(ValueError, match=r"\[0\] is not allowed"):
    rounds.add_samples(state, [0])
  with pytest.raises(ValueError, match="indices must be in"):
    rounds.add_samples(state, [NUM])
  pool = np.arange(NUM) < 10
  with pytest.raises(ValueError, match="not in the remaining pool"):
    rounds.add_samples(rounds.initial_state(labels, pool_mask=pool), [10])


# ----------------------------------------------------------------------------------------------
# Stop conditions


def test_stop_reason_conditions_directly():
  labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
  state = rounds.add_samples(rounds.initial_state(labels), [0, 4])
  # Pool left: class 0 -> 3, class 1 -> 3 (of 4 each).
  assert rounds.stop_reason(state) is None
  assert rounds.stop_reason(state, max_remaining_per_class=3) == "max_remaining_per_class"
  assert rounds.stop_reason(state, max_remaining_per_class=2) is None
  assert rounds.stop_reason(state, max_remaining_fraction=0.75) == "max_remaining_fraction"
  assert rounds.stop_reason(state, max_remaining_fraction=0.74) is None
  assert rounds.stop_reason(state, label_budget=2) == "label_budget"
  assert rounds.stop_reason(state, label_budget=3) is None
  assert rounds.stop_reason(state, max_rounds=1) is None
  later = dataclasses.replace(state, round=1)
  assert rounds.stop_reason(later, max_rounds=1) == "max_rounds"
  # Priority order when several hold.
  assert rounds.stop_reason(later, max_rounds=1, label_budget=2) == "label_budget"
  empty = dataclasses.replace(state, remaining=np.zeros(8, bool))
  assert rounds.stop_reason(empty, label_budget=2) == "pool_empty"
  # One class still above tau keeps the loop going.
  uneven = rounds.add_samples(state, [1, 2])
  assert rounds.stop_reason(uneven, max_remaining_per_class=1) is None
  assert rounds.stop_reason(uneven, max_remaining_per_class=3) == "max_remaining_per_class"


def per_class_left(state):
  return np.bincount(state.groups[state.remaining], minlength=state.num_groups)


@pytest.mark.parametrize(
  "kwargs, reason",
  [
    ({"max_rounds": 2}, "max_rounds"),
    ({"max_remaining_per_class": 12}, "max_remaining_per_class"),
    ({"max_remaining_fraction": 0.25}, "max_remaining_fraction"),
    ({"label_budget": 30}, "label_budget"),
    ({}, "pool_empty"),
  ],
)
def test_each_stop_condition_triggers_at_the_first_round_it_holds(kwargs, reason):
  labels, norms = problem(2)
  model = FakeModel(labels, period=5)
  state, _, completed = run_observed(rounds.initial_state(labels), model, norms, stop_kwargs=kwargs)
  assert state.stop_reason == reason
  for s in completed[:-1]:
    assert s.stop_reason is None
    assert rounds.stop_reason(s, **kwargs) is None
  last = completed[-1]
  assert last is state
  if reason == "max_remaining_per_class":
    assert np.all(per_class_left(last) <= 12)
    assert np.any(per_class_left(completed[-2]) > 12)
  if reason == "max_remaining_fraction":
    assert np.all(per_class_left(last) <= 0.25 * NUM / NUM_CLASSES)
  if reason == "max_rounds":
    assert last.round == 2
  if reason == "pool_empty":
    assert not last.remaining.any()


def test_first_round_always_trains_and_selection_empty_stops():
  labels, norms = problem()
  model = FakeModel(labels)
  # tau already holds before any training: the first training set is still trained on.
  state, _ = run(
    rounds.initial_state(labels), model, norms, stop_kwargs={"max_remaining_per_class": 90}
  )
  assert state.round == 1 and len(model.train_calls) == 1
  state, params = rounds.run_selection_loop(
    rounds.initial_state(labels),
    select_fn=lambda s, p: np.zeros((0,), np.int64),
    train_fn=model.train,
    predict_fn=model.predict,
  )
  assert state.stop_reason == "selection_empty" and state.round == 0 and params is None


# ----------------------------------------------------------------------------------------------
# Label budget


def reference_truncate(indices, groups, max_count):
  per_group = {}
  for i in indices:
    per_group.setdefault(int(groups[i]), []).append(int(i))
  kept, rank = set(), 0
  while len(kept) < max_count:
    for g in sorted(per_group):
      if rank < len(per_group[g]) and len(kept) < max_count:
        kept.add(per_group[g][rank])
    rank += 1
  return [int(i) for i in indices if int(i) in kept]


@pytest.mark.parametrize("seed", range(5))
def test_truncate_per_class_against_reference(seed):
  gen = np.random.default_rng(seed)
  groups = gen.integers(0, 4, 40)
  indices = gen.permutation(40)[:25]
  for max_count in [0, 1, 3, 7, 13, 24, 25, 30]:
    got = rounds.truncate_per_class(indices, groups, max_count)
    assert got.tolist() == reference_truncate(indices, groups, min(max_count, 25))


@pytest.mark.parametrize("budget", [1, 5, 12, 23, 29, 60])
def test_budget_never_exceeded_and_last_draw_is_fair(budget):
  labels, norms = problem(3)
  model = FakeModel(labels)
  state, _ = run(rounds.initial_state(labels), model, norms, stop_kwargs={"label_budget": budget})
  assert state.train_indices.size <= budget
  if state.stop_reason == "label_budget":
    assert state.train_indices.size == budget
  previous = model.train_calls[-2][0].size if len(model.train_calls) > 1 else 0
  last_draw = state.train_indices[previous:]
  counts = np.bincount(labels[last_draw], minlength=NUM_CLASSES)
  available = np.minimum(4, per_class_left_before(state, previous, labels))
  assert np.all(counts <= available)
  # Fair: counts differ by at most one among classes that had picks left to give.
  short = counts < available
  if short.any():
    assert counts.max() - counts[short].min() <= 1


def per_class_left_before(state, previous, labels):
  remaining = state.remaining.copy()
  remaining[state.train_indices[previous:]] = True
  return np.bincount(labels[remaining], minlength=NUM_CLASSES)


def test_budget_truncation_example():
  labels, norms = problem(4)
  model = FakeModel(labels, period=1000)  # nearly everything wrong: pools stay large
  state, _ = run(rounds.initial_state(labels), model, norms, stop_kwargs={"label_budget": 23})
  assert state.stop_reason == "label_budget"
  last_draw = state.train_indices[12:]
  np.testing.assert_array_equal(np.bincount(labels[last_draw]), [4, 4, 3])
  # Class 2's three picks are the rule with m = 3 on the pool of that round.
  pool_then = state.remaining.copy()
  pool_then[last_draw] = True
  rule = core.select_per_class(norms, labels, pool_then, 3)
  assert set(last_draw[labels[last_draw] == 2]) == set(rule[labels[rule] == 2])


# ----------------------------------------------------------------------------------------------
# Resume by running again (what the experiment does with one checkpointed phase per round)


def test_eval_fn_metrics_are_recorded_every_round():
  labels, norms = problem()
  state, _ = run(
    rounds.initial_state(labels),
    FakeModel(labels),
    norms,
    stop_kwargs={"max_rounds": 3},
    eval_fn=lambda params: {"test_accuracy": params / 100},
  )
  assert state.stop_reason == "max_rounds" and len(state.history) == 3
  assert state.history[1]["test_accuracy"] == pytest.approx((24 + 12) / 100)


class Killed(Exception):
  pass


def killed_then_restored(kill_after):
  """train_fns of a run killed before round `kill_after + 1` and of the rerun that restores.

  The first run "checkpoints" each trained round (its draw and params); the rerun restores a
  checkpointed round, checking the draw, and trains the others with a fresh model.
  """
  checkpoints = {}

  def first_run(model):
    def train_fn(state, warm):
      if state.round == kill_after:
        raise Killed
      checkpoints[state.round] = (state.train_indices.copy(), model.train(state, warm))
      return checkpoints[state.round][1]

    return train_fn

  def rerun(model):
    def train_fn(state, warm):
      if state.round in checkpoints:
        drawn, params = checkpoints[state.round]
        np.testing.assert_array_equal(drawn, state.train_indices)
        return params
      return model.train(state, warm)

    return train_fn

  return first_run, rerun


def uninterrupted_and_resumed(run_loop, labels, kill_after, **kwargs):
  """`run_loop` run through, and run again killed before round `kill_after + 1`, then rerun.

  Args:
    run_loop: `rounds.run_selection_loop` or `rounds.run_budget_loop`.
    labels: the pool's labels (each run starts from `rounds.initial_state(labels)`).
    kill_after: the round before which the first run is killed.
    **kwargs: the loop's other arguments, the same for every run.

  Returns:
    (uninterrupted state, its params, resumed state, its params, the rerun's `FakeModel`).
  """
  full, full_params = run_loop(
    rounds.initial_state(labels), train_fn=FakeModel(labels).train, **kwargs
  )
  first_run, rerun = killed_then_restored(kill_after)
  with pytest.raises(Killed):
    run_loop(rounds.initial_state(labels), train_fn=first_run(FakeModel(labels)), **kwargs)
  model = FakeModel(labels)
  resumed, params = run_loop(rounds.initial_state(labels), train_fn=rerun(model), **kwargs)
  return full, full_params, resumed, params, model


@pytest.mark.parametrize("kill_after", [1, 3])
@pytest.mark.parametrize("warm_start", [True, False])
def test_rerun_restoring_trained_rounds_ends_like_an_uninterrupted_run(kill_after, warm_start):
  labels, norms = problem(5)
  kwargs = {
    "select_fn": rounds.norm_select_fn(norms, 4),
    "predict_fn": FakeModel(labels).predict,
    "stop_kwargs": {"max_remaining_per_class": 3},
    "warm_start": warm_start,
  }
  full, full_params, resumed, params, model = uninterrupted_and_resumed(
    rounds.run_selection_loop, labels, kill_after, **kwargs
  )
  assert full.round > kill_after + 1
  assert_states_equal(resumed, full)
  assert params == full_params
  assert len(model.train_calls) == full.round - kill_after


# ----------------------------------------------------------------------------------------------
# Issue 16: pool labels read, the class mean over the original set, the random-draw ablation


def test_step5_label_reads_are_counted_every_round():
  labels, norms = problem(2)
  state, _ = run(
    rounds.initial_state(labels), FakeModel(labels), norms, stop_kwargs={"max_rounds": 4}
  )
  tested = np.cumsum([h["num_tested"] for h in state.history])
  # Every remaining pool sample is tested (its label read) every round, repeats included.
  assert [h["label_reads"] for h in state.history] == tested.tolist()
  assert state.label_reads == tested[-1] and tested[-1] > NUM  # repeats push it past N
  # Round 1 tests the whole pool but the first draw: every label is then seen.
  assert state.history[0]["label_reads"] == NUM - 12
  assert all(h["labels_seen"] == NUM for h in state.history)
  assert np.all(state.read | np.isin(np.arange(NUM), state.train_indices))
  # The baselines' loop never reads a pool label.
  budget_state, _ = rounds.run_budget_loop(
    rounds.initial_state(labels),
    budgets=[10, 25],
    select_fn=random_select,
    train_fn=FakeModel(labels).train,
  )
  assert [h["label_reads"] for h in budget_state.history] == [0, 0]
  assert [h["labels_seen"] for h in budget_state.history] == [10, 25]


@pytest.mark.parametrize("mean_over", ["original", "pool"])
def test_norm_draws_use_the_class_mean_over_the_original_set_or_the_pool(mean_over):
  labels, norms = problem(4)

  def predict(params, indices):  # the high-norm samples are learnt: the pool's mean drops
    right = norms[indices] > 0.6
    return np.where(right, labels[indices], (labels[indices] + 1) % NUM_CLASSES)

  def loop(rule):
    expected = []

    def select_fn(state, params):
      mean_mask = np.ones(NUM, bool) if rule == "original" else state.remaining
      expected.append(core.select_per_class(norms, labels, state.remaining, 4, mean_mask=mean_mask))
      return rounds.norm_select_fn(norms, 4, mean_over=rule)(state, params)

    final, model = run_fresh(labels, select_fn, max_rounds=3, predict_fn=predict)
    start = 0
    for want, (train, _) in zip(expected, model.train_calls, strict=True):
      np.testing.assert_array_equal(train[start:], want)
      start = train.size
    return final

  final = loop(mean_over)
  # The two options differ once the pool has shrunk (so this test sees the switch).
  other = loop("pool" if mean_over == "original" else "original")
  assert not np.array_equal(final.train_indices, other.train_indices)
  # Round 1 is the same for both: the pool is the original set.
  np.testing.assert_array_equal(final.train_indices[:12], other.train_indices[:12])


def test_random_draw_loop_is_the_same_loop_with_random_draws():
  labels, norms = problem(5)

  def loop(select_fn):
    return run_fresh(labels, select_fn, max_rounds=4)

  key = jax.random.key(3)
  final, model = loop(rounds.draw_select_fn("random", norms=norms, m=4, rng=key))
  again, _ = loop(rounds.draw_select_fn("random", norms=norms, m=4, rng=key))
  other, _ = loop(rounds.draw_select_fn("random", norms=norms, m=4, rng=jax.random.key(4)))
  norm, _ = loop(rounds.draw_select_fn("norm", norms=norms, m=4))
  np.testing.assert_array_equal(final.train_indices, again.train_indices)  # same key, same run
  assert not np.array_equal(final.train_indices, other.train_indices)
  assert not np.array_equal(final.train_indices, norm.train_indices)
  # Steps 5-7 are unchanged: removal, stop condition and bookkeeping as the norm loop.
  assert final.removed.any() and final.round == norm.round == 4
  removed_before = np.r_[0, np.cumsum([h["num_correct"] for h in final.history])[:-1]]
  for h, removed in zip(final.history, removed_before, strict=True):
    assert h["num_tested"] == NUM - h["num_labels"] - removed  # the whole remaining pool
  # Each round draws 4 per class (the pool never runs short here), never a removed sample.
  start = 0
  for (train, _), h in zip(model.train_calls, final.history, strict=True):
    drawn = train[start:]
    start = train.size
    assert not final.removed[drawn].any()
    np.testing.assert_array_equal(np.bincount(labels[drawn], minlength=NUM_CLASSES), [4, 4, 4])
    assert h["num_new"] == drawn.size
  with pytest.raises(ValueError, match="draw_rule='greedy' is not allowed"):
    rounds.draw_select_fn("greedy", norms=norms, m=4)
  with pytest.raises(ValueError, match="rng=None is not allowed with draw_rule='random'"):
    rounds.draw_select_fn("random", norms=norms, m=4)
  with pytest.raises(ValueError, match="mean_over='all' is not allowed"):
    rounds.norm_select_fn(norms, 4, mean_over="all")


# ----------------------------------------------------------------------------------------------
# Bad inputs


def test_bad_loop_inputs():
  labels, norms = problem()
  state = rounds.initial_state(labels)
  for kwargs, match in [
    ({"max_remaining_per_class": -1}, "max_remaining_per_class=-1"),
    ({"max_remaining_fraction": 1.5}, "max_remaining_fraction=1.5"),
    ({"label_budget": 0}, "label_budget=0"),
    ({"max_rounds": 0}, "max_rounds=0"),
  ]:
    with pytest.raises(ValueError, match=match):
      rounds.stop_reason(state, **kwargs)
    with pytest.raises(ValueError, match=match):
      run(state, FakeModel(labels), norms, stop_kwargs=kwargs)
  with pytest.raises(TypeError):
    rounds.stop_reason(state, tau=3)
  with pytest.raises(ValueError, match="clash"):
    run(state, FakeModel(labels), norms, eval_fn=lambda p: {"round": 1.0})
  with pytest.raises(ValueError, match="groups with shape"):
    rounds.initial_state(labels, groups=labels[:5])
  with pytest.raises(ValueError, match=r"class ids \[3\] have no samples in groups"):
    rounds.initial_state(labels, num_groups=4)


# ----------------------------------------------------------------------------------------------
# The equal-budget baseline loop


def random_select(state, params, num_select):
  del params
  gen = np.random.default_rng(state.round)
  return gen.permutation(rounds.pool_indices(state))[:num_select]


def test_budget_loop_reaches_each_budget_without_removing_or_redrawing():
  labels, _ = problem()
  model = FakeModel(labels)
  records = []

  def train_fn(s, warm):
    records.append((s.train_indices.copy(), s.remaining.copy()))
    return model.train(s, warm)

  state, params = rounds.run_budget_loop(
    rounds.initial_state(labels),
    budgets=[10, 25, 40],
    select_fn=random_select,
    train_fn=train_fn,
    eval_fn=lambda p: {"score": float(p)},
  )
  assert state.stop_reason == "label_budget" and state.round == 3
  assert [h["num_labels"] for h in state.history] == [10, 25, 40]
  assert [h["num_new"] for h in state.history] == [10, 15, 15]
  assert len(set(state.train_indices.tolist())) == 40
  assert not state.removed.any()  # baselines never remove correctly classified samples
  for train, remaining in records:
    assert remaining.sum() == NUM - train.size and not remaining[train].any()
  # Warm start: each round continues from the previous params (10, then 10 + 25, ...).
  assert [warm for _, warm in model.train_calls] == [None, 10, 35]
  assert params == 75 and state.history[-1]["score"] == 75.0


def test_budget_loop_oversized_draw_is_cut_and_pool_empty_stops():
  labels, _ = problem()
  state, _ = rounds.run_budget_loop(
    rounds.initial_state(labels),
    budgets=[5, NUM, NUM + 10],
    select_fn=lambda s, p, n: rounds.pool_indices(s),  # ignores n: the loop cuts the draw
    train_fn=lambda state, warm: 0,
  )
  assert [h["num_labels"] for h in state.history] == [5, NUM]
  assert state.stop_reason == "pool_empty"


def test_budget_loop_rerun_restoring_trained_rounds_ends_like_an_uninterrupted_run():
  labels, _ = problem()
  kwargs = dict(budgets=[9, 18, 30, 44], select_fn=random_select)
  full, full_params, resumed, resumed_params, model = uninterrupted_and_resumed(
    rounds.run_budget_loop, labels, 2, **kwargs
  )
  assert_states_equal(full, resumed)
  assert full_params == resumed_params and len(model.train_calls) == 2


@pytest.mark.parametrize("budgets", [[], [0, 5], [5, 5], [10, 4]])
def test_budget_loop_rejects_bad_budgets(budgets):
  labels, _ = problem()
  with pytest.raises(ValueError, match="budgets must be a non-empty, strictly increasing"):
    rounds.run_budget_loop(
      rounds.initial_state(labels),
      budgets=budgets,
      select_fn=random_select,
      train_fn=lambda state, warm: 0,
    )
