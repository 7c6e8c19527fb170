"""Baseline: supervised semantic segmentation on the embedded street scenes (or Cityscapes).

Trains the small `Segmenter` on the training domains and reports mIoU and pixel accuracy on
held-out images of those domains and on a held-out domain, against a per-position class prior
(the most frequent training class at each pixel position). The pattern is that of
`research.supervised.classification`: validate, `fit`, `predict`, `Results`, and `report.md`
from the results alone (`write_report`). The overlay panels (a few images, their labels and
predictions) are arrays rather than numbers: they are saved beside `results.json` in
`plot_arrays.npz` (`study.results.save_arrays` / `load_arrays`).
"""

from __future__ import annotations

import functools

import ml_collections
import numpy as np

from research import config_checks
from research.data import samplers, street_scenes
from research.data.segmentation import load_segmentation_data
from research.metrics import segmentation as seg_metrics
from research.metrics.classification import confusion_matrix
from research.models import resnet
from research.models.resnet import Segmenter
from research.study import figures, tables
from research.study.results import Results, load_arrays, save_arrays
from research.supervised import common
from research.training import fit, steps
from research.training.settings import TrainSettings

EXPERIMENT = "supervised_segmentation"
ARM = "segmenter"
PRIOR_ARM = "position_prior"
OVERLAY_IMAGES = 4


def validate(config: ml_collections.ConfigDict) -> TrainSettings:
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
  resnet.model_options(config)
  return TrainSettings.from_config(config)


def build_segmenter(config: ml_collections.ConfigDict, num_classes: int) -> Segmenter:
  """The `Segmenter` of `config.model` (`model.backbone`, default 'small'; `model.dtype`)."""
  return Segmenter(
    num_classes, decoder_width=config.model.decoder_width, **resnet.backbone_options(config)
  )


def train_segmenter(
  config: ml_collections.ConfigDict,
  run: fit.Run,
  train: dict[str, np.ndarray],
  num_classes: int,
  *,
  name: str = "train",
) -> tuple[Segmenter, fit.FitResult]:
  """Trains the segmenter on `train` ({"image": [N, H, W, 3], "semantic": [N, H, W]}).

  Resumes from `<workdir>/<name>_checkpoints`.

  Returns:
    (model, the phase's `FitResult`).
  """
  model = build_segmenter(config, num_classes)
  sampler = samplers.RandomSampler(len(train["image"]), config.train.batch_size, config.seed)
  result = common.fit_supervised(
    config, run, model, steps.segmentation_loss, train, sampler, ("image", "semantic"), name=name
  )
  return model, result


evaluate_segmenter = functools.partial(
  common.predict_confusion,
  steps.segmentation_eval_step,
  keys=("image", "semantic"),
  collect=("predictions",),
)
"""`evaluate_segmenter(model, params, arrays, num_classes, batch_size, run)`: the confusion
counts (`totals`, [K, K]) and label maps (`per_example`, [N, H, W]) of a split."""


def position_prior_confusion(
  train_semantic: np.ndarray, test_semantic: np.ndarray, num_classes: int
) -> np.ndarray:
  """Confusion of the baseline that predicts, at each pixel position, its most frequent class."""
  counts = np.stack([(train_semantic == c).sum(0) for c in range(num_classes)])
  prior = np.argmax(counts, 0)
  return confusion_matrix(test_semantic, np.broadcast_to(prior, test_semantic.shape), num_classes)


def iou_metrics(confusion: np.ndarray, class_names: list[str]) -> dict[str, float]:
  """mIoU, pixel accuracy and `iou/<class>` of a [K, K] confusion matrix."""
  iou = seg_metrics.per_class_iou(confusion)
  return {
    **seg_metrics.segmentation_summary(confusion),
    **{f"iou/{n}": v for n, v in zip(class_names, iou)},
  }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains the baseline segmenter and evaluates it per test domain; writes the report."""
  train = validate(config)
  run = fit.start_run(workdir, config)
  data = load_segmentation_data(config)
  k, names = data["num_classes"], list(data["class_names"])
  model, trained = train_segmenter(config, run, data["train"], k)
  results = Results(EXPERIMENT, meta={"dataset": config.data.name, "class_names": names})
  first = next(iter(data["test"]))
  for domain, arrays in data["test"].items():
    out = evaluate_segmenter(model, trained.params, arrays, k, train.eval_batch_size, run)
    metrics = iou_metrics(out["confusion"], names)
    summary = {m: metrics[m] for m in ("miou", "pixel_accuracy")}
    run.writer.write(train.steps, summary, phase=f"test_{domain}")
    results.add(ARM, config.seed, metrics, split=domain)
    prior = position_prior_confusion(data["train"]["semantic"], arrays["semantic"], k)
    results.add(PRIOR_ARM, config.seed, seg_metrics.segmentation_summary(prior), split=domain)
    if domain == first:
      shown = slice(0, OVERLAY_IMAGES)
      save_arrays(
        workdir,
        {
          "image": arrays["image"][shown],
          "semantic": arrays["semantic"][shown],
          "prediction": out["predictions"][shown],
        },
      )
  results.meta["time_s"] = run.elapsed()
  results.save(workdir)
  return write_report(results, workdir)


def write_report(results: Results, workdir: str) -> dict:
  """`report.md`, plots and `summary.json` from the saved results alone; returns the summary."""
  names = results.meta["class_names"]
  (seed,) = results.seeds()
  domains = list(dict.fromkeys(r.split for r in results.select(arm=ARM)))

  def value(arm: str, domain: str, metric: str) -> float:
    return results.per_seed(arm, metric, domain)[seed]

  iou = {d: [value(ARM, d, f"iou/{n}") for n in names] for d in domains}
  rows = [
    [d, value(ARM, d, "miou"), value(ARM, d, "pixel_accuracy"), value(PRIOR_ARM, d, "miou")]
    for d in domains
  ]
  figures.plot_bars(iou, names, "IoU", tables.plot_path(workdir, "per_class_iou.png"))
  panels = load_arrays(workdir)
  figures.plot_segmentation_rows(
    [
      (f"image {i}", [panels["image"][i], panels["semantic"][i], panels["prediction"][i]])
      for i in range(len(panels["image"]))
    ],
    len(names),
    tables.plot_path(workdir, "overlays.png"),
  )
  tables.write_report(
    workdir,
    f"Supervised segmentation on {results.meta['dataset']}",
    [
      (
        "Test metrics per domain",
        tables.markdown_table(["domain", "mIoU", "pixel accuracy", "position-prior mIoU"], rows),
      ),
      (
        "Per-class IoU",
        tables.markdown_table(
          ["class"] + domains, [[n] + [iou[d][i] for d in domains] for i, n in enumerate(names)]
        ),
      ),
      ("Plots", "![iou](plots/per_class_iou.png)\n\n![overlays](plots/overlays.png)"),
    ],
  )
  out = {
    "experiment": EXPERIMENT,
    "time_s": results.meta["time_s"],
    "metrics": {
      d: {
        "miou": value(ARM, d, "miou"),
        "pixel_accuracy": value(ARM, d, "pixel_accuracy"),
        "prior_miou": value(PRIOR_ARM, d, "miou"),
      }
      for d in domains
    },
    "rows": [
      tables.summary_row(
        "test mIoU (mean over domains)",
        float(np.mean([r[1] for r in rows])),
        "position prior",
        float(np.mean([r[3] for r in rows])),
      )
    ],
  }
  tables.write_summary(workdir, out)
  return out
