"""Typed, validated settings of experiment M2 (METHODS.md M2), built from a config.

`Settings.from_config(config)` checks every field the experiment reads and fails at once with
one sentence naming the field, its value and what is allowed; the experiment and its report
then read these frozen dataclasses, never the config.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from research import config_checks
from research.norm_selection.rounds import DRAW_RULES, MEAN_OVER

DATASETS = ("digits", "cifar10")
METHOD = "norm_rule"
RANDOM_DRAW = "random_draw_loop"
LOOP_ARMS = {"norm": METHOD, "random": RANDOM_DRAW}  # draw rule -> arm name
BASELINES = ("random", "class_balanced_random", "max_entropy", "moderate_coreset")
FULL = "full_data"
NORM_ORDERS = {"1": 1, "2": 2, "inf": "inf"}
STOP_FIELDS = ("max_remaining_per_class", "max_remaining_fraction", "label_budget", "max_rounds")


@dataclasses.dataclass(frozen=True)
class RoundTraining:
  """How every round of every strategy trains (`config.train`).

  Attributes:
    steps_per_round: updates per round (one `fit` phase), a fresh optimizer state each round;
      the full-data ceiling trains as many such phases as the seed's longest loop has rounds.
    batch_size: images per update.
    eval_batch_size: images per evaluation batch.
    log_every: steps between metric lines.
  """

  steps_per_round: int
  batch_size: int
  eval_batch_size: int
  log_every: int


@dataclasses.dataclass(frozen=True)
class Selection:
  """The selection rule and the loop's stop conditions (`config.selection`, steps 1-7).

  Attributes:
    m: samples per group and round (steps 3 and 7).
    a: samples from the upper side of the mean; None: `ceil(m / 2)`.
    mean_over: each class's mean norm over its `original` set (the patent's "class set's
      mean", default) or its current `pool`.
    norm_order: `"1"`, `"2"` or `"inf"` (step 2).
    channel_weights: per-channel weights of the pixel mean; None: luminance for RGB, uniform
      otherwise.
    grouping: `labels`, or `kmeans` of pixel vectors for an unlabelled pool (step 1).
    num_clusters: k of the k-means grouping (None with `labels`).
    warm_start: step 7 retrains from the previous round's parameters (True) or from scratch.
    stop: the `rounds.stop_reason` settings (step 6): `STOP_FIELDS` -> value or None.
  """

  m: int
  a: int | None
  mean_over: str
  norm_order: str
  channel_weights: tuple[float, ...] | None
  grouping: str
  num_clusters: int | None
  warm_start: bool
  stop: dict[str, Any]

  @property
  def p(self) -> int | str:
    """The norm order as `core.norm_values` takes it."""
    return NORM_ORDERS[self.norm_order]

  def active_stops(self) -> dict[str, Any]:
    """The stop conditions that are switched on (not None)."""
    return {k: v for k, v in self.stop.items() if v is not None}


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything experiment M2 reads from its config.

  Attributes:
    dataset: `data.name`, one of `DATASETS`.
    max_train_examples: keep this many training examples (0: all).
    max_test_examples: keep this many test examples (0: all).
    seeds: the seeds, `seed, seed + 1, ...` (`num_seeds` of them).
    train: how rounds train.
    selection: the rule and stop conditions.
    draw_rules: the loops run (`config.loop.draw_rules`), each the same loop (steps 4-7) with
      its draw rule: `norm` (step 3, the method, arm `METHOD`) and/or `random` (m per class at
      random, the ablation, arm `RANDOM_DRAW`); `norm` is required (the baselines follow its
      budgets).
    baselines: the equal-budget baselines to run, a subset of `BASELINES`.
    full_data: whether to train the full-data ceiling.
  """

  dataset: str
  max_train_examples: int
  max_test_examples: int
  seeds: tuple[int, ...]
  train: RoundTraining
  selection: Selection
  draw_rules: tuple[str, ...]
  baselines: tuple[str, ...]
  full_data: bool

  def facts(self) -> dict[str, Any]:
    """The settings the report quotes (JSON), for `Results.meta`."""
    sel = self.selection
    return {
      "dataset": self.dataset,
      "m": sel.m,
      "a": sel.a,
      "mean_over": sel.mean_over,
      "draw_rules": list(self.draw_rules),
      "norm_order": sel.norm_order,
      "grouping": sel.grouping,
      "warm_start": sel.warm_start,
      "stop_conditions": sel.active_stops(),
      "steps_per_round": self.train.steps_per_round,
      "batch_size": self.train.batch_size,
    }

  @classmethod
  def from_config(cls, config: Any) -> Settings:
    """Reads and validates `config`; a wrong value fails naming the field."""
    check_int = config_checks.check_int
    check_int(config, "model.embedding_dim", 1)
    seed = check_int(config, "seed")
    train = RoundTraining(
      steps_per_round=check_int(config, "train.steps_per_round", 1),
      batch_size=check_int(config, "train.batch_size", 1),
      eval_batch_size=check_int(config, "train.eval_batch_size", 1),
      log_every=check_int(config, "train.log_every", 1),
    )
    unknown = sorted(set(config.baselines) - set(BASELINES))
    if unknown:
      raise config_checks.ConfigError(
        f"config.baselines={list(config.baselines)!r} is not allowed: {unknown} are unknown; "
        f"choose from {list(BASELINES)}"
      )
    return cls(
      dataset=config_checks.check_choice(config, "data.name", DATASETS),
      max_train_examples=check_int(config, "data.max_train_examples", 0),
      max_test_examples=check_int(config, "data.max_test_examples", 0),
      seeds=tuple(seed + i for i in range(check_int(config, "num_seeds", 1))),
      train=train,
      selection=_selection(config),
      draw_rules=_draw_rules(config),
      baselines=tuple(config.baselines),
      full_data=config_checks.check_choice(config, "full_data", (True, False)),
    )


def _draw_rules(config: Any) -> tuple[str, ...]:
  """The validated `config.loop.draw_rules`."""
  rules = config_checks.get_field(config, "loop.draw_rules")
  rules = (rules,) if isinstance(rules, str) else tuple(rules)
  if "norm" not in rules or len(set(rules)) != len(rules) or set(rules) - set(DRAW_RULES):
    raise config_checks.ConfigError(
      f"config.loop.draw_rules={list(rules)!r} is not allowed: it must hold 'norm' (the "
      f"method; the baselines follow its budgets) and may add 'random' (the ablation), each "
      f"once, from {list(DRAW_RULES)}"
    )
  return rules


def _selection(config: Any) -> Selection:
  """The validated `config.selection` block."""
  s = config.selection
  m = config_checks.check_int(config, "selection.m", 1)
  if s.a is not None:
    config_checks.check_int(config, "selection.a", 0, m)
  grouping = config_checks.check_choice(config, "selection.grouping", ("labels", "kmeans"))
  if grouping == "kmeans":
    if s.num_clusters is None:
      raise config_checks.ConfigError(
        "config.selection.num_clusters=None is not allowed with grouping='kmeans': a pool "
        "without labels needs a cluster count (an int >= 1)"
      )
    config_checks.check_int(config, "selection.num_clusters", 1)
  for field, minimum in (("max_remaining_per_class", 0), ("label_budget", 1), ("max_rounds", 1)):
    if s[field] is not None:
      config_checks.check_int(config, f"selection.{field}", minimum)
  if s.max_remaining_fraction is not None:
    config_checks.check_float(config, "selection.max_remaining_fraction", 0.0, 1.0)
  if all(s[f] is None for f in STOP_FIELDS):
    raise config_checks.ConfigError(
      "config.selection has no stop condition: set at least one of " + ", ".join(STOP_FIELDS)
    )
  weights = s.channel_weights
  return Selection(
    m=m,
    a=s.a,
    mean_over=config_checks.check_choice(config, "selection.mean_over", MEAN_OVER),
    norm_order=config_checks.check_choice(config, "selection.norm_order", tuple(NORM_ORDERS)),
    channel_weights=None if weights is None else tuple(float(w) for w in weights),
    grouping=grouping,
    num_clusters=s.num_clusters,
    warm_start=config_checks.check_choice(config, "selection.warm_start", (True, False)),
    stop={f: s[f] for f in STOP_FIELDS},
  )
