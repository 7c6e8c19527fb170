"""Experiment M2: the norm-ranked hard-example selection loop against equal-budget baselines.

METHODS.md M2. Per seed, the method's loop runs first (steps 1-7: draw ``m`` per class nearest
the class's mean norm, train, test the remaining pool, remove the correctly classified
samples, stop or draw again). The label budgets it reaches after each round are then given to
every baseline, which runs the same number of rounds with the same training procedure:

* ``random``: uniform draws from the samples not yet labelled;
* ``class_balanced_random``: uniform draws per class, cut fairly across classes;
* ``max_entropy``: round 1 as class-balanced random (no model yet), then the highest
  predictive entropy of the current model on the unlabelled samples;
* ``moderate_coreset`` (Xia et al. 2023): round 1 as class-balanced random, then per class the
  samples whose distance to the class centre in the *current model's* embedding (the model
  trained on the labelled set so far, i.e. on the initial set in round 2) is nearest the
  median;
* ``full_data``: every training sample (the ceiling), trained ``full_data_cycles`` times as
  long as one round.

Every training run (all rounds, strategies and seeds) uses one compiled train step: the batch
size and shapes never change, only the indices do. Each round starts a fresh optimizer state
(warm-started parameters by default) and trains ``steps_per_round`` steps with the shared
cosine schedule. After every round, the loop state (``loop.state_to_dict``) and the train
state are checkpointed together, so a killed run resumes at the round where it stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from research import config_checks
from research.data import samplers
from research.metrics import classification as cls_metrics
from research.metrics.seeds import verdict
from research.norm_selection import core, loop
from research.supervised import classification
from research.training import harness, parallel, report, state, steps
from research.training import loop as train_lib

DATASETS = ("digits", "cifar10")
BASELINES = ("random", "class_balanced_random", "max_entropy", "moderate_coreset")
METHOD = "norm_rule"
FULL = "full_data"
NORM_ORDERS = {"1": 1, "2": 2, "inf": "inf"}
_STRATEGY_IDS = {METHOD: 0, **{name: i + 1 for i, name in enumerate(BASELINES)}, FULL: 9}


def validate(config: ml_collections.ConfigDict) -> None:
  """Fails at once, naming the field, on any value the experiment cannot use."""
  config_checks.check_choice(config, "data.name", DATASETS)
  config_checks.check_int(config, "data.max_train_examples", 0)
  config_checks.check_int(config, "data.max_test_examples", 0)
  config_checks.check_int(config, "num_seeds", 1)
  config_checks.check_int(config, "train.steps_per_round", 1)
  config_checks.check_int(config, "train.full_data_cycles", 1)
  config_checks.check_int(config, "train.batch_size", 1)
  config_checks.check_int(config, "train.eval_batch_size", 1)
  config_checks.check_int(config, "train.log_every", 1)
  config_checks.check_int(config, "model.embedding_dim", 1)
  m = config_checks.check_int(config, "selection.m", 1)
  if config.selection.a is not None:
    config_checks.check_int(config, "selection.a", 0, m)
  config_checks.check_choice(config, "selection.norm_order", tuple(NORM_ORDERS))
  grouping = config_checks.check_choice(config, "selection.grouping", ("labels", "kmeans"))
  if grouping == "kmeans":
    if config.selection.num_clusters is None:
      raise config_checks.ConfigError(
        "config.selection.num_clusters=None is not allowed with grouping='kmeans': a pool "
        "without labels needs a cluster count (an int >= 1)"
      )
    config_checks.check_int(config, "selection.num_clusters", 1)
  config_checks.check_choice(config, "selection.warm_start", (True, False))
  for field, minimum in (("max_remaining_per_class", 0), ("label_budget", 1), ("max_rounds", 1)):
    if config.selection[field] is not None:
      config_checks.check_int(config, f"selection.{field}", minimum)
  if config.selection.max_remaining_fraction is not None:
    config_checks.check_float(config, "selection.max_remaining_fraction", 0.0, 1.0)
  stops = ("max_remaining_per_class", "max_remaining_fraction", "label_budget", "max_rounds")
  if all(config.selection[f] is None for f in stops):
    raise config_checks.ConfigError(
      "config.selection has no stop condition: set at least one of " + ", ".join(stops)
    )
  unknown = sorted(set(config.baselines) - set(BASELINES))
  if unknown:
    raise config_checks.ConfigError(
      f"config.baselines={list(config.baselines)!r} is not allowed: {unknown} are unknown; "
      f"choose from {list(BASELINES)}"
    )
  config_checks.check_choice(config, "full_data", (True, False))


def stop_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The ``loop.stop_reason`` settings of ``config.selection`` (METHODS.md M2 step 6)."""
  s = config.selection
  return {
    "max_remaining_per_class": s.max_remaining_per_class,
    "max_remaining_fraction": s.max_remaining_fraction,
    "label_budget": s.label_budget,
    "max_rounds": s.max_rounds,
  }


def load_data(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Classification arrays (``classification.load_classification_data``), optionally subset.

  ``data.max_train_examples`` / ``max_test_examples`` > 0 keep that many examples, chosen by a
  fixed permutation (seed 0), so a catalogue dataset's pool stays small at demo size.
  """
  data = classification.load_classification_data(config)
  for split, field in (("train", "max_train_examples"), ("test", "max_test_examples")):
    limit = config.data[field]
    n = len(data[split]["label"])
    if 0 < limit < n:
      keep = np.sort(np.random.default_rng(0).permutation(n)[:limit])
      data[split] = {k: v[keep] for k, v in data[split].items()}
  return data


def sample_norms(images: np.ndarray, config: ml_collections.ConfigDict, chunk: int = 4096):
  """``[N]`` norm values of uint8 ``[N, H, W, C]`` images (METHODS.md M2 step 2).

  Images are scaled to [0, 1] chunk by chunk on the host, so a large pool never exists as
  floats all at once.
  """
  order = NORM_ORDERS[config.selection.norm_order]
  weights = config.selection.channel_weights
  parts = [
    np.asarray(
      core.norm_values(
        images[i : i + chunk].astype(np.float32) / 255.0, weights, order, chunk_size=chunk
      )
    )
    for i in range(0, len(images), chunk)
  ]
  return np.concatenate(parts)


def selection_eval_step(params: Any, batch: dict, *, model: Any, num_classes: int) -> dict:
  """Confusion counts, predictions, probabilities and embeddings of a padded batch.

  Args:
    params: model parameters.
    batch: {"image": [B, H, W, C], "label": [B], "valid": [B] bool}.
    model: the classifier.
    num_classes: K.

  Returns:
    {"confusion": [K, K], "predictions": [B], "probs": [B, K], "embedding": [B, D]}.
  """
  out = model.apply({"params": params}, steps.images_to_float(batch["image"]))
  predictions = jnp.argmax(out["logits"], -1)
  return {
    "confusion": steps.confusion_counts(batch["label"], predictions, batch["valid"], num_classes),
    "predictions": predictions,
    "probs": jax.nn.softmax(out["logits"], -1),
    "embedding": out["embedding"],
  }


@dataclasses.dataclass(frozen=True)
class _OffsetSampler:
  """A sampler whose step 0 is global step ``start`` (rounds continue the global step)."""

  inner: samplers.RandomSampler
  start: int

  def indices(self, step: int) -> np.ndarray:
    return self.inner.indices(step - self.start)


@dataclasses.dataclass
class _Trainer:
  """One model, one optimizer, ONE compiled train step and eval step for every run."""

  config: ml_collections.ConfigDict
  run: harness.Run
  data: dict[str, Any]

  def __post_init__(self):
    c = self.config
    self.model = classification.build_model(c, self.data["num_classes"])
    parallel.check_batch_divisible(c.train.batch_size, self.run.mesh, "train.batch_size")
    parallel.check_batch_divisible(c.train.eval_batch_size, self.run.mesh, "train.eval_batch_size")
    self.tx = state.make_optimizer(c.optim, c.train.steps_per_round)
    self.train_step = parallel.compile_train_step(
      functools.partial(
        steps.train_step,
        loss_fn=functools.partial(steps.classification_loss, model=self.model),
        tx=self.tx,
      ),
      self.run.mesh,
    )
    self._init_cache: dict[int, Any] = {}
    self._fresh_state = None
    self.eval_step = parallel.compile_eval_step(
      functools.partial(selection_eval_step, model=self.model, num_classes=self.data["num_classes"])
    )

  def init_params(self, seed: int) -> Any:
    """Initial parameters of a seed (the same for every strategy of that seed; cached)."""
    if seed not in self._init_cache:
      key = jax.random.fold_in(jax.random.key(seed), 0)
      self._init_cache[seed] = harness.init_params(self.model, key, self.data["train"]["image"][0])
    return self._init_cache[seed]

  def fresh_state(self, params: Any, step: np.ndarray) -> state.TrainState:
    """A replicated train state at ``step`` with a copy of ``params`` and a new optimizer state.

    One compiled function (the step is an argument), so rounds do not compile anything; the
    parameters are copied because the train step donates its state.
    """
    if self._fresh_state is None:

      def fresh(params, step):
        copied = jax.tree.map(lambda p: p * 1, params)
        return state.create_train_state(copied, self.tx).replace(step=step)

      self._fresh_state = jax.jit(fresh, out_shardings=parallel.replicated(self.run.mesh))
    return self._fresh_state(params, step)

  def template(self) -> state.TrainState:
    """A replicated train state with the right structure, for restoring checkpoints."""
    return self.fresh_state(self.init_params(self.config.seed), np.int32(0))

  def train(
    self, indices: np.ndarray, params: Any, *, seed: int, start: int, name: str, cycles: int = 1
  ) -> state.TrainState:
    """Trains on ``train[indices]`` for ``cycles`` x ``steps_per_round`` steps from ``params``.

    Each cycle starts a fresh optimizer state (the cosine schedule restarts) and continues the
    global step from ``start``; batches come from a seeded sampler over ``indices``.
    """
    spr = self.config.train.steps_per_round
    arrays = {k: self.data["train"][k][indices] for k in ("image", "label")}
    for cycle in range(cycles):
      begin = start + cycle * spr
      train_state = self.fresh_state(params, np.int32(begin))
      sampler = _OffsetSampler(
        samplers.RandomSampler(len(indices), self.config.train.batch_size, seed * 100003 + begin),
        begin,
      )
      train_state = train_lib.train_loop(
        train_state,
        self.train_step,
        harness.sampled_batch_fn(arrays, sampler, self.run.mesh, ("image", "label")),
        jax.random.key(seed),
        num_steps=begin + spr,
        log_every=self.config.train.log_every,
        writer=self.run.writer,
        examples_per_step=self.config.train.batch_size,
        name=name,
      )
      params = train_state.params
    return train_state

  def evaluate(self, params: Any, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Confusion, predictions, probabilities and embeddings of a split (one compiled step)."""
    return harness.evaluate(
      self.eval_step,
      params,
      arrays,
      self.config.train.eval_batch_size,
      self.run.mesh,
      ("image", "label"),
      collect=("predictions", "probs", "embedding"),
    )

  def evaluate_pool(self, params: Any, indices: np.ndarray) -> dict[str, np.ndarray]:
    """``evaluate`` on ``train[indices]``."""
    return self.evaluate(params, {k: self.data["train"][k][indices] for k in ("image", "label")})

  def test_metrics(self, params: Any) -> dict[str, float]:
    """Test accuracy, mean-class and worst-class accuracy and ``class_<k>`` accuracies."""
    confusion = self.evaluate(params, self.data["test"])["confusion"]
    out = cls_metrics.classification_summary(confusion)
    per_class = cls_metrics.per_class_accuracy(confusion)
    out.update({f"class_{k}": float(v) for k, v in enumerate(per_class)})
    return out


def _to_json(selection: loop.SelectionState) -> dict[str, Any]:
  return {
    k: (v.tolist() if isinstance(v, np.ndarray) else v)
    for k, v in loop.state_to_dict(selection).items()
  }


def _run_strategy(
  trainer: _Trainer,
  name: str,
  seed: int,
  initial: loop.SelectionState,
  run_fn: Callable[..., tuple[loop.SelectionState, Any]],
  **run_kwargs,
) -> loop.SelectionState:
  """Runs one strategy's rounds with a checkpoint after every round; resumes from the newest.

  After round ``r`` (1-based) a checkpoint at global step ``r * steps_per_round`` (times
  ``full_data_cycles`` for the full-data run) holds the train state and, as JSON extras, the
  ``SelectionState`` after that round; a run killed during round ``r + 1`` redoes that round.
  """
  checkpointer = trainer.run.checkpointer(f"checkpoints/seed{seed}_{name}")
  restored = checkpointer.restore_latest(trainer.template())
  selection, params = initial, None
  if restored is not None:
    selection = loop.state_from_dict(restored[1]["selection"])
    params = restored[0].params
  spr = trainer.config.train.steps_per_round
  cycles = trainer.config.train.full_data_cycles if name == FULL else 1
  last: dict[str, Any] = {}

  def train_fn(indices: np.ndarray, warm: Any) -> Any:
    start = last["round"] * spr * cycles
    params0 = trainer.init_params(seed) if warm is None else warm
    last["state"] = trainer.train(
      indices, params0, seed=seed, start=start, name=f"seed{seed}/{name}", cycles=cycles
    )
    return last["state"].params

  def on_round_end(sel: loop.SelectionState, params: Any) -> None:
    last["round"] = sel.round
    checkpointer.save(sel.round * spr * cycles, last["state"], {"selection": _to_json(sel)})

  last["round"] = selection.round
  selection, _ = run_fn(
    selection,
    train_fn=train_fn,
    params=params,
    warm_start=trainer.config.selection.warm_start,
    eval_fn=trainer.test_metrics,
    on_round_end=on_round_end,
    **run_kwargs,
  )
  checkpointer.close()
  return selection


def _baseline_select_fn(
  name: str, trainer: _Trainer, groups: np.ndarray, num_groups: int, seed: int
) -> Callable[[loop.SelectionState, Any, int], np.ndarray]:
  """``select_fn(state, params, num_select)`` of a baseline (``core`` rules on the pool)."""

  def key(strategy: str, r: int) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _STRATEGY_IDS[strategy]), r)

  def per_class(rule: Callable[[int], np.ndarray], need: int) -> np.ndarray:
    # Grow m until the fair cut has `need` samples or the pool is exhausted.
    m = max(1, math.ceil(need / num_groups))
    while True:
      picked = loop.truncate_per_class(rule(m), groups, need)
      if picked.size >= need or m >= len(groups):
        return picked
      m *= 2

  def select(selection: loop.SelectionState, params: Any, need: int) -> np.ndarray:
    pool = selection.remaining
    r = selection.round

    def balanced(m):
      return core.select_class_balanced_random(
        groups, pool, m, key("class_balanced_random", r), num_classes=num_groups
      )

    if name == "random":
      return core.select_random(pool, need, key(name, r))
    if name == "class_balanced_random" or params is None:
      return per_class(balanced, need)
    indices = loop.pool_indices(selection)
    out = trainer.evaluate_pool(params, indices)
    if name == "max_entropy":
      probs = np.zeros((len(groups), trainer.data["num_classes"]))
      probs[indices] = out["probs"]
      return core.select_max_entropy(probs, pool, need)
    features = np.zeros((len(groups), out["embedding"].shape[1]))
    features[indices] = out["embedding"]
    return per_class(
      lambda m: core.select_moderate_coreset(features, groups, pool, m, num_classes=num_groups),
      need,
    )

  return select


def _groups(config: ml_collections.ConfigDict, data: dict[str, Any], seed: int):
  """Group ids of the pool (METHODS.md M2 step 1): labels, or k-means of pixel vectors."""
  labels = data["train"]["label"]
  if config.selection.grouping == "labels":
    return core.group_ids(labels), data["num_classes"]
  pixels = data["train"]["image"].reshape(len(labels), -1).astype(np.float32) / 255.0
  k = config.selection.num_clusters
  ids = core.group_ids(None, embeddings=pixels, num_clusters=k, rng=jax.random.key(seed))
  # Clusters may come out empty; renumber the non-empty ones densely.
  _, dense = np.unique(ids, return_inverse=True)
  return dense.astype(np.int64), int(dense.max()) + 1


def run_seed(
  trainer: _Trainer, config: ml_collections.ConfigDict, seed: int, norms: np.ndarray
) -> dict[str, loop.SelectionState]:
  """The norm loop and every baseline at its budgets, for one seed: {strategy: final state}."""
  labels = trainer.data["train"]["label"]
  groups, num_groups = _groups(config, trainer.data, seed)
  initial = loop.initial_state(labels, groups=groups, num_groups=num_groups)
  s = config.selection
  results = {
    METHOD: _run_strategy(
      trainer,
      METHOD,
      seed,
      initial,
      loop.run_selection_loop,
      select_fn=loop.norm_select_fn(norms, s.m, s.a),
      predict_fn=lambda params, idx: trainer.evaluate_pool(params, idx)["predictions"],
      stop_kwargs=stop_kwargs(config),
    )
  }
  budgets = [h["num_labels"] for h in results[METHOD].history]
  for name in config.baselines:
    results[name] = _run_strategy(
      trainer,
      name,
      seed,
      initial,
      loop.run_budget_loop,
      budgets=budgets,
      select_fn=_baseline_select_fn(name, trainer, groups, num_groups, seed),
    )
  if config.full_data:
    results[FULL] = _run_strategy(
      trainer,
      FULL,
      seed,
      initial,
      loop.run_budget_loop,
      budgets=[len(labels)],
      select_fn=lambda sel, params, need: loop.pool_indices(sel),
    )
  return results


def _stats(values: list[float]) -> tuple[float, float]:
  return float(np.mean(values)), float(np.std(values))


def aggregate(per_seed: list[dict[str, loop.SelectionState]]) -> dict[str, Any]:
  """Per strategy and round: mean/std over seeds of labels used and the test metrics.

  Round ``r`` aggregates the seeds whose norm loop reached ``r + 1`` rounds (the baselines
  run the same rounds), so a row's seeds share the round index, not always the budget.
  """
  strategies = list(per_seed[0])
  rounds = min(len(p[METHOD].history) for p in per_seed)
  out: dict[str, Any] = {"rounds": rounds, "strategies": {}}
  for name in strategies:
    rows = []
    num_rounds = 1 if name == FULL else rounds
    for r in range(num_rounds):
      recs = [p[name].history[min(r, len(p[name].history) - 1)] for p in per_seed]
      row = {"round": r + 1}
      for key in recs[0]:
        if key in ("round", "num_new", "num_tested", "num_correct", "num_remaining"):
          continue
        row[key] = _stats([rec[key] for rec in recs])
      row["per_seed_accuracy"] = [rec["accuracy"] for rec in recs]
      rows.append(row)
    out["strategies"][name] = rows
  return out


def _pm(stat: tuple[float, float], scale: float = 100.0) -> str:
  return f"{scale * stat[0]:.1f} ± {scale * stat[1]:.1f}"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the M2 loop and the equal-budget baselines over seeds; writes the report.

  Returns:
    the run summary (also written to `<workdir>/summary.json`).
  """
  validate(config)
  run = harness.start_run(workdir)
  data = load_data(config)
  trainer = _Trainer(config, run, data)
  norms = sample_norms(data["train"]["image"], config)
  seeds = [config.seed + i for i in range(config.num_seeds)]
  per_seed = [run_seed(trainer, config, seed, norms) for seed in seeds]
  agg = aggregate(per_seed)
  summary = _write_report(config, run, data, per_seed, agg, trainer)
  harness.write_summary(run.workdir, summary)
  return summary


def _write_report(config, run, data, per_seed, agg, trainer) -> dict:
  """Tables, verdicts, plots, report.md; returns the summary dict."""
  names = [n for n in agg["strategies"] if n != FULL]
  method_rows = agg["strategies"][METHOD]
  full_rows = agg["strategies"].get(FULL)
  full_acc = full_rows[0]["accuracy"] if full_rows else None
  num_classes = data["num_classes"]

  table_rows, verdict_rows = [], []
  for r, mrow in enumerate(method_rows):
    labels_used = mrow["num_labels"][0]
    for name in names:
      row = agg["strategies"][name][r]
      table_rows.append(
        [
          r + 1,
          f"{labels_used:.0f}",
          name,
          _pm(row["accuracy"]),
          _pm(row["worst_class_accuracy"]),
          _pm(row["mean_class_accuracy"]),
        ]
      )
    for name in names:
      if name == METHOD:
        continue
      d = np.asarray(mrow["per_seed_accuracy"]) - np.asarray(
        agg["strategies"][name][r]["per_seed_accuracy"]
      )
      verdict_rows.append([r + 1, f"{labels_used:.0f}", name, f"{100 * d.mean():+.1f}", verdict(d)])
  if full_rows:
    table_rows.append(
      [
        "-",
        f"{full_rows[0]['num_labels'][0]:.0f}",
        FULL,
        _pm(full_acc),
        _pm(full_rows[0]["worst_class_accuracy"]),
        _pm(full_rows[0]["mean_class_accuracy"]),
      ]
    )

  within = None
  if full_rows:
    for mrow in method_rows:
      if mrow["accuracy"][0] >= full_acc[0] - 0.01:
        within = mrow["num_labels"][0]
        break

  final = method_rows[-1]
  final_labels = final["num_labels"][0]
  per_class_rows = []
  for name in names + ([FULL] if full_rows else []):
    row = agg["strategies"][name][-1]
    per_class_rows.append(
      [name] + [f"{100 * row[f'class_{k}'][0]:.0f}" for k in range(num_classes)]
    )

  curves = {}
  for name in names:
    rows = agg["strategies"][name]
    curves[name] = (
      [row["num_labels"][0] for row in rows],
      [row["accuracy"][0] for row in rows],
      [row["accuracy"][1] for row in rows] if len(per_seed) > 1 else None,
    )
  worst_curves = {
    name: (xs, [row["worst_class_accuracy"][0] for row in agg["strategies"][name]], None)
    for name, (xs, _, _) in curves.items()
  }
  if full_rows:
    xs = curves[METHOD][0]
    span = [min(xs), max(xs)]
    curves[FULL + " (ceiling)"] = (span, [full_acc[0]] * 2, None)
    worst_curves[FULL + " (ceiling)"] = (
      span,
      [full_rows[0]["worst_class_accuracy"][0]] * 2,
      None,
    )
  report.plot_curves(
    curves, "labels used", "test accuracy", run.plot_path("accuracy_vs_labels.png")
  )
  report.plot_curves(
    worst_curves, "labels used", "worst-class accuracy", run.plot_path("worst_class_vs_labels.png")
  )

  loop_rows = []
  for seed_index, p in enumerate(per_seed):
    sel = p[METHOD]
    loop_rows.append(
      [
        config.seed + seed_index,
        sel.round,
        int(sel.train_indices.size),
        int(sel.removed.sum()),
        int(sel.remaining.sum()),
        sel.stop_reason,
      ]
    )
  counts = {}
  for name in names:
    tallies = [v[4] for v in verdict_rows if v[2] == name]
    counts[name] = {k: tallies.count(k) for k in ("wins", "ties", "loses")}
  honest = [
    f"- vs {name}: the norm rule wins at {c['wins']}, ties at {c['ties']} and loses at "
    f"{c['loses']} of {len(method_rows)} budgets."
    for name, c in counts.items()
    if name != METHOD
  ]
  if full_rows:
    honest.append(
      f"- Full data ({full_rows[0]['num_labels'][0]:.0f} labels): {_pm(full_acc)} %. "
      + (
        f"The norm rule gets within 1 point of it at {within:.0f} labels."
        if within is not None
        else "The norm rule does not get within 1 point of it at any budget it reached "
        f"(best: {100 * max(r['accuracy'][0] for r in method_rows):.1f} %): the loop stopped "
        f"at {final['num_labels'][0]:.0f} labels "
        f"({', '.join(sorted({str(p[METHOD].stop_reason) for p in per_seed}))})."
      )
    )
  seeds_note = (
    f"{len(per_seed)} seed(s) (model init and batch order; the norm rule itself is "
    "deterministic). Mean ± std over seeds, in %. Verdicts use paired per-seed differences: "
    "wins/loses when the mean difference exceeds max(2 SE, 0.5 points), else ties. Each seed's "
    "baselines run at that seed's norm-loop budgets (the loop's budgets can differ between seeds "
    "when a class's pool runs short); 'labels' is their mean over seeds."
  )
  settings = (
    f"m = {config.selection.m} per class and round, a = "
    f"{config.selection.a if config.selection.a is not None else 'ceil(m/2)'}, norm order "
    f"p = {config.selection.norm_order}, grouping by {config.selection.grouping}, "
    f"{'warm start' if config.selection.warm_start else 'from scratch'}; "
    f"{config.train.steps_per_round} steps of batch {config.train.batch_size} per round, one "
    f"compiled train step for all {len(per_seed) * (len(names) + 1)} runs "
    f"(train-step compilations: {trainer.train_step._cache_size()}). Stop conditions: "
    f"{ {k: v for k, v in stop_kwargs(config).items() if v is not None} }. Moderate coreset and "
    "max-entropy draw their first round class-balanced at random (they need a model), then "
    "use the current model (trained on the labelled set so far) for embeddings / "
    "probabilities. Step 5 of the norm loop reads the labels of the remaining pool to find the "
    "correctly classified samples (the patent's sample set is labelled); 'labels' counts the "
    "training labels only, for every strategy."
  )
  report.write_report(
    run.workdir,
    f"M2 norm-ranked selection loop on {config.data.name}",
    [
      ("Setting", settings + "\n\n" + seeds_note),
      ("Where the norm rule wins, ties or loses", "\n".join(honest)),
      (
        "Test accuracy at equal label budgets",
        report.markdown_table(
          ["round", "labels", "strategy", "accuracy", "worst class", "mean class"], table_rows
        ),
      ),
      (
        "Norm rule minus baseline, per budget",
        report.markdown_table(
          ["round", "labels", "baseline", "mean diff (points)", "verdict"], verdict_rows
        ),
      ),
      (
        f"Per-class accuracy at the final budget ({final_labels:.0f} labels), %",
        report.markdown_table(["strategy"] + [str(n) for n in data["class_names"]], per_class_rows),
      ),
      (
        "The norm loop per seed",
        report.markdown_table(
          ["seed", "rounds", "labels used", "removed as correct", "pool left", "stop reason"],
          loop_rows,
        ),
      ),
      (
        "Plots",
        "![accuracy](plots/accuracy_vs_labels.png)\n\n![worst](plots/worst_class_vs_labels.png)",
      ),
    ],
  )
  rows = []
  if "random" in agg["strategies"]:
    rows.append(
      harness.summary_row(
        f"test acc. at {final_labels:.0f} labels",
        final["accuracy"][0],
        "random selection",
        agg["strategies"]["random"][-1]["accuracy"][0],
      )
    )
  if full_rows:
    rows.append(
      harness.summary_row(
        f"test acc. at {final_labels:.0f} labels",
        final["accuracy"][0],
        f"full data ({full_rows[0]['num_labels'][0]:.0f})",
        full_acc[0],
      )
    )
  return {
    "experiment": "norm_selection",
    "dataset": config.data.name,
    "time_s": run.elapsed(),
    "num_seeds": len(per_seed),
    "train_step_compilations": int(trainer.train_step._cache_size()),
    "within_1_point_of_full_data_at": within,
    "verdicts": counts,
    "aggregate": agg,
    "rows": rows,
  }
