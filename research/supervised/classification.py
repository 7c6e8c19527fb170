"""Baseline: supervised image classification with a ResNet (digits, or CIFAR/MNIST by name).

The methods compare against this experiment; it is also the simplest full example of the
codebase's pattern: validate the config into settings, load arrays, build a pure step, train
one phase with `fit`, evaluate with `predict`, record the numbers as `Results`, and build
`report.md` from those results alone (`write_report`, which `launch.report` reruns).
"""

from __future__ import annotations

import functools
from typing import Any

import ml_collections
import numpy as np

from research import config_checks
from research.data import samplers
from research.data.classification import load_classification_data
from research.metrics import classification as cls_metrics
from research.models import resnet
from research.models.resnet import ResNet
from research.study import figures, tables
from research.study.results import Results
from research.supervised import common
from research.training import fit, steps
from research.training.settings import TrainSettings

EXPERIMENT = "supervised_classification"
ARM = "resnet"

DATASETS = ("digits", "cifar10", "cifar100", "mnist")


def validate(config: ml_collections.ConfigDict) -> TrainSettings:
  """Fails at once, naming the field, on any value the experiment cannot use."""
  config_checks.check_choice(config, "data.name", DATASETS)
  config_checks.check_float(config, "data.imbalance_ratio", 1.0)
  config_checks.check_int(config, "model.embedding_dim", 1)
  resnet.model_options(config)
  return TrainSettings.from_config(config)


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> ResNet:
  """The ResNet of `config.model` (`model.backbone`, default 'small'; `model.dtype`, 'float32')."""
  m = config.model
  return ResNet(
    num_classes,
    embedding_dim=m.embedding_dim,
    stem_strides=m.stem_strides,
    **resnet.backbone_options(config),
  )


def train_classifier(
  config: ml_collections.ConfigDict,
  run: fit.Run,
  data: dict[str, Any],
  sampler: Any,
  *,
  name: str = "train",
) -> tuple[ResNet, fit.FitResult]:
  """Trains a ResNet with `sampler`'s batches; resumes from `<workdir>/<name>_checkpoints`.

  Returns:
    (model, the phase's `FitResult`).
  """
  model = build_model(config, data["num_classes"])
  result = common.fit_supervised(
    config,
    run,
    model,
    steps.classification_loss,
    data["train"],
    sampler,
    ("image", "label"),
    name=name,
  )
  return model, result


evaluate_classifier = functools.partial(
  common.predict_confusion,
  steps.classification_eval_step,
  keys=("image", "label"),
  collect=("predictions", "embedding"),
)
"""`evaluate_classifier(model, params, arrays, num_classes, batch_size, run)`: the confusion
matrix (`totals`), predictions and embeddings (`per_example`) of a split."""


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains the baseline classifier, evaluates it on the test split, writes the report.

  Returns:
    the run summary (also written to `<workdir>/summary.json`).
  """
  train = validate(config)
  run = fit.start_run(workdir, config)
  data = load_classification_data(config)
  sampler = samplers.RandomSampler(len(data["train"]["label"]), train.batch_size, config.seed)
  model, trained = train_classifier(config, run, data, sampler)
  out = evaluate_classifier(
    model, trained.params, data["test"], data["num_classes"], train.eval_batch_size, run
  )
  confusion = out["confusion"]
  summary = cls_metrics.classification_summary(confusion)
  run.writer.write(train.steps, summary, phase="test")
  test_labels = data["test"]["label"]
  results = Results(
    EXPERIMENT,
    meta={
      "dataset": config.data.name,
      "class_names": list(data["class_names"]),
      "train_examples": len(data["train"]["label"]),
      "steps": trained.steps,
      "confusion": confusion.tolist(),
      "majority": float(np.max(np.bincount(test_labels)) / len(test_labels)),
      "time_s": run.elapsed(),
    },
  )
  results.add(ARM, config.seed, summary)
  results.save(workdir)
  return write_report(results, workdir)


def write_report(results: Results, workdir: str) -> dict:
  """`report.md`, plots and `summary.json` from the saved results alone; returns the summary."""
  meta = results.meta
  (seed,) = results.seeds()
  summary = {r.metric: r.value for r in results.select(arm=ARM, seed=seed, split="test")}
  confusion = np.asarray(meta["confusion"], np.int64)
  names = meta["class_names"]
  per_class = cls_metrics.per_class_accuracy(confusion)
  figures.plot_confusion(confusion, names, tables.plot_path(workdir, "confusion.png"))
  figures.plot_bars(
    {"test accuracy": per_class},
    names,
    "accuracy",
    tables.plot_path(workdir, "per_class_accuracy.png"),
  )
  table = tables.markdown_table(
    ["metric", "value"],
    [[k, v] for k, v in summary.items()]
    + [["train examples", meta["train_examples"]], ["steps", meta["steps"]]],
  )
  tables.write_report(
    workdir,
    f"Supervised classification on {meta['dataset']}",
    [
      ("Test metrics", table),
      (
        "Per-class accuracy",
        tables.markdown_table(["class", "accuracy"], list(zip(names, per_class))),
      ),
      ("Plots", "![confusion](plots/confusion.png)\n\n![per-class](plots/per_class_accuracy.png)"),
    ],
  )
  out = {
    "experiment": EXPERIMENT,
    "dataset": meta["dataset"],
    "time_s": meta["time_s"],
    "metrics": summary,
    "rows": [
      tables.summary_row("test accuracy", summary["accuracy"], "majority class", meta["majority"])
    ],
  }
  tables.write_summary(workdir, out)
  return out
