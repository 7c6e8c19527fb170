"""Tests of the M2 selection loop's bookkeeping with fake train / predict callables."""

import dataclasses

import numpy as np
import pytest

from research.norm_selection import core, loop

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

  def train(self, train_indices, warm):
    self.train_calls.append((np.array(train_indices), warm))
    return int(train_indices.size) + (0 if warm is None else warm)

  def predict(self, params, indices):
    correct = (7 * indices + params) % self.period == 0
    return np.where(correct, self.labels[indices], (self.labels[indices] + 1) % NUM_CLASSES)


def run(state, model, norms, m=4, params=None, **kwargs):
  return loop.run_selection_loop(
    state,
    select_fn=loop.norm_select_fn(norms, m),
    train_fn=model.train,
    predict_fn=model.predict,
    params=params,
    **kwargs,
  )


def assert_states_equal(a, b):
  da, db = loop.state_to_dict(a), loop.state_to_dict(b)
  assert sorted(da) == sorted(db)
  for key in da:
    np.testing.assert_array_equal(np.asarray(da[key]), np.asarray(db[key]), err_msg=key)


# ----------------------------------------------------------------------------------------------
# Bookkeeping


def test_loop_invariants_every_round():
  labels, norms = problem()
  model = FakeModel(labels)
  seen = []

  def check(state, params):
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

  state, params = run(loop.initial_state(labels), model, norms, on_round_end=check)
  assert state.stop_reason == "pool_empty"
  assert len(seen) == state.round == len(state.history) == len(model.train_calls)
  assert params == model.train_calls[-1][0].size + model.train_calls[-1][1]


def test_each_round_draws_the_rule_on_the_current_pool():
  labels, norms = problem(1)
  model = FakeModel(labels)
  before = []

  def select_fn(state, params):
    before.append(state.remaining.copy())
    return core.select_per_class(norms, state.groups, state.remaining, 4)

  state, _ = loop.run_selection_loop(
    loop.initial_state(labels),
    select_fn=select_fn,
    train_fn=model.train,
    predict_fn=model.predict,
    stop_kwargs={"max_rounds": 3},
  )
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
  run(loop.initial_state(labels), warm_model, norms, stop_kwargs={"max_rounds": 3})
  run(
    loop.initial_state(labels),
    scratch_model,
    norms,
    stop_kwargs={"max_rounds": 3},
    warm_start=False,
  )
  assert [w for _, w in warm_model.train_calls] == [None, 12, 12 + 24]
  assert [w for _, w in scratch_model.train_calls] == [None, None, None]


def test_remove_correct_accepts_scores_and_checks_alignment():
  labels, _ = problem()
  state = loop.add_samples(loop.initial_state(labels), [0, 1, 2])
  pool = loop.pool_indices(state)
  scores = np.zeros((pool.size, NUM_CLASSES))
  scores[np.arange(pool.size), labels[pool]] = 1.0
  scores[::2] = np.roll(scores[::2], 1, axis=1)  # every other one wrong
  after = loop.remove_correct(state, scores)
  np.testing.assert_array_equal(np.flatnonzero(after.removed), pool[1::2])
  np.testing.assert_array_equal(np.flatnonzero(after.remaining), pool[::2])
  with pytest.raises(ValueError, match="predictions_on_pool with shape"):
    loop.remove_correct(state, labels)


def test_add_samples_rejects_bad_draws():
  labels, _ = problem()
  state = loop.add_samples(loop.initial_state(labels), [5, 3])
  np.testing.assert_array_equal(state.train_indices, [5, 3])
  state = loop.remove_correct(state, np.where(np.arange(NUM - 2) == 0, labels[0], -1))
  assert state.removed[0]
  with pytest.raises(ValueError, match="duplicates"):
    loop.add_samples(state, [7, 7])
  with pytest.raises(ValueError, match=r"\[3\] is not allowed: they are not in the remaining"):
    loop.add_samples(state, [8, 3])
  with pytest.raises(ValueError, match=r"\[0\] is not allowed"):
    loop.add_samples(state, [0])
  with pytest.raises(ValueError, match="indices must be in"):
    loop.add_samples(state, [NUM])
  pool = np.arange(NUM) < 10
  with pytest.raises(ValueError, match="not in the remaining pool"):
    loop.add_samples(loop.initial_state(labels, pool_mask=pool), [10])


# ----------------------------------------------------------------------------------------------
# Stop conditions


def test_stop_reason_conditions_directly():
  labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
  state = loop.add_samples(loop.initial_state(labels), [0, 4])
  # Pool left: class 0 -> 3, class 1 -> 3 (of 4 each).
  assert loop.stop_reason(state) is None
  assert loop.stop_reason(state, max_remaining_per_class=3) == "max_remaining_per_class"
  assert loop.stop_reason(state, max_remaining_per_class=2) is None
  assert loop.stop_reason(state, max_remaining_fraction=0.75) == "max_remaining_fraction"
  assert loop.stop_reason(state, max_remaining_fraction=0.74) is None
  assert loop.stop_reason(state, label_budget=2) == "label_budget"
  assert loop.stop_reason(state, label_budget=3) is None
  assert loop.stop_reason(state, max_rounds=1) is None
  later = dataclasses.replace(state, round=1)
  assert loop.stop_reason(later, max_rounds=1) == "max_rounds"
  # Priority order when several hold.
  assert loop.stop_reason(later, max_rounds=1, label_budget=2) == "label_budget"
  empty = dataclasses.replace(state, remaining=np.zeros(8, bool))
  assert loop.stop_reason(empty, label_budget=2) == "pool_empty"
  # One class still above tau keeps the loop going.
  uneven = loop.add_samples(state, [1, 2])
  assert loop.stop_reason(uneven, max_remaining_per_class=1) is None
  assert loop.stop_reason(uneven, max_remaining_per_class=3) == "max_remaining_per_class"


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
  rounds = []
  state, _ = run(
    loop.initial_state(labels),
    model,
    norms,
    stop_kwargs=kwargs,
    on_round_end=lambda s, p: rounds.append(s),
  )
  assert state.stop_reason == reason
  for s in rounds[:-1]:
    assert s.stop_reason is None
    assert loop.stop_reason(s, **kwargs) is None
  last = rounds[-1]
  assert last.stop_reason == reason  # the hook sees the final state, ready to checkpoint
  if reason == "max_remaining_per_class":
    assert np.all(per_class_left(last) <= 12)
    assert np.any(per_class_left(rounds[-2]) > 12)
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
    loop.initial_state(labels), model, norms, stop_kwargs={"max_remaining_per_class": 90}
  )
  assert state.round == 1 and len(model.train_calls) == 1
  state, params = loop.run_selection_loop(
    loop.initial_state(labels),
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
    got = loop.truncate_per_class(indices, groups, max_count)
    assert got.tolist() == reference_truncate(indices, groups, min(max_count, 25))


@pytest.mark.parametrize("budget", [1, 5, 12, 23, 29, 60])
def test_budget_never_exceeded_and_last_draw_is_fair(budget):
  labels, norms = problem(3)
  model = FakeModel(labels)
  state, _ = run(loop.initial_state(labels), model, norms, stop_kwargs={"label_budget": budget})
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
  state, _ = run(loop.initial_state(labels), model, norms, stop_kwargs={"label_budget": 23})
  assert state.stop_reason == "label_budget"
  last_draw = state.train_indices[12:]
  np.testing.assert_array_equal(np.bincount(labels[last_draw]), [4, 4, 3])
  # Class 2's three picks are the rule with m = 3 on the pool of that round.
  pool_then = state.remaining.copy()
  pool_then[last_draw] = True
  rule = core.select_per_class(norms, labels, pool_then, 3)
  assert set(last_draw[labels[last_draw] == 2]) == set(rule[labels[rule] == 2])


# ----------------------------------------------------------------------------------------------
# Serialisation and resume


def test_state_dict_round_trip_through_npz(tmp_path):
  labels, norms = problem()
  model = FakeModel(labels)
  state, _ = run(
    loop.initial_state(labels),
    model,
    norms,
    stop_kwargs={"max_rounds": 3},
    eval_fn=lambda params: {"test_accuracy": params / 100},
  )
  data = loop.state_to_dict(state)
  for value in data.values():
    assert isinstance(value, np.ndarray | int)
  np.savez(tmp_path / "state.npz", **data)
  with np.load(tmp_path / "state.npz") as restored:
    back = loop.state_from_dict(dict(restored))
  assert_states_equal(state, back)
  assert back.history == state.history and back.stop_reason == "max_rounds"
  assert state.history[1]["test_accuracy"] == pytest.approx((24 + 12) / 100)
  assert_states_equal(
    loop.initial_state(labels), loop.state_from_dict(loop.state_to_dict(loop.initial_state(labels)))
  )


class Killed(Exception):
  pass


@pytest.mark.parametrize("kill_after", [1, 3])
@pytest.mark.parametrize("warm_start", [True, False])
def test_resume_from_serialised_mid_loop_state(tmp_path, kill_after, warm_start):
  labels, norms = problem(5)
  kwargs = {"stop_kwargs": {"max_remaining_per_class": 3}, "warm_start": warm_start}
  full, full_params = run(loop.initial_state(labels), FakeModel(labels), norms, **kwargs)
  assert full.round > kill_after + 1

  def checkpoint_then_die(state, params):
    np.savez(tmp_path / "state.npz", params=params, **loop.state_to_dict(state))
    if state.round == kill_after:
      raise Killed

  with pytest.raises(Killed):
    run(
      loop.initial_state(labels),
      FakeModel(labels),
      norms,
      on_round_end=checkpoint_then_die,
      **kwargs,
    )
  with np.load(tmp_path / "state.npz") as data:
    data = dict(data)
  restored = loop.state_from_dict(data)
  assert restored.round == kill_after
  model = FakeModel(labels)
  resumed, params = run(restored, model, norms, params=int(data["params"]), **kwargs)
  assert_states_equal(resumed, full)
  assert params == full_params
  assert len(model.train_calls) == full.round - kill_after
  # A finished state resumes to itself without training.
  again, _ = run(resumed, model, norms, params=params, **kwargs)
  assert again is resumed and len(model.train_calls) == full.round - kill_after


def test_resume_without_params_fails_for_warm_start():
  labels, norms = problem()
  state, _ = run(
    loop.initial_state(labels), FakeModel(labels), norms, stop_kwargs={"max_rounds": 1}
  )
  mid = dataclasses.replace(state, stop_reason=None)
  with pytest.raises(ValueError, match="params=None is not allowed when resuming at round 1"):
    run(mid, FakeModel(labels), norms)


# ----------------------------------------------------------------------------------------------
# Bad inputs


def test_bad_loop_inputs():
  labels, norms = problem()
  state = loop.initial_state(labels)
  for kwargs, match in [
    ({"max_remaining_per_class": -1}, "max_remaining_per_class=-1"),
    ({"max_remaining_fraction": 1.5}, "max_remaining_fraction=1.5"),
    ({"label_budget": 0}, "label_budget=0"),
    ({"max_rounds": 0}, "max_rounds=0"),
  ]:
    with pytest.raises(ValueError, match=match):
      loop.stop_reason(state, **kwargs)
    with pytest.raises(ValueError, match=match):
      run(state, FakeModel(labels), norms, stop_kwargs=kwargs)
  with pytest.raises(TypeError):
    loop.stop_reason(state, tau=3)
  with pytest.raises(ValueError, match="clash"):
    run(state, FakeModel(labels), norms, eval_fn=lambda p: {"round": 1.0})
  with pytest.raises(ValueError, match="groups with shape"):
    loop.initial_state(labels, groups=labels[:5])
  with pytest.raises(ValueError, match=r"class ids \[3\] have no samples in groups"):
    loop.initial_state(labels, num_groups=4)


# ----------------------------------------------------------------------------------------------
# The equal-budget baseline loop


def random_select(state, params, num_select):
  del params
  gen = np.random.default_rng(state.round)
  return gen.permutation(loop.pool_indices(state))[:num_select]


def test_budget_loop_reaches_each_budget_without_removing_or_redrawing():
  labels, _ = problem()
  model = FakeModel(labels)
  records = []
  state, params = loop.run_budget_loop(
    loop.initial_state(labels),
    budgets=[10, 25, 40],
    select_fn=random_select,
    train_fn=model.train,
    eval_fn=lambda p: {"score": float(p)},
    on_round_end=lambda s, p: records.append((s.train_indices.copy(), s.remaining.copy())),
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
  state, _ = loop.run_budget_loop(
    loop.initial_state(labels),
    budgets=[5, NUM, NUM + 10],
    select_fn=lambda s, p, n: loop.pool_indices(s),  # ignores n: the loop cuts the draw
    train_fn=lambda idx, warm: 0,
  )
  assert [h["num_labels"] for h in state.history] == [5, NUM]
  assert state.stop_reason == "pool_empty"


def test_budget_loop_resumes_like_an_uninterrupted_run():
  labels, _ = problem()
  kwargs = dict(budgets=[9, 18, 30, 44], select_fn=random_select)
  full, full_params = loop.run_budget_loop(
    loop.initial_state(labels), train_fn=FakeModel(labels).train, **kwargs
  )
  saved = []
  loop.run_budget_loop(
    loop.initial_state(labels),
    train_fn=FakeModel(labels).train,
    on_round_end=lambda s, p: saved.append((loop.state_to_dict(s), p)),
    **kwargs,
  )
  middle, middle_params = saved[1]
  resumed, resumed_params = loop.run_budget_loop(
    loop.state_from_dict(middle),
    params=middle_params,
    train_fn=FakeModel(labels).train,
    **kwargs,
  )
  assert_states_equal(full, resumed)
  assert full_params == resumed_params


@pytest.mark.parametrize("budgets", [[], [0, 5], [5, 5], [10, 4]])
def test_budget_loop_rejects_bad_budgets(budgets):
  labels, _ = problem()
  with pytest.raises(ValueError, match="budgets must be a non-empty, strictly increasing"):
    loop.run_budget_loop(
      loop.initial_state(labels),
      budgets=budgets,
      select_fn=random_select,
      train_fn=lambda idx, warm: 0,
    )
