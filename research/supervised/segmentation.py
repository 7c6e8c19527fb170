"""Baseline: supervised semantic segmentation on the embedded street scenes (or Cityscapes).

Trains the small `Segmenter` on the training domains and reports mIoU and pixel accuracy on
held-out images of those domains and on a held-out domain, against a per-position class prior
(the most frequent training class at each pixel position).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import ml_collections
import numpy as np

from research import config_checks
from research.data import catalogue, embedded, samplers, street_scenes
from research.metrics import segmentation as seg_metrics
from research.models.resnet import Segmenter
from research.training import harness, loop, parallel, report, state, steps


def validate(config: ml_collections.ConfigDict) -> None:
  """Fails at once, naming the field, on any value the experiment cannot use."""
  config_checks.check_choice(config, "data.name", ("street_scenes", "cityscapes"))
  if config.data.name == "street_scenes":
    for field in ("data.train_domains", "data.heldout_domains"):
      domains = config_checks.get_field(config, field)
      bad = [d for d in domains if d not in street_scenes.DOMAINS]
      if bad or not domains:
        raise config_checks.ConfigError(
          f"config.{field}={tuple(domains)} is not allowed: give one or more of "
          f"{street_scenes.DOMAINS}"
        )
    config_checks.check_int(config, "data.image_size", 16)
  config_checks.check_int(config, "train.steps", 1)
  config_checks.check_int(config, "train.batch_size", 1)
  config_checks.check_int(config, "train.eval_batch_size", 1)


def load_segmentation_data(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{"train", "test": {domain: arrays}, "num_classes", "class_names"} for `config.data`."""
  d = config.data
  if d.name == "cityscapes":
    train, num_classes = catalogue.load("cityscapes", "train", d.data_dir or None)
    test, _ = catalogue.load("cityscapes", "validation", d.data_dir or None)
    return {
      "train": embedded.to_arrays(train),
      "test": {"validation": embedded.to_arrays(test)},
      "num_classes": num_classes,
      "class_names": catalogue.CITYSCAPES_CLASS_NAMES,
    }
  kwargs = dict(
    image_size=d.image_size,
    train_per_domain=d.train_per_domain,
    test_per_domain=d.test_per_domain,
    data_dir=d.data_dir or None,
  )
  train = embedded.street_arrays(tuple(d.train_domains), "train", **kwargs)
  test = {
    dom: embedded.street_arrays((dom,), "test", **kwargs)
    for dom in tuple(d.train_domains) + tuple(d.heldout_domains)
  }
  return {
    "train": train,
    "test": test,
    "num_classes": street_scenes.NUM_CLASSES,
    "class_names": street_scenes.CLASS_NAMES,
  }


def build_segmenter(config: ml_collections.ConfigDict, num_classes: int) -> Segmenter:
  """The `Segmenter` of `config.model`."""
  m = config.model
  return Segmenter(num_classes, tuple(m.stage_sizes), tuple(m.widths), m.decoder_width)


def train_segmenter(
  config: ml_collections.ConfigDict, run: harness.Run, data: dict[str, Any], *, name: str = "train"
) -> tuple[Segmenter, Any]:
  """Trains the segmenter; resumes from `<workdir>/<name>_checkpoints`. Returns (model, params)."""
  model = build_segmenter(config, data["num_classes"])
  parallel.check_batch_divisible(config.train.batch_size, run.mesh, "train.batch_size")
  rng = jax.random.key(config.seed)
  params = harness.init_params(model, rng, data["train"]["image"][0])
  tx = state.make_optimizer(config.optim, config.train.steps)
  train_state = parallel.replicate(state.create_train_state(params, tx), run.mesh)
  checkpointer = run.checkpointer(f"{name}_checkpoints")
  train_state, _ = loop.restore_or_init(checkpointer, train_state)
  step = parallel.compile_train_step(
    functools.partial(
      steps.train_step, loss_fn=functools.partial(steps.segmentation_loss, model=model), tx=tx
    ),
    run.mesh,
  )
  sampler = samplers.RandomSampler(
    len(data["train"]["image"]), config.train.batch_size, config.seed
  )
  batch_fn = harness.sampled_batch_fn(data["train"], sampler, run.mesh, ("image", "semantic"))
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


def evaluate_segmenter(
  model: Segmenter, params: Any, arrays: dict, num_classes: int, batch_size: int, run: harness.Run
) -> np.ndarray:
  """[K, K] confusion counts of the segmenter on a split."""
  parallel.check_batch_divisible(batch_size, run.mesh, "train.eval_batch_size")
  eval_step = parallel.compile_eval_step(
    functools.partial(steps.segmentation_eval_step, model=model, num_classes=num_classes)
  )
  return harness.evaluate(eval_step, params, arrays, batch_size, run.mesh, ("image", "semantic"))[
    "confusion"
  ]


def position_prior_confusion(
  train_semantic: np.ndarray, test_semantic: np.ndarray, num_classes: int
) -> np.ndarray:
  """Confusion of the baseline that predicts, at each pixel position, its most frequent class."""
  from research.metrics.classification import confusion_matrix

  counts = np.stack([(train_semantic == c).sum(0) for c in range(num_classes)])
  prior = np.argmax(counts, 0)
  return confusion_matrix(test_semantic, np.broadcast_to(prior, test_semantic.shape), num_classes)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains the baseline segmenter and evaluates it per test domain; writes the report."""
  validate(config)
  run = harness.start_run(workdir)
  data = load_segmentation_data(config)
  k = data["num_classes"]
  model, params = train_segmenter(config, run, data)
  rows, per_domain = [], {}
  for domain, arrays in data["test"].items():
    confusion = evaluate_segmenter(model, params, arrays, k, config.train.eval_batch_size, run)
    prior = position_prior_confusion(data["train"]["semantic"], arrays["semantic"], k)
    summary = seg_metrics.segmentation_summary(confusion)
    per_domain[domain] = {
      **summary,
      "prior_miou": seg_metrics.segmentation_summary(prior)["miou"],
      "iou": seg_metrics.per_class_iou(confusion),
    }
    run.writer.write(config.train.steps, summary, phase=f"test_{domain}")
    rows.append(
      [domain, summary["miou"], summary["pixel_accuracy"], per_domain[domain]["prior_miou"]]
    )
  names = data["class_names"]
  report.plot_bars(
    {d: v["iou"] for d, v in per_domain.items()}, names, "IoU", run.plot_path("per_class_iou.png")
  )
  first = next(iter(data["test"].values()))
  preds = _predict(model, params, first["image"][:4])
  report.plot_segmentation_rows(
    [(f"image {i}", [first["image"][i], first["semantic"][i], preds[i]]) for i in range(4)],
    k,
    run.plot_path("overlays.png"),
  )
  report.write_report(
    run.workdir,
    f"Supervised segmentation on {config.data.name}",
    [
      (
        "Test metrics per domain",
        report.markdown_table(["domain", "mIoU", "pixel accuracy", "position-prior mIoU"], rows),
      ),
      (
        "Per-class IoU",
        report.markdown_table(
          ["class"] + list(per_domain),
          [[n] + [v["iou"][i] for v in per_domain.values()] for i, n in enumerate(names)],
        ),
      ),
      ("Plots", "![iou](plots/per_class_iou.png)\n\n![overlays](plots/overlays.png)"),
    ],
  )
  mean_miou = float(np.mean([v["miou"] for v in per_domain.values()]))
  mean_prior = float(np.mean([v["prior_miou"] for v in per_domain.values()]))
  out = {
    "experiment": "supervised_segmentation",
    "time_s": run.elapsed(),
    "metrics": {d: {k2: v2 for k2, v2 in v.items() if k2 != "iou"} for d, v in per_domain.items()},
    "rows": [
      harness.summary_row("test mIoU (mean over domains)", mean_miou, "position prior", mean_prior)
    ],
  }
  harness.write_summary(run.workdir, out)
  return out


def _predict(model: Segmenter, params: Any, images: np.ndarray) -> np.ndarray:
  logits = model.apply({"params": params}, steps.images_to_float(images))["logits"]
  return np.asarray(jax.device_get(logits.argmax(-1)))
