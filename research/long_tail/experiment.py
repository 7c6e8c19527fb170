"""Experiment of method M3: head-set CE plus whole-set triplet loss on long-tailed data.

METHODS.md M3 (seed 002). For each imbalance ratio of `config.data.imbalance_ratios` and each
seed, the arms of `research.long_tail.arms` (the dual-loss method, its ablations and the
baselines) train the same ResNet with the same trainer (`fit`: same steps, the generic
`steps.train_step` with an arm-specific loss or the alternating step, checkpoints and
resume). Each trained model is evaluated on the balanced test set (`predict`) under every
prediction rule (`arms.PREDICTION_RULES`): accuracy overall and per many/medium/few-shot group
(thresholds `config.eval.many` / `config.eval.few` on the training counts) and per class, plus,
for the dual arms, their head classifier's softmax on the head classes.

The numbers become `Results` records `(arm, seed, "test", "rho<ratio>", "<rule>_<metric>",
value)` (and `steps`, `updates`); the
class counts, head set and 2-D PCA of the first seed's test features go to `Results.meta`.
`report.write_report` builds `report.md`, the plots and `summary.json` from those alone.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from research.data.classification import load_classification_data
from research.long_tail import arms, core, report
from research.long_tail.settings import DUAL_METHODS, Settings
from research.study.results import Results
from research.supervised.classification import build_model
from research.training import fit, parallel, predict, state

EXPERIMENT = "long_tail"


@dataclasses.dataclass(frozen=True)
class Trainer:
  """What every arm of every ratio shares, built (and compiled) once.

  Attributes:
    run: the run context.
    model: the ResNet.
    tx: the optimizer.
    tx_alternating: the optimizer of the alternating schedule (its schedule and warm-up count
      two updates per step).
    eval_step: compiled `arms.embed_eval_step`.
  """

  run: fit.Run
  model: Any
  tx: optax.GradientTransformation
  tx_alternating: optax.GradientTransformation
  eval_step: Any

  def optimizer(self, settings: Settings, method: str) -> optax.GradientTransformation:
    """The optimizer of an arm (`tx_alternating` for an alternating dual arm)."""
    return self.tx_alternating if settings.updates_per_step(method) == 2 else self.tx


@dataclasses.dataclass(frozen=True)
class LongTailedData:
  """One imbalance ratio's data and the facts derived from its training counts.

  Attributes:
    condition: the records' condition, `rho<ratio>`.
    train: {"image": [N, H, W, C] uint8, "label": [N]} the long-tailed training set.
    test: the balanced test set, same layout.
    counts: [C] training images per class.
    head_mask: [C] bool head classes (METHODS.md M3 step 1).
  """

  condition: str
  train: dict
  test: dict
  counts: np.ndarray
  head_mask: np.ndarray

  @property
  def num_classes(self) -> int:
    """C."""
    return len(self.counts)


def config_for_ratio(config: ml_collections.ConfigDict, ratio: float) -> ml_collections.ConfigDict:
  """A copy of `config` whose `data.imbalance_ratio` is `ratio` (read by the data loader)."""
  out = config.copy_and_resolve_references()
  with out.unlocked():
    out.data.imbalance_ratio = float(ratio)
  return out


def make_trainer(
  config: ml_collections.ConfigDict, settings: Settings, run: fit.Run, num_classes: int
) -> Trainer:
  """The model, optimizer and compiled eval step every arm shares."""
  parallel.check_batch_divisible(settings.train.eval_batch_size, run.mesh, "train.eval_batch_size")
  model = build_model(config, num_classes)
  optim_alternating = config.optim.copy_and_resolve_references()
  with optim_alternating.unlocked():
    optim_alternating.warmup_steps = 2 * int(config.optim.warmup_steps)
  return Trainer(
    run=run,
    model=model,
    tx=state.make_optimizer(config.optim, settings.train.steps),
    tx_alternating=state.make_optimizer(optim_alternating, 2 * settings.train.steps),
    eval_step=parallel.compile_eval_step(functools.partial(arms.embed_eval_step, model=model)),
  )


def load_ratio(config: ml_collections.ConfigDict, settings: Settings, ratio: float):
  """The long-tailed training set of `ratio`, the balanced test set and the head set."""
  data = load_classification_data(config_for_ratio(config, ratio))
  counts = np.bincount(data["train"]["label"], minlength=data["num_classes"])
  head_mask = settings.head_mask(counts)
  settings.check_p_fits(data["num_classes"], int(head_mask.sum()))
  return LongTailedData(f"rho{ratio:g}", data["train"], data["test"], counts, head_mask)


def train_arm(
  settings: Settings, trainer: Trainer, data: LongTailedData, method: str, results: Results
) -> np.ndarray:
  """Trains and evaluates one arm for every seed; adds its records to `results`.

  Returns:
    [N_test, 2] PCA of the first seed's test embeddings, for the report's embedding plot.
  """
  run = trainer.run
  head_mask = settings.head_mask(data.counts, method)
  tx = trainer.optimizer(settings, method)
  step = parallel.compile_train_step(
    arms.train_step_fn(settings, method, trainer.model, head_mask, data.counts, tx), run.mesh
  )
  projection = None
  for seed in settings.seeds:
    arm_streams = arms.streams(settings, method, data.train, head_mask, seed)
    for prefix, (_, sampler) in arm_streams.items():
      field = "train.head_batch_size" if prefix == "head_" else "train.batch_size"
      parallel.check_batch_divisible(sampler.batch_size, run.mesh, field)
    rng = jax.random.key(seed)
    name = f"{data.condition}_{method}_seed{seed}"
    t = settings.train
    trained = fit.fit(
      run,
      fit.Phase(name, t.steps, t.log_every, t.checkpoint_every, settings.images_per_step(method)),
      params=fit.init_params(trainer.model, rng, data.train["image"][0]),
      tx=tx,
      step_fn=step,
      batch_fn=arms.streams_batch_fn(arm_streams, run.mesh),
      rng=jax.random.fold_in(rng, 1),
    )
    evaluate = functools.partial(
      predict.predict,
      trainer.eval_step,
      trained.params,
      batch_size=t.eval_batch_size,
      mesh=run.mesh,
      keys=("image", "label"),
    )
    test = evaluate(data.test, collect=("embedding", "pooled", "logits"), name=f"{name}_test")
    train_out = evaluate(data.train, collect=("embedding", "pooled"), name=f"{name}_train")
    test_labels = data.test["label"]
    preds = arms.predictions(
      train_out.per_example, test.per_example, data.train["label"], data.num_classes
    )
    records = {
      "steps": trained.steps,
      "updates": trained.steps * settings.updates_per_step(method),
    }
    for rule, pred in preds.items():
      acc = core.shot_group_accuracy(pred, test_labels, data.counts, settings.many, settings.few)
      records |= report.rule_metrics(rule, acc)
    if method in DUAL_METHODS:
      records["head_softmax"] = arms.head_softmax_accuracy(test["logits"], test_labels, head_mask)
    run.writer.write(
      trained.steps, {k: v for k, v in records.items() if "class" not in k}, phase=f"{name}_test"
    )
    results.add(method, seed, records, condition=data.condition)
    if projection is None:
      projection = report.pca_2d(test["embedding"])
  return projection


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs M3 and its baselines on every imbalance ratio and seed; writes the report.

  Returns:
    the run summary (also written to `<workdir>/summary.json`).
  """
  settings = Settings.from_config(config)
  run = fit.start_run(workdir, config)
  results = Results(
    EXPERIMENT,
    meta={
      "config": config.to_dict(),
      "images_per_step": {m: settings.images_per_step(m) for m in settings.methods},
      "updates_per_step": {m: settings.updates_per_step(m) for m in settings.methods},
      "ratios": [],
    },
  )
  trainer = None
  for ratio in settings.imbalance_ratios:
    data = load_ratio(config, settings, ratio)
    trainer = trainer or make_trainer(config, settings, run, data.num_classes)
    projections = {}
    for method in settings.methods:
      projection = train_arm(settings, trainer, data, method, results)
      if method in report.EMBEDDING_PLOT_ARMS:
        projections[method] = projection.tolist()
    results.meta["ratios"].append(
      {
        "ratio": ratio,
        "condition": data.condition,
        "counts": data.counts.tolist(),
        "head_classes": np.flatnonzero(data.head_mask).tolist(),
        "test_labels": data.test["label"].tolist(),
        "embeddings_2d": projections,
      }
    )
  results.meta["time_s"] = run.elapsed()
  results.save(workdir)
  return report.write_report(results, workdir)
