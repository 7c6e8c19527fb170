"""Experiment of METHODS.md M4: class-incremental panoptic fine-tuning over several steps.

Step 0 trains a Mask2Former-style model on the classes of `class_steps[0]` (pixels of the other
classes are void: no target covers them). Each incremental step `t` then trains every arm on
its own images (disjoint from the other steps'), labelled only for the classes of
`class_steps[t]`; each arm continues from *its own* model of step `t - 1`, which is also its
frozen historical model. Arms (`settings.VARIANTS`), with the same images, steps, batch size,
optimizer and seeds:

- ``naive``: the new-class labels only (forgetting baseline);
- ``method``: the new-class labels plus old-class pseudo labels of the historical model with
  the patent's rule (drop old masks that match a true mask; noise removal; overlaps to the most
  confident mask; area ratio), matched together, plus the distillation over old classes and
  no-object weighted by ``1 - p_no-object(historical)``;
- ``comformer``: CoMFormer's pseudo labels (true-mask pixels removed, nothing dropped) and
  distillation (student log-softmax over all classes, ``(1 - p_no-object)^2`` weights
  normalised by their sum, every decoder layer);
- ``joint``: every label of the classes learnt so far on the images of every step so far;
- `step1_only` arms at the first incremental step (ablations, the labelled extension
  ``true_wins`` and the joint-ceiling diagnostics).

After every step every arm is evaluated on held-out, fully labelled test images (PQ at the
labels' original resolution) over the step's old, new and all seen classes, per seed, as
`Results` records with condition `step<t>` (`pq_old`, ..., `pq_class_<c>`). At the first
incremental step the historical model's pseudo labels are also measured under each noise-
removal setting (`sensitivity`). `report.write_report` builds the report from the records.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from research.data import panoptic, samplers
from research.incremental_panoptic import core, fine_tuning, report
from research.incremental_panoptic.settings import VARIANTS, Settings
from research.metrics import panoptic as pq_metrics
from research.models import mask_matching
from research.study.results import Results
from research.training import fit, parallel, predict

EXPERIMENT = "incremental_panoptic"
STEP0 = "step0"
PREDICTION_KEYS = ("segment_map", "segment_classes", "segment_valid")


def step_images(train: Mapping[str, np.ndarray], settings: Settings, seed: int) -> list:
  """Image indices of each step, from disjoint random pools.

  Step 0 gets `step0_fraction` of the images, the rest is split evenly over the incremental
  steps, and each incremental pool keeps the images that show one of its new classes.

  Raises:
    ValueError: when a step has no image that shows one of its new classes.
  """
  n, k = len(train["image"]), settings.num_steps
  perm = np.random.default_rng([seed, 7]).permutation(n)
  cut = min(max(int(round(settings.step0_fraction * n)), 1), n - k)
  pools = [perm[:cut]] + np.array_split(perm[cut:], k)
  out = [np.sort(pools[0])]
  usable = train["segment_valid"] & ~train["segment_crowd"]
  for t in range(1, k + 1):
    shows = (usable & np.isin(train["segment_classes"], settings.new_classes(t))).any(1)
    index = np.sort(pools[t][shows[pools[t]]])
    if not len(index):
      raise ValueError(
        f"no image of step {t} shows one of its new classes {settings.new_classes(t)}: use "
        f"more images or other class_steps"
      )
    out.append(index)
  return out


class StepTargets:
  """`targets(labels, which, step)`: padded targets of a training, built once per seed.

  `labels`: `new` (the step's classes) or `seen` (every class so far); `which`: `step` (the
  step's images) or `seen` (every step's images so far). With `meta`, the per-class target
  counts and image counts are written into it (first seed: the joint-ceiling diagnostics).
  """

  def __init__(self, train, images: list, settings: Settings, meta: dict | None):
    self.train, self.images, self.settings, self.meta = train, images, settings, meta
    self.cache: dict = {}

  def __call__(self, labels: str, which: str, step: int) -> dict:
    """The targets of `labels` on `which` images at `step`."""
    key = (labels, which, step)
    if key not in self.cache:
      s = self.settings
      index = self.images[step] if which == "step" else np.concatenate(self.images[: step + 1])
      classes = s.new_classes(step) if labels == "new" else s.seen_classes(step)
      out = panoptic.panoptic_targets(
        panoptic.subset(self.train, index), classes, s.mask_shape, s.max_segments
      )
      if self.meta is not None:
        counts = np.bincount(out["target_classes"][out["target_valid"]], minlength=s.num_classes)
        self.meta["target_counts"][f"step{step}/{labels}/{which}"] = counts.tolist()
        self.meta["num_images"][f"step{step}/{which}"] = len(index)
      self.cache[key] = out
    return self.cache[key]


class Trainer:
  """Trains one phase with `fit`; compiled steps are shared by every step, arm and seed."""

  def __init__(self, settings: Settings, run: fit.Run, model, tx):
    self.settings, self.run, self.model, self.tx = settings, run, model, tx
    self.compiled: dict = {}

  def __call__(self, name, init, hist, targets, variant, step, seed) -> Any:
    """Trains `variant` (None: step 0) at incremental step `step`; returns host params."""
    s = self.settings
    mask_matching.check_num_targets(targets["target_valid"].sum(1), s.model.num_queries)
    parallel.check_batch_divisible(s.batch_size, self.run.mesh, "train.batch_size")
    spec = s.loss_spec(variant)
    if spec not in self.compiled:
      self.compiled[spec] = fine_tuning.compile_step(s, self.model, self.tx, spec, self.run.mesh)
    compiled = self.compiled[spec]
    if variant is None:
      steps, schedule = s.step0.steps, fine_tuning.schedule_array(s.step0)
    else:
      steps = s.step1.steps * VARIANTS[variant].steps_factor
      schedule = fine_tuning.schedule_array(s.step1, steps)
    old_mask = s.old_class_mask(step)
    hist = parallel.replicate(jax.device_get(hist), self.run.mesh) if spec.historical else None
    sampler = samplers.RandomSampler(len(targets["image"]), s.batch_size, 1000 * seed + step)
    result = fit.fit(
      self.run,
      s.phase(name, steps),
      params=jax.device_get(init),
      tx=self.tx,
      step_fn=lambda st, batch, rng: compiled(st, hist, old_mask, schedule, batch, rng),
      batch_fn=fit.sampled_batch_fn(dict(targets), sampler, self.run.mesh, panoptic.TARGET_KEYS),
      rng=jax.random.fold_in(jax.random.key(seed), 1 + step),
    )
    return jax.device_get(result.params)


def evaluate(predict_fn, params, data: Mapping, settings: Settings, run, step: int):
  """PQ/SQ/RQ of one model on the test split, at the labels' original resolution.

  Groups: `old` = classes learnt before `step`, `new` = the classes of `step`, `all` = both
  (for the step-0 model, `step=1`: its own classes and those it is about to learn).

  Returns:
    `({pq_old, ..., rq_all, pq_class_<c>: points}, {"maps", "tables"} of the first images)`.
  """
  test = data["test"]
  out = predict.predict(
    predict_fn, params, dict(test), batch_size=settings.eval_batch_size, mesh=run.mesh,
    keys=("image",), collect=PREDICTION_KEYS, name="evaluate",
  )  # fmt: skip
  metric = pq_metrics.PanopticQuality(
    {c: c in settings.thing_classes for c in range(settings.num_classes)}
  )
  tables = []
  for i in range(out.num_examples):
    table = pq_metrics.segments_from_inference(out["segment_classes"][i], out["segment_valid"][i])
    truth_map, truth_table = data["truth"][i]
    pred_map = panoptic.upsample_segment_map(out["segment_map"][i], truth_map.shape)
    metric.update(pred_map, table, truth_map, truth_table)
    tables.append(table)
  old, new = settings.old_classes(step), settings.new_classes(step)
  groups = {"old": old, "new": new, "all": old + new}
  record = {}
  for group, classes in groups.items():
    s = metric.compute(classes)["all"]
    record |= {f"{k}_{group}": 100.0 * float(np.nan_to_num(s[k])) for k in ("pq", "sq", "rq")}
  per_class = metric.compute()["per_class"]
  record |= {f"pq_class_{c}": 100.0 * v["pq"] for c, v in per_class.items()}
  k = settings.num_overlays
  return record, {"maps": out["segment_map"][:k], "tables": tables[:k]}


def pseudo_label_sensitivity(model, hist_params, targets, full_classes, settings, step):
  """Pseudo labels of the historical model on the step's images under each noise setting.

  Scored against the hidden full labels of those images (`full_classes` `[N, h, w]`, -1 where
  unlabelled), which no arm trains on. Per setting `(threshold, min area)`: pseudo masks and
  pixels per image, `precision` (share of pseudo pixels whose true class is the pseudo
  class, %), `on_new` (share of pseudo pixels on a pixel of a new class, %) and
  `new_claimed` (share of the new-class pixels that some pseudo mask claims, %).
  """
  old_mask = settings.old_class_mask(step)
  forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
  logits = [
    jax.device_get(forward(hist_params, targets["image"][i : i + 64].astype(np.float32) / 255.0))
    for i in range(0, len(targets["image"]), 64)
  ]
  cls = np.concatenate([o["class_logits"] for o in logits])
  masks = np.concatenate([o["mask_logits"] for o in logits])
  new = np.isin(full_classes, settings.new_classes(step))
  out = {}
  for threshold, area in settings.sensitivity:
    kwargs = settings.pseudo_kwargs(settings.loss_spec("method"))
    kwargs |= {"noise_threshold": threshold, "min_component_area": area}
    fn = jax.jit(jax.vmap(functools.partial(
      core.old_class_pseudo_labels, old_class_mask=jnp.asarray(old_mask), **kwargs
    )))  # fmt: skip
    p_masks, p_classes, p_valid = (np.array(a) for a in fn(
      cls, masks, targets["target_masks"], targets["target_valid"]
    ))  # fmt: skip
    p_masks &= p_valid[..., None, None]
    pixels = p_masks.sum()
    correct = (p_masks & (full_classes[:, None] == p_classes[..., None, None])).sum()
    on_new = (p_masks & new[:, None]).sum()
    claimed = (p_masks.any(1) & new).sum()
    out[f"noise_{threshold:g}_area_{area}"] = {
      "masks_per_image": float(p_valid.sum(1).mean()),
      "pixels_per_image": float(pixels / len(cls)),
      "precision": 100.0 * float(correct / max(pixels, 1)),
      "on_new": 100.0 * float(on_new / max(pixels, 1)),
      "new_claimed": 100.0 * float(claimed / max(new.sum(), 1)),
    }
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Step 0, every incremental step of every arm, seeds in one process; results and report.

  Returns:
    the run summary (also written to `<workdir>/summary.json`).
  """
  settings = Settings.from_config(config)
  run = fit.start_run(workdir, config)
  data = panoptic.load_panoptic_data(config)
  train = data["train"]
  model = fine_tuning.build_model(settings.model, settings.num_classes)
  trainer = Trainer(settings, run, model, fine_tuning.make_optimizer(settings.weight_decay))
  predict_fn = jax.jit(
    functools.partial(
      fine_tuning.predict_panoptic, model=model, thing_mask=settings.thing_mask,
      inference=settings.inference,
    )
  )  # fmt: skip
  test, k = data["test"], settings.num_overlays
  overlays = {
    "image": test["image"][:k],
    "truth": test["panoptic"][:k],
    "truth_tables": [
      report.table_pairs({s: c for s, (c, _) in data["truth"][i][1].items()})
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
      "class_steps": [list(c) for c in settings.class_steps],
      "seeds": list(settings.seeds),
      "steps": {STEP0: settings.step0.steps, "increment": settings.step1.steps},
      "steps_factor": {a: VARIANTS[a].steps_factor for a in settings.arms(1)},
      "truncated": {
        split: {
          "images": int((data[split]["segment_truncated"] > 0).sum()),
          "segments": int(data[split]["segment_truncated"].sum()),
          "max_segments": settings.max_segments,
        }
        for split in ("train", "test")
      },
      "num_images": {},
      "target_counts": {},
      "overlays": overlays,
    },
  )

  def record(arm: str, seed: int, params: Any, step: int, condition: str) -> None:
    scores, shown = evaluate(predict_fn, params, data, settings, run, step)
    results.add(arm, seed, scores, condition=condition)
    if seed == settings.seed and (step == settings.num_steps or arm == STEP0):
      overlays["maps"][arm] = shown["maps"]
      overlays["tables"][arm] = [report.table_pairs(t) for t in shown["tables"]]
    run.writer.write(step, {f"{arm}_{g}_pq": scores[f"pq_{g}"] for g in ("old", "new")})

  for seed in settings.seeds:
    images = step_images(train, settings, seed)
    targets = StepTargets(train, images, settings, results.meta if seed == settings.seed else None)
    init = fit.init_params(model, jax.random.key(seed), train["image"][0])
    step0 = trainer(f"seed{seed}_step0", init, None, targets("new", "step", 0), None, 0, seed)
    record(STEP0, seed, step0, 1, STEP0)
    models = {arm: step0 for arm in settings.variants}
    for t in range(1, settings.num_steps + 1):
      updated = {}
      for arm in settings.arms(t):
        v = VARIANTS[arm]
        start = models.get(arm, step0)
        params = trainer(
          f"seed{seed}_step{t}_{arm}", start, start, targets(v.labels, v.images, t), arm, t, seed
        )
        record(arm, seed, params, t, f"step{t}")
        if arm in settings.variants:
          updated[arm] = params
      if t == 1 and settings.sensitivity:
        full = panoptic.class_map(panoptic.subset(train, images[1]), settings.mask_shape)
        rows = pseudo_label_sensitivity(model, step0, targets("new", "step", 1), full, settings, 1)
        for name, metrics in rows.items():
          results.add("pseudo_labels", seed, metrics, condition=name)
      models = updated
      results.meta["time_s"] = run.elapsed()
      results.save(workdir)
  results.meta["time_s"] = run.elapsed()
  results.save(workdir)
  return report.write_report(results, workdir)
