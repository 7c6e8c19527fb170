"""Baseline: supervised image classification with a ResNet (digits, or CIFAR/MNIST by name).

The methods compare against this experiment; it is also the simplest full example of the
codebase's pattern: validate the config, load arrays, build a pure step, run the shared loop
with checkpoints, evaluate, write metrics, plots and `report.md`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import ml_collections
import numpy as np

from research import config_checks
from research.data import catalogue, digits, embedded, samplers
from research.metrics import classification as cls_metrics
from research.models.resnet import ResNet
from research.training import harness, loop, parallel, report, state, steps

DATASETS = ("digits", "cifar10", "cifar100", "mnist")


def validate(config: ml_collections.ConfigDict) -> None:
  """Fails at once, naming the field, on any value the experiment cannot use."""
  config_checks.check_choice(config, "data.name", DATASETS)
  config_checks.check_float(config, "data.imbalance_ratio", 1.0)
  config_checks.check_int(config, "train.steps", 1)
  config_checks.check_int(config, "train.batch_size", 1)
  config_checks.check_int(config, "train.eval_batch_size", 1)
  config_checks.check_int(config, "train.log_every", 1)
  config_checks.check_int(config, "train.checkpoint_every", 0)
  config_checks.check_int(config, "model.embedding_dim", 1)


def load_classification_data(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Train/test arrays, class count and names for `config.data` (embedded or catalogue).

  A long-tailed training subset is taken when `data.imbalance_ratio` > 1.
  """
  name = config.data.name
  if name == "digits":
    arrays = embedded.digits_arrays(config.data.data_dir or None)
    num_classes, names = digits.NUM_CLASSES, digits.CLASS_NAMES
  else:
    arrays = {}
    for split in ("train", "test"):
      source, num_classes = catalogue.load(name, split, config.data.data_dir or None)
      arrays[split] = embedded.to_arrays(source)
    names = tuple(str(i) for i in range(num_classes))
  if config.data.imbalance_ratio > 1:
    labels = arrays["train"]["label"]
    if name == "digits":
      keep = digits.long_tailed_indices(labels, config.data.imbalance_ratio, seed=0)
    else:
      keep = catalogue.long_tailed_subset(labels, config.data.imbalance_ratio)
    arrays["train"] = {k: v[keep] for k, v in arrays["train"].items()}
  return {
    "train": arrays["train"],
    "test": arrays["test"],
    "num_classes": num_classes,
    "class_names": names,
  }


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> ResNet:
  """The ResNet of `config.model`."""
  m = config.model
  return ResNet(num_classes, tuple(m.stage_sizes), tuple(m.widths), m.embedding_dim, m.stem_strides)


def train_classifier(
  config: ml_collections.ConfigDict,
  run: harness.Run,
  data: dict[str, Any],
  sampler: Any,
  *,
  name: str = "train",
) -> tuple[ResNet, Any]:
  """Trains a ResNet with `sampler`'s batches; resumes from `<workdir>/<name>_checkpoints`.

  Returns:
    (model, final params).
  """
  model = build_model(config, data["num_classes"])
  parallel.check_batch_divisible(config.train.batch_size, run.mesh, "train.batch_size")
  rng = jax.random.key(config.seed)
  params = harness.init_params(model, rng, data["train"]["image"][0])
  tx = state.make_optimizer(config.optim, config.train.steps)
  train_state = parallel.replicate(state.create_train_state(params, tx), run.mesh)
  checkpointer = run.checkpointer(f"{name}_checkpoints")
  train_state, _ = loop.restore_or_init(checkpointer, train_state)
  step = parallel.compile_train_step(
    functools.partial(
      steps.train_step, loss_fn=functools.partial(steps.classification_loss, model=model), tx=tx
    ),
    run.mesh,
  )
  batch_fn = harness.sampled_batch_fn(data["train"], sampler, run.mesh, ("image", "label"))
  train_state = loop.train_loop(
    train_state,
    step,
    batch_fn,
    jax.random.fold_in(rng, 1),
    num_steps=config.train.steps,
    checkpointer=checkpointer,
    checkpoint_every=config.train.checkpoint_every,
    log_every=config.train.log_every,
    writer=run.writer,
    examples_per_step=config.train.batch_size,
    name=name,
  )
  checkpointer.close()
  return model, train_state.params


def evaluate_classifier(
  model: ResNet, params: Any, arrays: dict, num_classes: int, batch_size: int, run: harness.Run
) -> dict[str, np.ndarray]:
  """Confusion matrix, predictions and embeddings of a split."""
  parallel.check_batch_divisible(batch_size, run.mesh, "train.eval_batch_size")
  eval_step = parallel.compile_eval_step(
    functools.partial(steps.classification_eval_step, model=model, num_classes=num_classes)
  )
  return harness.evaluate(
    eval_step,
    params,
    arrays,
    batch_size,
    run.mesh,
    ("image", "label"),
    collect=("predictions", "embedding"),
  )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains the baseline classifier, evaluates it on the test split, writes the report.

  Returns:
    the run summary (also written to `<workdir>/summary.json`).
  """
  validate(config)
  run = harness.start_run(workdir)
  data = load_classification_data(config)
  sampler = samplers.RandomSampler(
    len(data["train"]["label"]), config.train.batch_size, config.seed
  )
  model, params = train_classifier(config, run, data, sampler)
  result = evaluate_classifier(
    model, params, data["test"], data["num_classes"], config.train.eval_batch_size, run
  )
  summary = cls_metrics.classification_summary(result["confusion"])
  run.writer.write(config.train.steps, summary, phase="test")
  per_class = cls_metrics.per_class_accuracy(result["confusion"])
  names = data["class_names"]
  report.plot_confusion(result["confusion"], names, run.plot_path("confusion.png"))
  report.plot_bars(
    {"test accuracy": per_class}, names, "accuracy", run.plot_path("per_class_accuracy.png")
  )
  majority = float(np.max(np.bincount(data["test"]["label"])) / len(data["test"]["label"]))
  table = report.markdown_table(
    ["metric", "value"],
    [[k, v] for k, v in summary.items()]
    + [["train examples", len(data["train"]["label"])], ["steps", config.train.steps]],
  )
  report.write_report(
    run.workdir,
    f"Supervised classification on {config.data.name}",
    [
      ("Test metrics", table),
      (
        "Per-class accuracy",
        report.markdown_table(["class", "accuracy"], list(zip(names, per_class))),
      ),
      ("Plots", "![confusion](plots/confusion.png)\n\n![per-class](plots/per_class_accuracy.png)"),
    ],
  )
  out = {
    "experiment": "supervised_classification",
    "dataset": config.data.name,
    "time_s": run.elapsed(),
    "metrics": summary,
    "rows": [harness.summary_row("test accuracy", summary["accuracy"], "majority class", majority)],
  }
  harness.write_summary(run.workdir, out)
  return out
