"""M5 experiment: training on clean plus OT-matched perturbed images (METHODS.md M5, seed 004).

Arms (same data, batches, optimizer, step limit and stopping rule): `clean` (clean-only),
`ot` (this method: loss1 + loss2 on the target set of k signed ascent steps on the feature
matching distance `D`, rebuilt from the current parameters every step from step 2's
perturbed set, drawn once per image before the loop with `ot.initial_set='fixed'`, the
patent's order, or every step with 'redraw'), `ot_redraw` (the method redrawing its set every
step, an ablation) and `pgd` (PGD adversarial training with the same eps and ascent steps).
Step 7 for every arm alike (`ConvergenceCheck`): at each log point the arm's OWN target loss
(loss1, or loss1 + loss2) at the current parameters on a fixed convergence batch is compared
with `train.loss_threshold`; else the step limit. Each model is evaluated on all test images:
clean, under uniform noise of the same eps, under the OT attack of step 5 and under PGD
(mAP@0.5 and mAP@[.5:.95], or accuracy); draws are keyed per image and padding rows take no
part in any attack, so no figure depends on the evaluation batch size. The numbers become
`Results`; `report.write_report` builds the report from them alone.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from research.data import detection, samplers
from research.data.classification import load_classification_data
from research.metrics import detection as det_metrics
from research.ot_perturbation import core, report, task
from research.ot_perturbation.settings import CONDITIONS, Settings, Spec
from research.study.results import Results
from research.training import fit, parallel, predict, state

EXPERIMENT = "ot_perturbation"
PLOTTED_CONDITIONS = ("clean", "ot_attack", "pgd")  # of the first seed's OT model
PLOTTED_IMAGES = 4


def load_data(config: ml_collections.ConfigDict, settings: Settings) -> dict[str, Any]:
  """The task's data; the test split is cut to `settings.max_test_examples`.

  The training split gets `index` (`[N]` int32, each image's position), which keys the
  image's perturbed set of step 2.
  """
  if settings.task == "detection":
    data = detection.load_detection_data(config)
  else:
    data = load_classification_data(config)
  n = settings.max_test_examples
  data["test"] = {k: v[:n] for k, v in data["test"].items()}
  data["train"]["index"] = np.arange(len(data["train"]["image"]), dtype=np.int32)
  settings.check_convergence_batch(len(data["train"]["image"]))
  return data


# --------------------------------------------------------------------------------------------
# Training with the convergence rule of step 7.


@dataclasses.dataclass
class ConvergenceCheck:
  """Step 7 as `fit`'s stop hook, the same rule for every arm.

  At every log point the arm's own target loss at the state's current parameters on the
  convergence batch (`target_loss_fn(params)`) is compared with the threshold
  (`core.stop_reason`); the logged batch losses play no part. The last value is kept and saved
  with each checkpoint (`extras`).

  Attributes:
    rule: the threshold and step limit.
    target_loss_fn: `params -> {"loss", ...}` on the convergence batch.
    writer: where the value is logged (phase `<name>/convergence`), or None.
    name: the training's phase name.
    loss: the last target loss (NaN before the first log point).
  """

  rule: core.ConvergenceRule
  target_loss_fn: Callable[[Any], dict]
  writer: Any = None
  name: str = "train"
  loss: float = math.nan

  def __call__(self, step: int, metrics: dict[str, float], train_state: Any) -> str | None:
    """The loop's stop hook: `'converged'` or None (the step limit is the loop's own)."""
    del metrics
    values = {
      k: float(v) for k, v in jax.device_get(self.target_loss_fn(train_state.params)).items()
    }
    self.loss = values["loss"]
    if self.writer is not None:
      self.writer.write(
        step, {f"target_{k}": v for k, v in values.items()}, phase=f"{self.name}/convergence"
      )
    return "converged" if core.stop_reason(self.loss, step, self.rule) == "converged" else None

  def extras(self) -> dict:
    """Saved with every checkpoint."""
    return {"loss": self.loss}


def convergence_batch(data: dict, settings: Settings, run: fit.Run) -> dict:
  """The first `convergence_batch_size` training images (with `index`), placed on the mesh."""
  n = settings.convergence_batch_size
  parallel.check_batch_divisible(n, run.mesh, "train.convergence_batch_size")
  keys = task.train_batch_keys(settings.task)
  return parallel.shard_batch({k: data["train"][k][:n] for k in keys}, run.mesh)


def compile_training(
  config: ml_collections.ConfigDict, model: Any, spec: Spec, arm: str, run: fit.Run
) -> tuple[optax.GradientTransformation, Callable, Callable]:
  """(optimizer, jitted train step, jitted `task.target_loss`) of an arm, shared by its seeds."""
  training, initial_set = task.arm_training(arm, spec)
  tx = state.make_optimizer(config.optim, config.train.steps)
  step = parallel.compile_train_step(
    task.bound_train_step(model, tx, spec, training, initial_set), run.mesh
  )
  loss = jax.jit(functools.partial(task.target_loss, model=model, spec=spec, training=training))
  return tx, step, loss


def train_model(
  settings: Settings,
  run: fit.Run,
  data: dict,
  model: Any,
  arm: str,
  seed: int,
  compiled: tuple[optax.GradientTransformation, Callable, Callable],
  check_batch: dict,
) -> tuple[Any, dict]:
  """Trains one model with the step-7 rule; resumes from `<workdir>/<name>_checkpoints`.

  `name` is `<arm>_seed<seed>_train`; the seed sets the initial parameters, the batch order
  and the random draws. A model stored as converged is not trained again on a rerun.
  `compiled` is `compile_training`'s output for `arm`, `check_batch` `convergence_batch`'s.

  Returns:
    (params, {"stop_reason": 'converged' | 'step_limit', "steps": int, "loss": the last
    target loss on the convergence batch}).
  """
  name = f"{arm}_seed{seed}_train"
  train = settings.train
  parallel.check_batch_divisible(train.batch_size, run.mesh, "train.batch_size")
  rng = jax.random.key(seed)
  loop_rng = jax.random.fold_in(rng, 1)
  tx, step, target_loss = compiled
  hook = ConvergenceCheck(
    core.ConvergenceRule(settings.loss_threshold, train.steps),
    lambda params: target_loss(params, check_batch, loop_rng),
    run.writer,
    name,
  )
  sampler = samplers.RandomSampler(len(data["train"]["image"]), train.batch_size, seed)
  keys = task.train_batch_keys(settings.task)
  result = fit.fit(
    run,
    fit.Phase.from_train_config(name, train),
    params=fit.init_params(model, rng, data["train"]["image"][0]),
    tx=tx,
    step_fn=step,
    batch_fn=fit.sampled_batch_fn(data["train"], sampler, run.mesh, keys),
    rng=loop_rng,
    should_stop=hook,
    extras_fn=hook.extras,
  )
  loss = result.extras.get("loss", math.nan) if math.isnan(hook.loss) else hook.loss
  stop = {"stop_reason": result.stop_reason, "steps": result.steps, "loss": loss}
  run.writer.write(
    result.steps, {"converged": float(result.stop_reason == "converged")}, phase=name
  )
  return result.params, stop


# --------------------------------------------------------------------------------------------
# Evaluation.


def compile_eval_steps(model: Any, spec: Spec) -> dict[str, Callable]:
  """`{condition: jitted task.eval_step(params, batch, key)}`, shared by the trained models."""
  return {
    c: jax.jit(functools.partial(task.eval_step, model=model, spec=spec, condition=c))
    for c in CONDITIONS
  }


def condition_key(seed: int, condition: str) -> jax.Array:
  """The key of a condition's random starts for the models of `seed`."""
  return jax.random.key(seed + 1000 * CONDITIONS.index(condition))


def evaluate_model(
  params: Any,
  eval_steps: dict[str, Callable],
  test: dict,
  spec: Spec,
  batch_size: int,
  run: fit.Run,
  seed: int,
) -> dict[str, dict[str, float]]:
  """Metrics of one model on the test split under every condition.

  Raises:
    FloatingPointError: on non-finite features or outputs (`task.check_finite`).

  Returns:
    `{condition: {"map50", "map"}}` (detection) or `{condition: {"accuracy"}}`.
  """
  collect = ("predictions",) if spec.task == "classification" else ("boxes", "scores", "classes")
  results = {}
  for condition in CONDITIONS:
    fn = functools.partial(eval_steps[condition], key=condition_key(seed, condition))
    keys = task.batch_keys(spec.task)
    out = predict.predict(
      fn,
      params,
      test,
      batch_size=batch_size,
      mesh=run.mesh,
      keys=keys,
      collect=collect + ("finite",),
      name=f"eval {condition}",
    )
    task.check_finite(out["finite"], condition)
    if spec.task == "classification":
      results[condition] = {"accuracy": float(np.mean(out["predictions"] == test["label"]))}
      continue
    boxes = np.clip(out["boxes"], 0, None)
    dets = list(zip(boxes, out["scores"], out["classes"], strict=True))
    gts = detection.ground_truths(test)
    results[condition] = {
      "map50": det_metrics.mean_average_precision(dets, gts, spec.num_classes)["map"],
      "map": det_metrics.mean_average_precision(
        dets, gts, spec.num_classes, det_metrics.COCO_IOU_THRESHOLDS
      )["map"],
    }
  return results


def plot_data(
  params: Any,
  eval_steps: dict[str, Callable],
  test: dict,
  spec: Spec,
  model: Any,
  batch_size: int,
  run: fit.Run,
  seed: int,
) -> dict:
  """The arrays the report draws: the OT plan of the first attack group and a few detections.

  The first batch is evaluated again as in `evaluate_model` (same keys, same outputs).

  Returns:
    `{"transport_plan": {"plan", "cost"} [G, G]}`, plus for detection `{"detections":
    {"ground_truth": per image {"boxes", "classes"}, condition: per image {"image" uint8,
    "boxes", "scores", "classes"}}}` of the first `PLOTTED_IMAGES` images.
  """
  batch = next(predict.padded_batches(test, batch_size, task.batch_keys(spec.task)))
  valid = batch["valid"]
  device_batch = parallel.shard_batch(batch, run.mesh)
  out = {}
  for condition in PLOTTED_CONDITIONS:
    got = eval_steps[condition](params, device_batch, key=condition_key(seed, condition))
    out[condition] = {k: np.asarray(v)[valid] for k, v in jax.device_get(got).items()}
  g = min(spec.ot.group_size, len(out["clean"]["images"]))  # the first group's real images
  plan_fn = jax.jit(functools.partial(task.transport_plan, model=model, spec=spec))
  clean, attacked = out["clean"]["images"][:g], out["ot_attack"]["images"][:g]
  plan, cost = jax.device_get(plan_fn(params, clean, attacked, np.ones(g, np.float32)))
  data = {"transport_plan": {"plan": report.rounded(plan), "cost": report.rounded(cost)}}
  if spec.task == "detection":
    n = min(PLOTTED_IMAGES, len(out["clean"]["images"]))
    gts = detection.ground_truths({k: v[:n] for k, v in test.items()})
    data["detections"] = {"ground_truth": [{"boxes": b, "classes": c} for b, c in gts]}
    for condition, o in out.items():
      images = np.round(np.clip(o["images"][:n], 0, 1) * 255).astype(np.uint8)
      data["detections"][condition] = [
        {
          "image": report.encode_image(images[i]),
          "boxes": report.rounded(o["boxes"][i]),
          "scores": report.rounded(o["scores"][i]),
          "classes": o["classes"][i],
        }
        for i in range(n)
      ]
  return data


# --------------------------------------------------------------------------------------------
# The experiment.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains every arm per seed under one stopping rule; evaluates and reports them.

  Every arm runs for each seed of `settings.seeds`; per-seed numbers are `Results` records
  (test split: one condition per evaluation; train split: steps, converged, the last target
  loss on the convergence batch, wall seconds), saved to `<workdir>/results.json` after every
  training (so an interrupted run keeps what it finished) before the report is built.

  Returns:
    the run summary (also written to `<workdir>/summary.json`).
  """
  settings = Settings.from_config(config)
  run = fit.start_run(workdir, config)
  data = load_data(config, settings)
  model = task.build_task_model(config, settings.task, data["num_classes"])
  spec = settings.spec(data["num_classes"], data["train"]["image"].shape[1:])
  parallel.check_batch_divisible(settings.train.eval_batch_size, run.mesh, "train.eval_batch_size")
  check_batch = convergence_batch(data, settings, run)
  eval_steps = compile_eval_steps(model, spec)
  compiled = {arm: compile_training(config, model, spec, arm, run) for arm in settings.trainings}
  train = settings.train
  results = Results(
    EXPERIMENT,
    meta={
      "task": settings.task,
      "dataset": settings.dataset,
      "class_names": list(data["class_names"]),
      "test_images": len(data["test"]["image"]),
      "train_images": len(data["train"]["image"]),
      "setup": settings.setup(),
    },
  )
  for seed in settings.seeds:
    for arm in settings.trainings:
      started = run.elapsed()
      params, stop = train_model(settings, run, data, model, arm, seed, compiled[arm], check_batch)
      metrics = evaluate_model(
        params, eval_steps, data["test"], spec, train.eval_batch_size, run, seed
      )
      for condition, values in metrics.items():
        run.writer.write(stop["steps"], values, phase=f"test/{arm}/seed{seed}/{condition}")
        results.add(arm, seed, values, condition=condition)
      record = {"steps": stop["steps"], "converged": float(stop["stop_reason"] == "converged")}
      record.update(loss=stop["loss"], time_s=run.elapsed() - started)
      results.add(arm, seed, record, split="train")
      if arm == "ot" and seed == settings.seeds[0]:
        results.meta["plots"] = plot_data(
          params, eval_steps, data["test"], spec, model, train.eval_batch_size, run, seed
        )
      results.meta["time_s"] = run.elapsed()
      results.save(workdir)
  return report.write_report(results, workdir)
