"""Experiment of METHODS.md M4: class-incremental panoptic fine-tuning without forgetting.

Step 0 trains a Mask2Former-style model on the *old* classes only (pixels of the other classes
are void: no target covers them). Step 1 fine-tunes it on other images that are labelled only
for the *new* classes (all of them also show old-class stuff, and many show cars). The step-1
variants (`settings.VARIANTS`), all from the step-0 parameters with the same images, steps and
optimizer:

- ``naive``: the new-class labels only (forgetting baseline);
- ``method``: the new-class labels plus old-class pseudo labels from the frozen step-0
  ("historical") model (M4 step 3), matched together (step 4), plus the distillation loss on
  old-class probabilities weighted by ``1 - p_no-object(historical)`` (step 5);
- ``joint``: every label of the step-1 images, old and new (the ceiling);
- ablations: ``no_pseudo`` (distillation only), ``no_distill`` (pseudo labels only),
  ``no_weighting`` (distillation weight 1), ``comformer`` (true-mask pixels removed from the
  pseudo masks instead of dropping matched masks, weight ``(1 - p_no-object)^2``) and
  ``true_wins`` (matched masks dropped, then true-mask pixels removed from the kept ones, so
  the label union is one panoptic labelling; default weight).

Every arm (``step0`` and each variant) is evaluated on held-out, fully labelled images with
PQ/SQ/RQ over the old, the new and all classes; the numbers are saved as `Results` records
(`pq_old`, `sq_new`, ..., `pq_class_<c>`) and `report.write_report` builds the report from them
(forgetting = PQ_old(step 0) - PQ_old(after step 1)). Data conventions: `research.data.panoptic`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from research.data import panoptic, samplers
from research.incremental_panoptic import fine_tuning, report
from research.incremental_panoptic.settings import VARIANTS, Settings
from research.metrics import panoptic as pq_metrics
from research.models import mask_matching
from research.models.mask_former import MaskFormer
from research.study.results import Results
from research.training import fit, parallel, predict

EXPERIMENT = "incremental_panoptic"
STEP0 = "step0"
PREDICTION_KEYS = ("segment_map", "segment_classes", "segment_valid")


def split_train(arrays: Mapping[str, np.ndarray], fraction: float, seed: int) -> tuple[dict, dict]:
  """Disjoint random step-0 / step-1 image sets (`fraction` of the images go to step 0)."""
  n = len(arrays["image"])
  perm = np.random.default_rng([seed, 7]).permutation(n)
  cut = min(max(int(round(fraction * n)), 1), n - 1)
  return panoptic.subset(arrays, perm[:cut]), panoptic.subset(arrays, perm[cut:])


def training_targets(train: Mapping[str, np.ndarray], settings: Settings) -> dict[str, dict]:
  """Padded targets of each training: `step0` (old classes) and step 1's `new` and `all`.

  Step 1 keeps only the images of its pool that show a new class.

  Raises:
    ValueError: when no step-1 image shows a new class.
  """
  old, new = list(settings.old_classes), list(settings.new_classes)
  targets = functools.partial(
    panoptic.panoptic_targets, mask_shape=settings.mask_shape, max_targets=settings.max_segments
  )
  step0_images, step1_pool = split_train(train, settings.step0_fraction, settings.seed)
  has_new = targets(step1_pool, new)["target_valid"].any(1)
  if not has_new.any():
    raise ValueError("no step-1 image shows a new class: use more images or other new_classes")
  step1_images = panoptic.subset(step1_pool, has_new)
  return {
    STEP0: targets(step0_images, old),
    "new": targets(step1_images, new),
    "all": targets(step1_images, old + new),
  }


def train_phase(
  settings: Settings,
  run: fit.Run,
  model: MaskFormer,
  tx: optax.GradientTransformation,
  compiled: dict,
  init: Any,
  hist_params: Any,
  targets: Mapping[str, np.ndarray],
  variant: str | None,
) -> Any:
  """Trains step 0 (`variant=None`) or one step-1 variant with `fit`; returns host params.

  Args:
    settings: the experiment's settings.
    run: the run context; checkpoints go to `<workdir>/step0_checkpoints` or
      `<workdir>/step1_<variant>_checkpoints`.
    model: the MaskFormer.
    tx: the optimizer.
    compiled: `{(spec, phase): step}`, filled on first use, so each compiles once.
    init: initial parameters.
    hist_params: frozen historical parameters (None in step 0).
    targets: padded targets (`panoptic.panoptic_targets`).
    variant: a key of `VARIANTS`, or None for step 0.

  Returns:
    the trained parameters (numpy).
  """
  mask_matching.check_num_targets(targets["target_valid"].sum(1), settings.model.num_queries)
  parallel.check_batch_divisible(settings.batch_size, run.mesh, "train.batch_size")
  which = STEP0 if variant is None else "step1"
  spec = settings.loss_spec(variant)
  schedule = getattr(settings, which)
  if (spec, which) not in compiled:
    compiled[spec, which] = fine_tuning.compile_step(settings, model, tx, spec, schedule, run.mesh)
  step = compiled[spec, which]
  # Host copies, so that the donated state never shares a buffer with the historical params.
  init = jax.device_get(init)
  hist = parallel.replicate(jax.device_get(hist_params), run.mesh) if spec.historical else None
  sampler = samplers.RandomSampler(len(targets["image"]), settings.batch_size, settings.seed)
  result = fit.fit(
    run,
    settings.phase(STEP0 if variant is None else f"step1_{variant}", which),
    params=init,
    tx=tx,
    step_fn=lambda s, batch, rng: step(s, hist, batch, rng),
    batch_fn=fit.sampled_batch_fn(dict(targets), sampler, run.mesh, panoptic.TARGET_KEYS),
    rng=jax.random.fold_in(jax.random.key(settings.seed), 1),
  )
  return jax.device_get(result.params)


def evaluate(
  predict_fn: Any, params: Any, test: Mapping[str, np.ndarray], settings: Settings, run: fit.Run
) -> tuple[dict[str, float], dict]:
  """PQ/SQ/RQ of one arm on the test split, plus its first `num_overlays` predictions.

  Returns:
    `({pq_old, sq_old, rq_old, pq_new, ..., rq_all: points, pq_class_<c>: points},
    {"maps": [K, S, S] segment ids, "tables": K x {segment id: class}})`; an empty group
    scores 0, a class that never occurs has PQ NaN.
  """
  out = predict.predict(
    predict_fn,
    params,
    dict(test),
    batch_size=settings.eval_batch_size,
    mesh=run.mesh,
    keys=("image",),
    collect=PREDICTION_KEYS,
    name="evaluate",
  )
  metric = pq_metrics.PanopticQuality(
    {c: c in settings.thing_classes for c in range(settings.num_classes)}
  )
  tables = []
  for i in range(out.num_examples):
    table = pq_metrics.segments_from_inference(out["segment_classes"][i], out["segment_valid"][i])
    truth = panoptic.ground_truth_segments(test, i)
    metric.update(out["segment_map"][i], table, test["panoptic"][i], truth)
    tables.append(table)
  scores = {}
  for group, classes in (("old", settings.old_classes), ("new", settings.new_classes)):
    scores[group] = metric.compute(classes)["all"]
  scores["all"] = metric.compute()["all"]
  record = {
    f"{k}_{group}": 100.0 * float(np.nan_to_num(s[k]))
    for group, s in scores.items()
    for k in ("pq", "sq", "rq")
  }
  per_class = metric.compute()["per_class"]
  record |= {f"pq_class_{c}": 100.0 * v["pq"] for c, v in per_class.items()}
  k = settings.num_overlays
  return record, {"maps": out["segment_map"][:k], "tables": tables[:k]}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Step 0, every step-1 variant, PQ of each; results, plots and report (M4).

  Returns:
    the run summary (also written to `<workdir>/summary.json`).
  """
  settings = Settings.from_config(config)
  run = fit.start_run(workdir, config)
  data = panoptic.load_panoptic_data(config)
  targets = training_targets(data["train"], settings)
  model = fine_tuning.build_model(settings.model, settings.num_classes)
  tx = fine_tuning.make_optimizer(settings.weight_decay)
  train = functools.partial(train_phase, settings, run, model, tx, {})
  predict_fn = jax.jit(
    functools.partial(
      fine_tuning.predict_panoptic,
      model=model,
      thing_mask=settings.thing_mask,
      inference=settings.inference,
    )
  )
  test = data["test"]
  k = settings.num_overlays
  overlays = {
    "image": test["image"][:k],
    "truth": test["panoptic"][:k],
    "truth_tables": [
      report.table_pairs({s: c for s, (c, _) in panoptic.ground_truth_segments(test, i).items()})
      for i in range(min(k, len(test["image"])))
    ],
    "maps": {},
    "tables": {},
  }
  results = Results(
    EXPERIMENT,
    meta={
      "dataset": config.data.name,
      "class_names": list(data["class_names"]),
      "old_classes": list(settings.old_classes),
      "new_classes": list(settings.new_classes),
      "steps": {STEP0: settings.step0.steps, "step1": settings.step1.steps},
      "num_images": {STEP0: len(targets[STEP0]["image"]), "step1": len(targets["new"]["image"])},
      "overlays": overlays,
    },
  )

  def record(arm: str, params: Any, phase: str, step: int) -> None:
    scores, shown = evaluate(predict_fn, params, test, settings, run)
    results.add(arm, settings.seed, scores)
    overlays["maps"][arm] = shown["maps"]
    overlays["tables"][arm] = [report.table_pairs(t) for t in shown["tables"]]
    run.writer.write(
      step, {f"{g}_pq": scores[f"pq_{g}"] for g in ("old", "new", "all")}, phase=phase
    )

  init = fit.init_params(model, jax.random.key(settings.seed), data["train"]["image"][0])
  hist_params = train(init, None, targets[STEP0], None)
  record(STEP0, hist_params, STEP0, 0)
  for variant in settings.variants:
    params = train(hist_params, hist_params, targets[VARIANTS[variant].labels], variant)
    record(variant, params, f"step1_{variant}", settings.step1.steps)
  results.meta["time_s"] = run.elapsed()
  results.save(workdir)
  return report.write_report(results, workdir)
