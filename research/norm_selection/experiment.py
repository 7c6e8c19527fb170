"""Experiment M2: the norm-ranked hard-example selection loop against equal-budget baselines.

METHODS.md M2. Per seed, the method's loop runs first (steps 1-7: draw ``m`` per class nearest
the class's mean norm, train, test the remaining pool, remove the correctly classified
samples, stop or draw again), then the ablation ``random_draw_loop`` (issue 16: the same loop
and stop conditions, ``m`` per class drawn at random, so the norm rule is the only
difference). The label budgets the norm loop reaches after each round are then given to every
baseline, which runs the same number of rounds with the same training procedure and never
reads a pool label (the loops read every remaining pool label each round, counted apart):

* ``random``: uniform draws from the samples not yet labelled;
* ``class_balanced_random``: uniform draws per class, cut fairly across classes;
* ``max_entropy``: round 1 as class-balanced random (no model yet), then the highest
  predictive entropy of the current model on the unlabelled samples;
* ``moderate_coreset`` (Xia et al. 2023): round 1 as class-balanced random, then per class the
  samples whose distance to the class centre in the current model's embedding is nearest the
  median;
* ``full_data``: every training sample (the ceiling), trained as many phases of one round's
  length as the seed's longest loop has rounds.

Every round is one ``fit`` phase (``seed<s>/<strategy>/round<r>``): a fresh optimizer state
(warm-started parameters by default), ``steps_per_round`` steps with the shared cosine
schedule, one compiled train step for every phase of the run (the batch shapes never change,
only the indices do), a checkpoint at its end whose extras name the samples it trained on. A
killed run resumes by running the loops again: rounds whose phase is checkpointed are
restored instead of trained (their draws are checked against the checkpoint's extras); the
deterministic pool tests and test evaluations are recomputed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from research.data import samplers
from research.data.classification import load_classification_data
from research.metrics import classification as cls_metrics
from research.norm_selection import core, report, rounds
from research.norm_selection import settings as m2_settings
from research.norm_selection.settings import BASELINES, FULL, LOOP_ARMS, METHOD, RANDOM_DRAW
from research.study.results import Results
from research.supervised.classification import build_model
from research.training import fit, parallel, predict, state, steps

_STRATEGY_IDS = {METHOD: 0, **{n: i + 1 for i, n in enumerate(BASELINES)}, FULL: 9, RANDOM_DRAW: 10}
_KEYS = ("image", "label")


def load_data(config: ml_collections.ConfigDict, settings: m2_settings.Settings) -> dict[str, Any]:
  """Classification arrays (`load_classification_data`), optionally subset.

  `max_train_examples` / `max_test_examples` > 0 keep that many examples, chosen by a fixed
  permutation (seed 0), so a catalogue dataset's pool stays small at demo size.
  """
  data = load_classification_data(config)
  limits = {"train": settings.max_train_examples, "test": settings.max_test_examples}
  for split, limit in limits.items():
    n = len(data[split]["label"])
    if 0 < limit < n:
      keep = np.sort(np.random.default_rng(0).permutation(n)[:limit])
      data[split] = {k: v[keep] for k, v in data[split].items()}
  return data


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


class RoundTrainer:
  """One model and optimizer, ONE compiled train step and eval step for every round of a run.

  Attributes:
    train_step_traces: how many times the train step was traced (= compiled).
  """

  def __init__(
    self, config: ml_collections.ConfigDict, settings: m2_settings.Settings, run: fit.Run, data
  ):
    self.settings, self.run, self.data = settings, run, data
    train = settings.train
    self.model = build_model(config, data["num_classes"])
    parallel.check_batch_divisible(train.batch_size, run.mesh, "train.batch_size")
    self.tx = state.make_optimizer(config.optim, train.steps_per_round)
    self.train_step_traces = 0
    self._init: dict[int, Any] = {}
    self.train_step = parallel.compile_train_step(
      functools.partial(steps.train_step, loss_fn=self._loss, tx=self.tx), run.mesh
    )
    self.eval_step = parallel.compile_eval_step(
      functools.partial(selection_eval_step, model=self.model, num_classes=data["num_classes"])
    )

  def _loss(self, params: Any, batch: dict, rng: jax.Array):
    self.train_step_traces += 1  # runs at trace time only
    return steps.classification_loss(params, batch, rng, model=self.model)

  def init_params(self, seed: int) -> Any:
    """Initial parameters of a seed (the same for every strategy of that seed; cached)."""
    if seed not in self._init:
      key = jax.random.fold_in(jax.random.key(seed), 0)
      self._init[seed] = fit.init_params(self.model, key, self.data["train"]["image"][0])
    return self._init[seed]

  def train(self, indices: np.ndarray, params: Any, *, seed: int, phase: str, start: int):
    """One round: a `fit` phase on `train[indices]` from `params`; returns the new params.

    Args:
      indices: `[T]` the training set.
      params: the parameters to start from (copied: the train step donates its state).
      seed: the run's seed (batch order).
      phase: the phase's name (metrics tag; checkpoints in `<workdir>/<phase>_checkpoints`).
      start: the round's first step counted over the strategy's rounds (batch-order seed).

    Raises:
      ValueError: the phase's checkpoint was trained on other samples (a changed config in
        the same workdir).
    """
    t = self.settings.train
    sampler = samplers.RandomSampler(len(indices), t.batch_size, seed * 100003 + start)
    arrays = {k: self.data["train"][k][indices] for k in _KEYS}
    drawn = indices.tolist()
    result = fit.fit(
      self.run,
      fit.Phase(phase, t.steps_per_round, t.log_every, 0, t.batch_size),
      params=jax.tree.map(jnp.copy, params),
      tx=self.tx,
      step_fn=self.train_step,
      batch_fn=fit.sampled_batch_fn(arrays, sampler, self.run.mesh, _KEYS),
      rng=jax.random.key(seed),
      extras_fn=lambda: {"train_indices": drawn},
    )
    if result.extras and result.extras["train_indices"] != drawn:
      raise ValueError(
        f"the checkpoint of phase {phase} was trained on other samples than this run draws: "
        "the config changed since it was written; use a fresh workdir"
      )
    return result.params

  def predict(self, params: Any, arrays: dict[str, np.ndarray]) -> predict.Predictions:
    """Confusion (`totals`), predictions, probabilities and embeddings of a split."""
    return predict.predict(
      self.eval_step,
      params,
      arrays,
      batch_size=self.settings.train.eval_batch_size,
      mesh=self.run.mesh,
      keys=_KEYS,
      collect=("predictions", "probs", "embedding"),
      sum_over_batches=("confusion",),
    )

  def predict_pool(self, params: Any, indices: np.ndarray) -> predict.Predictions:
    """`predict` on `train[indices]`."""
    return self.predict(params, {k: self.data["train"][k][indices] for k in _KEYS})

  def test_metrics(self, params: Any) -> dict[str, float]:
    """Test accuracy, mean-class and worst-class accuracy and `class_<k>` accuracies."""
    confusion = self.predict(params, self.data["test"])["confusion"]
    out = cls_metrics.classification_summary(confusion)
    per_class = cls_metrics.per_class_accuracy(confusion)
    out.update({f"class_{k}": float(v) for k, v in enumerate(per_class)})
    return out


def _train_fn(trainer: RoundTrainer, seed: int, name: str, cycles: int = 1) -> Callable:
  """`train_fn(state, warm)` of `rounds`: the round's phase(s) (`cycles` of them per round)."""
  spr = trainer.settings.train.steps_per_round

  def train_fn(selection: rounds.SelectionState, warm: Any) -> Any:
    params = trainer.init_params(seed) if warm is None else warm
    for cycle in range(cycles):
      phase = f"seed{seed}/{name}/round{selection.round + 1}"
      params = trainer.train(
        selection.train_indices,
        params,
        seed=seed,
        phase=phase + (f"_cycle{cycle + 1}" if cycles > 1 else ""),
        start=(selection.round * cycles + cycle) * spr,
      )
    return params

  return train_fn


def _strategy_key(seed: int, strategy: str) -> jax.Array:
  """The PRNG key of a strategy's draws for a seed (rounds fold in their number)."""
  return jax.random.fold_in(jax.random.key(seed), _STRATEGY_IDS[strategy])


def _baseline_select_fn(
  name: str, trainer: RoundTrainer, groups: np.ndarray, num_groups: int, seed: int
) -> Callable[[rounds.SelectionState, Any, int], np.ndarray]:
  """`select_fn(state, params, num_select)` of a baseline (`core` rules on the pool)."""

  def key(strategy: str, r: int) -> jax.Array:
    return jax.random.fold_in(_strategy_key(seed, strategy), r)

  def per_class(rule: Callable[[int], np.ndarray], need: int) -> np.ndarray:
    # Grow m until the fair cut has `need` samples or the pool is exhausted.
    m = max(1, math.ceil(need / num_groups))
    while True:
      picked = rounds.truncate_per_class(rule(m), groups, need)
      if picked.size >= need or m >= len(groups):
        return picked
      m *= 2

  def select(selection: rounds.SelectionState, params: Any, need: int) -> np.ndarray:
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
    indices = rounds.pool_indices(selection)
    out = trainer.predict_pool(params, indices)
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


def run_seed(
  trainer: RoundTrainer, seed: int, norms: np.ndarray
) -> dict[str, rounds.SelectionState]:
  """{strategy: final state} of the loops and the baselines (at the norm loop's budgets)."""
  settings = trainer.settings
  sel = settings.selection
  labels = trainer.data["train"]["label"]
  images, num_classes = trainer.data["train"]["image"], trainer.data["num_classes"]
  groups, num_groups = rounds.group_pool(
    labels, images, sel.grouping, sel.num_clusters, jax.random.key(seed), num_classes
  )
  initial = rounds.initial_state(labels, groups=groups, num_groups=num_groups)
  common = {"warm_start": sel.warm_start, "eval_fn": trainer.test_metrics}
  out = {}
  for rule in settings.draw_rules:
    name = LOOP_ARMS[rule]
    out[name] = rounds.run_selection_loop(
      initial,
      select_fn=rounds.draw_select_fn(
        rule, norms=norms, m=sel.m, a=sel.a, mean_over=sel.mean_over, rng=_strategy_key(seed, name)
      ),
      train_fn=_train_fn(trainer, seed, name),
      predict_fn=lambda params, idx: trainer.predict_pool(params, idx)["predictions"],
      stop_kwargs=sel.stop,
      **common,
    )[0]
  budgets = [h["num_labels"] for h in out[METHOD].history]
  for name in settings.baselines:
    out[name] = rounds.run_budget_loop(
      initial,
      budgets=budgets,
      select_fn=_baseline_select_fn(name, trainer, groups, num_groups, seed),
      train_fn=_train_fn(trainer, seed, name),
      **common,
    )[0]
  if settings.full_data:
    longest = max(out[LOOP_ARMS[rule]].round for rule in settings.draw_rules)
    out[FULL] = rounds.run_budget_loop(
      initial,
      budgets=[len(labels)],
      select_fn=lambda selection, params, need: rounds.pool_indices(selection),
      train_fn=_train_fn(trainer, seed, FULL, cycles=longest),
      **common,
    )[0]
  return out


def add_strategy(
  results: Results, name: str, seed: int, final: rounds.SelectionState, steps_per_round: int
) -> None:
  """Records a strategy's rounds: test metrics (`test`) and pool bookkeeping (`pool`).

  Each round `r` (1-based) is the condition `round<r>`; the pool split also holds
  `train_steps` (`r * steps_per_round`, the steps trained so far); the stop reason goes to
  `meta["stop_reasons"][name][seed]`.
  """
  for r, record in enumerate(final.history, 1):
    pool = {k: record[k] for k in rounds.ROUND_RECORD_KEYS if k != "round"}
    pool["train_steps"] = r * steps_per_round
    test = {k: v for k, v in record.items() if k not in rounds.ROUND_RECORD_KEYS}
    results.add(name, seed, test, split="test", condition=f"round{r}")
    results.add(name, seed, pool, split="pool", condition=f"round{r}")
  results.meta.setdefault("stop_reasons", {}).setdefault(name, {})[str(seed)] = final.stop_reason


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the M2 loop and the equal-budget baselines over seeds; writes the report.

  Returns:
    the run summary (also written to `<workdir>/summary.json`).
  """
  settings = m2_settings.Settings.from_config(config)
  run = fit.start_run(workdir, config)
  data = load_data(config, settings)
  trainer = RoundTrainer(config, settings, run, data)
  sel = settings.selection
  norms = core.uint8_norm_values(data["train"]["image"], sel.channel_weights, sel.p)
  class_names = [str(n) for n in data["class_names"]]
  results = Results(report.EXPERIMENT, meta={**settings.facts(), "class_names": class_names})
  spr = settings.train.steps_per_round
  for seed in settings.seeds:
    out = run_seed(trainer, seed, norms)
    longest = max(out[LOOP_ARMS[rule]].round for rule in settings.draw_rules)
    for name, final in out.items():
      add_strategy(results, name, seed, final, spr * (longest if name == FULL else 1))
  results.meta["train_step_compilations"] = trainer.train_step_traces
  results.meta["time_s"] = run.elapsed()
  results.save(workdir)
  return report.write_report(results, workdir)
