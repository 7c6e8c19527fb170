"""M5 experiment: training on clean plus OT-matched perturbed images (METHODS.md M5, seed 004).

Three arms are trained with the same data, budget and convergence rule:

- `clean`: clean-only training (task loss on the clean set);
- `ot`: this method, loss1 (clean) + loss2 on the target perturbed set found by k signed
  ascent steps on the feature matching distance `D` (steps 2-6), regenerated every step;
  `ot.perturbed_only` trains on loss2 alone with logits as vectors (Feature Scattering);
- `pgd`: PGD adversarial training, loss1 + the task loss on PGD images of the same eps and
  the same number of ascent steps.

Each is evaluated on clean test images, under uniform noise of the same eps, under the OT
attack of step 5 and under PGD on the task loss: mAP@0.5 and mAP@[.5:.95] for detection
(CenterNet-style detector on the embedded street scenes), accuracy for classification (digits
or a catalogue dataset such as CIFAR-10). Training stops at the step limit or, at every log
point, when the interval's mean `loss1 + loss2` is at or below the threshold (step 7, `fit`'s
stop hook); the converged model is stored as a checkpoint with its stop reason. The numbers
become `Results`; `report.write_report` builds the report from them alone.
"""

from __future__ import annotations

import base64
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
  """The task's data; the test split is cut to `settings.max_test_examples`."""
  if settings.task == "detection":
    data = detection.load_detection_data(config)
  else:
    data = load_classification_data(config)
  n = settings.max_test_examples
  data["test"] = {k: v[:n] for k, v in data["test"].items()}
  return data


# --------------------------------------------------------------------------------------------
# Training with the convergence rule of step 7.


@dataclasses.dataclass
class LossThreshold:
  """Step 7 as `fit`'s stop hook: 'converged' when an interval's mean target loss is low enough.

  At every log point the mean `loss` (`loss1 + loss2`) of the interval is compared with the
  threshold (`core.stop_reason`); the last mean seen is kept for the report and saved with each
  checkpoint (`extras`), so a rerun that finds a stored model still knows it.

  Attributes:
    rule: the threshold and step limit.
    loss: the last interval's mean target loss (NaN before the first log point).
  """

  rule: core.ConvergenceRule
  loss: float = math.nan

  def __call__(self, step: int, metrics: dict[str, float], train_state: Any) -> str | None:
    """The loop's stop hook: `'converged'` or None (the step limit is the loop's own)."""
    del train_state
    self.loss = metrics["loss"]
    return "converged" if core.stop_reason(self.loss, step, self.rule) == "converged" else None

  def extras(self) -> dict:
    """Saved with every checkpoint."""
    return {"loss": self.loss}


def compile_training(
  config: ml_collections.ConfigDict, model: Any, spec: Spec, training: str, run: fit.Run
) -> tuple[optax.GradientTransformation, Callable]:
  """(optimizer, jitted `task.perturbation_train_step`) of an arm, shared by its seeds."""
  tx = state.make_optimizer(config.optim, config.train.steps)
  step = parallel.compile_train_step(
    functools.partial(
      task.perturbation_train_step, model=model, tx=tx, spec=spec, training=training
    ),
    run.mesh,
  )
  return tx, step


def train_model(
  settings: Settings,
  run: fit.Run,
  data: dict,
  model: Any,
  training: str,
  seed: int,
  compiled: tuple[optax.GradientTransformation, Callable],
) -> tuple[Any, dict]:
  """Trains one model with the step-7 rule; resumes from `<workdir>/<name>_checkpoints`.

  `name` is `<training>_seed<seed>_train`; the seed sets the initial parameters, the batch
  order and the random starts. A model stored as converged is not trained again on a rerun.

  Args:
    settings: the experiment's settings.
    run: the run context.
    data: `load_data`'s output.
    model: detector or classifier.
    training: one of `settings.TRAININGS`.
    seed: the run's seed.
    compiled: `compile_training`'s output for `training`.

  Returns:
    (params, {"stop_reason": 'converged' | 'step_limit', "steps": int, "loss": the last
    interval's mean target loss}).
  """
  name = f"{training}_seed{seed}_train"
  train = settings.train
  parallel.check_batch_divisible(train.batch_size, run.mesh, "train.batch_size")
  hook = LossThreshold(core.ConvergenceRule(settings.loss_threshold, train.steps))
  rng = jax.random.key(seed)
  tx, step = compiled
  sampler = samplers.RandomSampler(len(data["train"]["image"]), train.batch_size, seed)
  result = fit.fit(
    run,
    fit.Phase.from_train_config(name, train),
    params=fit.init_params(model, rng, data["train"]["image"][0]),
    tx=tx,
    step_fn=step,
    batch_fn=fit.sampled_batch_fn(data["train"], sampler, run.mesh, task.batch_keys(settings.task)),
    rng=jax.random.fold_in(rng, 1),
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

  Returns:
    `{condition: {"map50", "map"}}` (detection) or `{condition: {"accuracy"}}`.
  """
  collect = ("predictions",) if spec.task == "classification" else ("boxes", "scores", "classes")
  results = {}
  for condition in CONDITIONS:
    fn = functools.partial(eval_steps[condition], key=condition_key(seed, condition))
    out = predict.predict(
      fn,
      params,
      test,
      batch_size=batch_size,
      mesh=run.mesh,
      keys=task.batch_keys(spec.task),
      collect=collect,
      name=f"eval {condition}",
    )
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
  """The arrays the report draws: the OT plan of the first test batch and a few detections.

  The first batch is evaluated again as in `evaluate_model` (same keys, same outputs).

  Returns:
    `{"transport_plan": {"plan", "cost"} [B, B]}`, plus for detection `{"detections":
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
  plan_fn = jax.jit(functools.partial(task.transport_plan, model=model, spec=spec))
  plan, cost = jax.device_get(plan_fn(params, out["clean"]["images"], out["ot_attack"]["images"]))
  data = {"transport_plan": {"plan": _rounded(plan), "cost": _rounded(cost)}}
  if spec.task == "detection":
    n = min(PLOTTED_IMAGES, len(out["clean"]["images"]))
    gts = detection.ground_truths({k: v[:n] for k, v in test.items()})
    data["detections"] = {"ground_truth": [{"boxes": b, "classes": c} for b, c in gts]}
    for condition, o in out.items():
      images = np.round(np.clip(o["images"][:n], 0, 1) * 255).astype(np.uint8)
      data["detections"][condition] = [
        {
          "image": {"shape": images[i].shape, "uint8_base64": _base64(images[i])},
          "boxes": _rounded(o["boxes"][i]),
          "scores": _rounded(o["scores"][i]),
          "classes": o["classes"][i],
        }
        for i in range(n)
      ]
  return data


def _base64(image: np.ndarray) -> str:
  """The bytes of a uint8 image as base64 text (`report.decode_image` reads it back)."""
  return base64.b64encode(np.ascontiguousarray(image, np.uint8).tobytes()).decode("ascii")


def _rounded(a: np.ndarray) -> list:
  """`a` as nested lists of floats with 5 significant digits (compact JSON for plots)."""
  return np.vectorize(lambda v: float(f"{v:.5g}"))(np.asarray(a, np.float64)).tolist()


# --------------------------------------------------------------------------------------------
# The experiment.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains the clean-only, OT-perturbation and PGD arms per seed; evaluates and reports them.

  Every arm runs for each seed of `settings.seeds`; per-seed numbers are `Results` records
  (test split: one condition per evaluation; train split: steps, converged, final loss),
  saved to `<workdir>/results.json` before the report is built from them.

  Returns:
    the run summary (also written to `<workdir>/summary.json`).
  """
  settings = Settings.from_config(config)
  run = fit.start_run(workdir, config)
  data = load_data(config, settings)
  model = task.build_task_model(config, settings.task, data["num_classes"])
  spec = settings.spec(data["num_classes"], data["train"]["image"].shape[1:])
  parallel.check_batch_divisible(settings.train.eval_batch_size, run.mesh, "train.eval_batch_size")
  eval_steps = compile_eval_steps(model, spec)
  compiled = {t: compile_training(config, model, spec, t, run) for t in settings.trainings}
  ot, train = settings.ot, settings.train
  results = Results(
    EXPERIMENT,
    meta={
      "task": settings.task,
      "dataset": settings.dataset,
      "class_names": list(data["class_names"]),
      "test_images": len(data["test"]["image"]),
      "setup": {
        "eps": ot.eps,
        "alpha": ot.alpha,
        "ascent_steps": ot.ascent_steps,
        "attack_steps": ot.attack_steps,
        "attack_alpha": ot.attack_alpha,
        "vectors": ot.vectors,
        "cost": ot.sinkhorn.cost,
        "sinkhorn_iterations": ot.sinkhorn.max_iterations,
        "perturbed_only": ot.perturbed_only,
        "loss_threshold": config.train.loss_threshold,
        "steps": train.steps,
      },
    },
  )
  for seed in settings.seeds:
    for training in settings.trainings:
      params, stop = train_model(settings, run, data, model, training, seed, compiled[training])
      metrics = evaluate_model(
        params, eval_steps, data["test"], spec, train.eval_batch_size, run, seed
      )
      for condition, values in metrics.items():
        run.writer.write(stop["steps"], values, phase=f"test/{training}/seed{seed}/{condition}")
        results.add(training, seed, values, condition=condition)
      results.add(
        training,
        seed,
        {
          "steps": stop["steps"],
          "converged": float(stop["stop_reason"] == "converged"),
          "loss": stop["loss"],
        },
        split="train",
      )
      if training == "ot" and seed == settings.seeds[0]:
        results.meta["plots"] = plot_data(
          params, eval_steps, data["test"], spec, model, train.eval_batch_size, run, seed
        )
  results.meta["time_s"] = run.elapsed()
  results.save(workdir)
  return report.write_report(results, workdir)
