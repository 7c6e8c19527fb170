"""M1 experiment: universal adversarial training samples for segmentation (METHODS.md M1).

For every seed of `settings.seeds` (in one process; data fixed, everything trained anew):

1. Train the baseline segmenter on the M training datasets (minus their validation images).
2. Per-dataset universal perturbations `r_D` from targeted iterative fast-gradient rounds (with
   claim 5's in-round random term), data-parallel with the `lax.psum` accumulation (steps 1-4).
3. Choose `gamma` and `eps_r` of the unified `R` (step 5) on the validation split carved from
   the training datasets (`tune`), by targeted success; the headline uses the chosen values.
4. Adversarial training (steps 6-7) from the baseline on 1:1 clean and `clip(x + R)` batches;
   the control fine-tunes the same steps on clean images only. A fresh `R'` is computed
   against each (the control's own `R'` is the control of the adversarial model's `R'`).
5. Evaluate on held-out images of the M datasets and on the held-out domain (`EVALUATIONS`):
   the baseline clean, under `R`, `R` without its random term, `R` with METHODS.md's default
   `gamma = xi`, a sign-noise control of the same L-inf norm, and the ablation attacks (claim 5's
   term off; the other `correct_pixels` option); the adversarial model and the control clean,
   under `R` and under their own `R'`.

The numbers become `Results` records (arm, seed, split, condition, metric); `report.py` builds
the tables, paired verdicts and figures from them alone.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from research.data import samplers
from research.study.results import Results, save_arrays
from research.supervised import segmentation
from research.training import fit, parallel, state, steps
from research.uap_segmentation import core, evaluation, report
from research.uap_segmentation import data as uap_data
from research.uap_segmentation.settings import Settings

B, A, C = report.BASELINE, report.ADV, report.CONTROL
# (arm, condition): every headline evaluation of a seed, in report order; the condition names
# the perturbation in that seed's `perts` (R' is the arm's own fresh attack).
EVALUATIONS = (
  (B, "clean"),
  (B, "R"),
  (B, report.R_NO_RANDOM),
  (B, report.R_GAMMA_XI),
  (B, "noise"),
  (B, report.R_NO_ROUND),
  (B, report.R_OTHER_PIXELS),
  (A, "clean"),
  (A, "R"),
  (A, "R'"),
  (C, "clean"),
  (C, "R"),
  (C, "R'"),
)


def logits_apply(model: Any) -> Callable[[Any, jax.Array], jax.Array]:
  """`apply_fn(params, images) -> logits`; create once per model (a static jit argument)."""

  def apply_fn(params, images):
    return model.apply({"params": params}, images)["logits"]

  return apply_fn


def dataset_perturbations(apply_fn, params, rng, train, s: Settings, attack: core.AttackConfig):
  """Steps 1-4 on each dataset: `([M, H, W, 3] r_D, {dataset: mean success of its r_n})`.

  Dataset j uses `fold_in(rng, j)`; its first `images_per_dataset` images are attacked.
  """
  mesh, r_ds, success = core.device_mesh(), [], {}
  for j, (name, arrays) in enumerate(train.items()):
    n = min(s.unify.images_per_dataset, len(arrays["image"]))
    out = core.universal_perturbation_sharded(
      apply_fn,
      params,
      jax.random.fold_in(rng, j),
      steps.images_to_float(jnp.asarray(arrays["image"][:n])),
      jnp.asarray(arrays["semantic"][:n], jnp.int32),
      jnp.asarray(s.pairs),
      config=attack,
      mesh=mesh,
      weight_mode=s.unify.weight_mode,
    )
    r_ds.append(out.r_d)
    success[name] = float(jnp.mean(out.success))
  return jnp.stack(r_ds), success


def unify(rng, r_ds, s: Settings, gamma_scale: float, eps_r: float) -> np.ndarray:
  """Step 5: `R` with `gamma = gamma_scale * xi` (the same random draw for every value)."""
  xi = s.attack.xi
  return np.asarray(
    core.unified_perturbation(
      rng, r_ds, xi=xi, gamma=gamma_scale * xi, eps_r=eps_r, norm=s.unify.norm
    )
  )


def tune(evaluate, params, r_ds, rng, s: Settings, val: dict, results: Results, seed: int):
  """Chooses `(gamma_scale, eps_r)` by mean targeted success on the validation split.

  Every grid point is recorded (split `<dataset> (validation)`, condition `report.tune_label`);
  ties keep the first grid point. Returns the chosen pair.
  """
  scores = {}
  for g in s.unify.gamma_scales:
    for e in s.unify.eps_rs:
      r = unify(rng, r_ds, s, g, e)
      got = [evaluate(params, r, arrays) for arrays in val.values()]
      for name, m in zip(val, got):
        kept = {k: m[k] for k in ("success", "flip_rate", "miou")}
        results.add(
          B, seed, kept, split=f"{name} {report.VALIDATION}", condition=report.tune_label(g, e)
        )
      scores[(g, e)] = float(np.mean([m["success"] for m in got]))
  best = max(scores, key=scores.get)  # first maximum in grid order
  results.add(report.TUNING, seed, {"gamma_scale": best[0], "eps_r": best[1]})
  return best


def train_step_fns(config, s: Settings, model, run) -> dict[str, tuple]:
  """`{phase: (tx, compiled step)}` for the baseline and the fine-tuning (shared by seeds).

  The fine-tuning step reads its perturbation from the batch (`perturbation`, `R` broadcast
  per example), so the adversarial arm and the clean control (`R = 0`) of every seed share one
  compiled step.
  """
  seg_loss = functools.partial(steps.segmentation_loss, model=model)
  base_tx = state.make_optimizer(config.optim, s.train.steps)
  optim = ml_collections.ConfigDict(config.optim.to_dict())
  optim.learning_rate = s.adv_train.learning_rate
  optim.warmup_steps = min(optim.warmup_steps, s.adv_train.steps // 10)
  adv_tx = state.make_optimizer(optim, s.adv_train.steps)

  def adv_loss(params, batch, rng):
    return core.adversarial_training_loss(
      params,
      batch,
      rng,
      loss_fn=seg_loss,
      perturbation=batch["perturbation"],
      ratio=s.adv_train.ratio,
    )

  def compiled(loss_fn, tx):
    return parallel.compile_train_step(
      functools.partial(steps.train_step, loss_fn=loss_fn, tx=tx), run.mesh
    )

  return {
    "base": (base_tx, compiled(seg_loss, base_tx)),
    "adv": (adv_tx, compiled(adv_loss, adv_tx)),
  }


def train_phase(run, s, fns, kind, name, params, train_all, seed, perturbation=None):
  """One training phase of a seed: the baseline (`kind='base'`) or a fine-tuning (`'adv'`).

  A fine-tuning continues from `params` with `clip(x + perturbation)` as the second samples
  (zeros: the clean control). Checkpoints in `<workdir>/<name>_checkpoints` (resumed).
  """
  tx, step = fns[kind]
  arrays, keys = dict(train_all), ["image", "semantic"]
  if kind == "adv":
    arrays["perturbation"] = np.broadcast_to(perturbation, arrays["image"].shape)
    keys.append("perturbation")
    n_steps, every, offset = s.adv_train.steps, s.adv_train.checkpoint_every, 1
  else:
    n_steps, every, offset = s.train.steps, s.train.checkpoint_every, 0
  sampler = samplers.RandomSampler(len(arrays["image"]), s.train.batch_size, seed + offset)
  return fit.fit(
    run,
    fit.Phase(name, n_steps, s.train.log_every, every, s.train.batch_size),
    params=jax.tree.map(lambda p: jnp.array(p, copy=True), params),  # the step donates state
    tx=tx,
    step_fn=step,
    batch_fn=fit.sampled_batch_fn(arrays, sampler, run.mesh, tuple(keys)),
    rng=jax.random.key(seed + 2 * offset),
  ).params


def run_seed(seed, s: Settings, run, data, model, fns, evaluate, results) -> dict:
  """The whole study for one seed (module doc); returns its perturbations and parameters."""
  apply_fn = _APPLY.setdefault(model, logits_apply(model))
  init = fit.init_params(model, jax.random.key(seed), data["train_all"]["image"][0])
  base = train_phase(run, s, fns, "base", f"seed{seed}_train", init, data["train_all"], seed)
  attack_rng, noise_rng, unify_rng = jax.random.split(jax.random.key(seed + 3), 3)
  r_ds, success = dataset_perturbations(apply_fn, base, attack_rng, data["train"], s, s.attack)
  g, e = tune(evaluate, base, r_ds, unify_rng, s, data["val"], results, seed)
  perts = {
    "R": unify(unify_rng, r_ds, s, g, e),
    report.R_NO_RANDOM: unify(unify_rng, r_ds, s, g, 0.0),
    report.R_GAMMA_XI: unify(unify_rng, r_ds, s, 1.0, e),
    "r_ds": np.asarray(r_ds),
  }
  perts["noise"] = evaluation.sign_noise_like(noise_rng, perts["R"])
  successes = {(B, report.TRAIN_R_N): success}  # (arm, condition) -> {dataset: success}
  other = "partner" if s.attack.correct_pixels == "all" else "all"
  ablations = {
    report.R_NO_ROUND: ("eps_round", dataclasses.replace(s.attack, eps_round=0.0)),
    report.R_OTHER_PIXELS: ("correct_pixels", dataclasses.replace(s.attack, correct_pixels=other)),
  }
  for cond, (name, attack) in ablations.items():
    if name in s.ablation_attacks:
      r_abl, successes[(B, f"{report.TRAIN_R_N} {cond}")] = dataset_perturbations(
        apply_fn, base, attack_rng, data["train"], s, attack
      )
      perts[cond] = unify(unify_rng, r_abl, s, g, e)
  params = {B: base}
  for arm, pert in ((A, perts["R"]), (C, np.zeros_like(perts["R"]))):
    name = f"seed{seed}_{'adv_train' if arm == A else 'clean_finetune'}"
    params[arm] = train_phase(run, s, fns, "adv", name, base, data["train_all"], seed, pert)
    r_new, successes[(arm, report.TRAIN_R_N)] = dataset_perturbations(
      apply_fn, params[arm], attack_rng, data["train"], s, s.attack
    )
    perts[f"R'_{arm}"] = unify(unify_rng, r_new, s, g, e)
  splits = {
    **{f"{n} {report.HELD_IN}": a for n, a in data["test"].items()},
    **{f"{n} {report.HELD_OUT}": a for n, a in data["heldout"].items()},
  }
  for arm, cond in EVALUATIONS:
    if cond not in perts and cond not in ("clean", "R'"):
      continue  # an ablation attack that the config leaves out
    pert = {"clean": np.zeros_like(perts["R"]), "R'": perts.get(f"R'_{arm}")}.get(cond)
    pert = perts[cond] if pert is None else pert
    for split, arrays in splits.items():
      metrics = evaluate(params[arm], pert, arrays)
      results.add(arm, seed, metrics, split=split, condition=cond)
      logged = {m: metrics[m] for m in report.SPLIT_METRICS}
      run.writer.write(seed, logged, phase=f"seed{seed}|{report.label(arm, cond)}|{split}")
  for (arm, cond), per_dataset in successes.items():
    for dataset, value in per_dataset.items():
      results.add(arm, seed, {"success": value}, split=dataset, condition=cond)
  return {"perts": perts, "params": params}


_APPLY: dict = {}  # one `logits_apply` per model, so the compiled attack is reused by seeds


def overlay_arrays(model, params: dict, data: dict, perts: dict, n: int) -> dict[str, np.ndarray]:
  """The overlay panels of the first `n` images of a held-out-images split and the domain.

  Panels: input, `clip(x + R)`, truth, predictions clean / under R / adv. model under R, as
  `{"<j>/<panel>": [n, H, W(, 3)]}` with j = 0 (held-out images), 1 (held-out domain).
  """
  r, zero = perts["R"], np.zeros_like(perts["R"])
  out = {}
  for j, split in enumerate((data["test"], data["heldout"])):
    arrays = next(iter(split.values()))
    images = arrays["image"][:n]
    x = steps.images_to_float(jnp.asarray(images))
    out.update(
      {
        f"{j}/image": images,
        f"{j}/perturbed": np.asarray(core.second_samples(x, r)),
        f"{j}/truth": arrays["semantic"][:n],
        f"{j}/clean": evaluation.predict_labels(model, params[B], images, zero),
        f"{j}/R": evaluation.predict_labels(model, params[B], images, r),
        f"{j}/adv_R": evaluation.predict_labels(model, params[A], images, r),
      }
    )
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the M1 study over seeds (module doc); writes `results.json`, the report, the summary."""
  s = Settings.from_config(config)
  run = fit.start_run(workdir, config)
  data = uap_data.load_uap_data(config)
  k = data["num_classes"]
  core.check_same_image_size(
    [a["image"].shape for g in ("train", "val", "test", "heldout") for a in data[g].values()]
  )
  model = segmentation.build_segmenter(config, k)
  parallel.check_batch_divisible(s.train.batch_size, run.mesh, "train.batch_size")
  parallel.check_batch_divisible(s.train.eval_batch_size, run.mesh, "train.eval_batch_size")
  fns = train_step_fns(config, s, model, run)
  eval_step = jax.jit(
    functools.partial(
      evaluation.perturbed_eval_step, model=model, num_classes=k, pairs=jnp.asarray(s.pairs)
    )
  )
  pair_names = [f"{src}->{tgt}" for src, tgt in s.pair_names]
  evaluate = functools.partial(
    evaluation.evaluate_under,
    eval_step,
    batch_size=s.train.eval_batch_size,
    mesh=run.mesh,
    pair_names=pair_names,
    class_names=s.class_names,
  )
  results = Results(report.EXPERIMENT)
  for seed in s.seeds:
    out = run_seed(seed, s, run, data, model, fns, evaluate, results)
    if seed == s.seeds[0]:  # figures of the first seed
      save_arrays(workdir, out["perts"], report.PERTURBATIONS)
      save_arrays(
        workdir, overlay_arrays(model, out["params"], data, out["perts"], s.overlay_images)
      )
  a, u = s.attack, s.unify
  results.meta = {
    "dataset": config.data.name,
    "datasets": list(data["train"]),
    "class_names": list(s.class_names),
    "pairs": pair_names,
    "overlay_splits": [next(iter(data[g])) for g in ("test", "heldout")],
    "attack": {
      "xi": a.xi,
      "alpha": a.alpha,
      "rounds": a.rounds,
      "eps_round": a.eps_round,
      "correct_pixels": a.correct_pixels,
      "images_per_dataset": u.images_per_dataset,
      "weight_mode": u.weight_mode,
      "norm": u.norm,
    },
    "tune": {
      "gamma_scales": list(u.gamma_scales),
      "eps_rs": list(u.eps_rs),
      "val_images": {n: len(v["image"]) for n, v in data["val"].items()},
    },
    "ablation_attacks": list(s.ablation_attacks),
    "adv_train": {"steps": s.adv_train.steps, "ratio": s.adv_train.ratio},
    "time_s": run.elapsed(),
  }
  results.save(workdir)
  return report.write_report(results, workdir)
