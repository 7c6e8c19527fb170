r"""Benchmark of M5's OT matching and training step (CPU), against POT.

    python -m launch.bench_ot --out=runs/bench_ot.json [--sizes=32,64,128,256,512]

1. OT matching = cosine cost matrix + entropic Sinkhorn (fixed iteration count, epsilon
   relative to the mean cost) + the gradient of ``D = <P*, C>`` with respect to the perturbed
   features: our jitted ``core.feature_matching_distance`` (ott-jax, log domain) against POT's
   ``ot.sinkhorn2(method='sinkhorn_log')`` with its torch backend (autodiff through the
   iterations), on the same problems, for N = M features of each batch size. The two distances
   are compared too.
2. Gradient accuracy against time for the convergence-tested solve
   (``min_iterations=0``, thresholds 1e-3, 1e-4, 1e-5 on ott's marginal error): the iterations
   run, the time and the error of ``grad D`` against a converged float64 solve (threshold
   1e-9), so the default threshold can be chosen from it.
3. The full training step of the experiment (street detection, demo config): clean-only,
   this method (OT target set + loss1 + loss2) and PGD adversarial training.

Implementations are timed alternately with repeats (min / median / max, ratio of medians).
Prints a table and writes JSON with machine information.
"""

from __future__ import annotations

import functools
import os
import time

from absl import app, flags

from launch import bench_common

_OUT = flags.DEFINE_string("out", "runs/bench_ot.json", "Where to write the JSON results.")
_SIZES = flags.DEFINE_list("sizes", ["32", "64", "128", "256", "512"], "Feature batch sizes.")
_DIM = flags.DEFINE_integer("dim", 64, "Feature dimension (the demo backbone's pooled width).")
_ITERS = flags.DEFINE_integer("iterations", 50, "Fixed Sinkhorn iteration count.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Alternating timed repeats per implementation.")
_STEP = flags.DEFINE_bool("train_step", True, "Also time the full training steps.")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", 1, "torch intra-op threads (0: default).")
_ACCURACY_SIZES = flags.DEFINE_list("accuracy_sizes", ["128", "512"], "N of the accuracy table.")
_THRESHOLDS = (1e-3, 1e-4, 1e-5)

EPSILON = 0.05  # relative to the mean cost, as SinkhornConfig's default.


def _timed(fns: dict, repeats: int) -> dict:
  """Runs each zero-argument function once (warm-up), then alternately `repeats` times."""
  for fn in fns.values():
    fn()
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, fn in fns.items():
      t = time.perf_counter()
      fn()
      times[k].append(time.perf_counter() - t)
  import numpy as np

  return {
    k: {"min_s": min(v), "median_s": float(np.median(v)), "max_s": max(v)} for k, v in times.items()
  }


def ot_matching(n: int, dim: int, iterations: int, repeats: int) -> dict:
  """Cost + Sinkhorn + gradient in ott-jax (ours) and POT-torch on the same problem."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import ot
  import torch

  from research.ot_perturbation import core

  rng = np.random.default_rng(n)
  f = rng.normal(size=(n, dim)).astype(np.float32)
  g = (f + 0.5 * rng.normal(size=(n, dim))).astype(np.float32)
  config = core.SinkhornConfig(
    epsilon=EPSILON, max_iterations=iterations, min_iterations=iterations, inner_iterations=10
  )
  ours = jax.jit(
    jax.value_and_grad(lambda f, g: core.feature_matching_distance(f, g, config)[0], argnums=1)
  )
  fj, gj = jnp.asarray(f), jnp.asarray(g)

  def run_ours():
    d, grad = ours(fj, gj)
    return float(d), np.asarray(grad)

  ft = torch.from_numpy(f)
  a = torch.full((n,), 1.0 / n)

  def run_pot():
    gt = torch.from_numpy(g).requires_grad_(True)
    cost = 1 - (ft / ft.norm(dim=1, keepdim=True)) @ (gt / gt.norm(dim=1, keepdim=True)).T
    reg = EPSILON * float(cost.detach().mean())
    d = ot.sinkhorn2(a, a, cost, reg, method="sinkhorn_log", numItermax=iterations, stopThr=0.0)
    d.backward()
    return float(d.detach()), gt.grad.numpy()

  d_ours, grad_ours = run_ours()
  d_pot, grad_pot = run_pot()
  timing = _timed({"ott_jax": run_ours, "pot_torch": run_pot}, repeats)
  return {
    "n": n,
    "dim": dim,
    "iterations": iterations,
    "distance_ours": d_ours,
    "distance_pot": d_pot,
    "grad_max_abs_diff": float(np.max(np.abs(grad_ours - grad_pot))),
    "timing": timing,
    "speedup_vs_pot": timing["pot_torch"]["median_s"] / timing["ott_jax"]["median_s"],
  }


def gradient_accuracy(n: int, dim: int, repeats: int) -> list[dict]:
  """Iterations, time and gradient error of convergence-tested solves, per threshold."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from research.ot_perturbation import core

  rng = np.random.default_rng(n)
  f = rng.normal(size=(n, dim)).astype(np.float32)
  g = (f + 0.5 * rng.normal(size=(n, dim))).astype(np.float32)

  def solve(config, dtype):
    def distance(f, g):
      d, aux = core.feature_matching_distance(f, g, config)
      return d, aux["n_iters"]

    fn = jax.jit(jax.value_and_grad(distance, argnums=1, has_aux=True))
    fa, ga = jnp.asarray(f, dtype), jnp.asarray(g, dtype)
    return lambda: jax.block_until_ready(fn(fa, ga))

  with jax.enable_x64(True):
    converged = core.SinkhornConfig(epsilon=EPSILON, threshold=1e-9, max_iterations=20000)
    (_, iters_ref), grad_ref = solve(converged, jnp.float64)()
    grad_ref = np.asarray(grad_ref)
  rows = []
  for threshold in _THRESHOLDS:
    config = core.SinkhornConfig(epsilon=EPSILON, threshold=threshold, max_iterations=2000)
    run = solve(config, jnp.float32)
    timing = _timed({"ours": run}, repeats)["ours"]
    (_, iters), grad = run()
    grad = np.asarray(grad)
    big = np.abs(grad_ref) > 1e-3 * np.abs(grad_ref).max()
    rows.append(
      {
        "n": n,
        "threshold": threshold,
        "iterations": int(iters),
        "median_ms": 1e3 * timing["median_s"],
        "grad_max_rel_error": float(np.abs(grad - grad_ref).max() / np.abs(grad_ref).max()),
        "grad_sign_flips": int(np.sum(np.sign(grad[big]) != np.sign(grad_ref[big]))),
        "grad_entries": int(grad.size),
        "reference_iterations": int(iters_ref),
      }
    )
  return rows


def train_steps(repeats: int) -> dict:
  """Seconds per training step of clean-only, OT and PGD training (street demo config)."""
  import jax

  from configs import ot_perturbation_street
  from research.ot_perturbation import experiment, task
  from research.ot_perturbation.settings import TRAININGS, Settings
  from research.training import fit, state

  config = ot_perturbation_street.get_config("demo")
  settings = Settings.from_config(config)
  data = experiment.load_data(config, settings)
  model = task.build_task_model(config, settings.task, data["num_classes"])
  spec = settings.spec(data["num_classes"], data["train"]["image"].shape[1:])
  rng = jax.random.key(0)
  params = fit.init_params(model, rng, data["train"]["image"][0])
  tx = state.make_optimizer(config.optim, 10)
  train_state = state.create_train_state(params, tx)
  n = config.train.batch_size
  batch = {k: data["train"][k][:n] for k in task.train_batch_keys(settings.task)}
  fns = {}
  for arm in TRAININGS:
    training, initial_set = task.arm_training(arm, spec)
    step = jax.jit(task.bound_train_step(model, tx, spec, training, initial_set))
    fns[arm] = functools.partial(lambda s: jax.block_until_ready(s(train_state, batch, rng)), step)
  timing = _timed(fns, repeats)
  clean = timing["clean"]["median_s"]
  return {
    "batch_size": n,
    "image_size": config.data.image_size,
    "ascent_steps": spec.ot.ascent_steps,
    "sinkhorn_iterations": spec.ot.sinkhorn.max_iterations,
    "timing": timing,
    "ratio_to_clean": {k: v["median_s"] / clean for k, v in timing.items()},
  }


def main(argv):
  """Runs both parts, prints the table and writes the JSON."""
  del argv
  if _TORCH_THREADS.value:
    import torch

    torch.set_num_threads(_TORCH_THREADS.value)
  results = {"machine": bench_common.machine_info(), "ot_matching": [], "train_step": None}
  print(
    f"OT matching: cosine cost + {_ITERS.value} Sinkhorn iterations on both sides (ours: "
    f"min_iterations = max_iterations = {_ITERS.value}; POT: numItermax={_ITERS.value}, "
    f"stopThr=0), epsilon {EPSILON} x mean cost, gradient by unrolled autodiff, dim {_DIM.value}; "
    f"torch threads {_TORCH_THREADS.value or 'default'}"
  )
  print(f"{'N':>5} {'ours ms':>9} {'POT ms':>9} {'POT/ours':>9} {'D ours':>10} {'D POT':>10}")
  for n in map(int, _SIZES.value):
    r = ot_matching(n, _DIM.value, _ITERS.value, _REPEATS.value)
    results["ot_matching"].append(r)
    t = r["timing"]
    print(
      f"{n:>5} {1e3 * t['ott_jax']['median_s']:>9.2f} {1e3 * t['pot_torch']['median_s']:>9.2f} "
      f"{r['speedup_vs_pot']:>9.2f} {r['distance_ours']:>10.5f} {r['distance_pot']:>10.5f}"
    )
  results["gradient_accuracy"] = []
  print("gradient accuracy vs a converged float64 solve (threshold 1e-9):")
  print(f"{'N':>5} {'threshold':>10} {'iters':>6} {'ms':>8} {'max rel err':>12} {'flips':>6}")
  for n in map(int, _ACCURACY_SIZES.value):
    for row in gradient_accuracy(n, _DIM.value, _REPEATS.value):
      results["gradient_accuracy"].append(row)
      print(
        f"{n:>5} {row['threshold']:>10.0e} {row['iterations']:>6} {row['median_ms']:>8.2f} "
        f"{row['grad_max_rel_error']:>12.2e} {row['grad_sign_flips']:>6}"
      )
  if _STEP.value:
    results["train_step"] = step = train_steps(_REPEATS.value)
    for k, v in step["timing"].items():
      print(f"train step {k:>5}: {1e3 * v['median_s']:8.1f} ms  x{step['ratio_to_clean'][k]:.2f}")
  results["machine"]["load_average_end"] = list(os.getloadavg())
  print(
    f"load {results['machine']['load_average_1_5_15'][0]:.1f} -> "
    f"{results['machine']['load_average_end'][0]:.1f} on {results['machine']['cores']} cores"
  )
  bench_common.write_json(_OUT.value, results)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
