r"""Matching time per batch (our jitted Hungarian, both solvers, vs scipy) and M4's step time.

    python -m launch.bench_incremental_panoptic --out=runs/bench_incremental_panoptic.json

Matching: the same `[B, Q, T]` Mask2Former cost matrices (`mask_matching.matching_cost` of
random predictions and targets, some targets padded) are matched by our
`jax.jit(jax.vmap(hungarian_match))` with each solver (`solver='scipy'`: a `pure_callback` to
scipy, the CPU default; `solver='optax'`: the in-graph solver kept for accelerators) and by
`scipy.optimize.linear_sum_assignment` per image on the valid columns (what Mask2Former's
`HungarianMatcher` does after moving the costs to the host), alternating them in repeats; all
results are checked to have the same total cost. Ours is timed two ways: one jitted call per
batch (dispatch included), and `--in_program` batches matched inside one jitted program (as in
the training step, where matching adds no dispatch of its own); the ratio uses the latter.
Step: the demo config's compiled fine-tuning step (this method: the historical forward pass,
pseudo labels, matching over every decoder layer, distillation) and the same step with the
history switched off (naive fine-tuning). Reports min/median/max and median ratios; writes JSON
with machine info.
"""

from __future__ import annotations

import functools
import os
import time

from absl import app, flags

from launch import bench_common

_OUT = flags.DEFINE_string("out", "runs/bench_incremental_panoptic.json", "JSON output path.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Alternating repeats.")
_ITERS = flags.DEFINE_integer("iters", 5, "Calls per repeat.")
_STEP = flags.DEFINE_bool("step", True, "Also time the fine-tuning step.")
_IN_PROGRAM = flags.DEFINE_integer("in_program", 8, "Batches matched inside one jitted call.")
_SHAPES = flags.DEFINE_list(
  "shapes", ["16x16x16", "16x100x50"], "Matching problems as BxQxT (batch, queries, targets)."
)


def _stats(times: list[float]) -> dict:
  import numpy as np

  return {"min": min(times), "median": float(np.median(times)), "max": max(times)}


def _timed(fn, iters: int) -> float:
  start = time.perf_counter()
  for _ in range(iters):
    fn()
  return (time.perf_counter() - start) / iters


def bench_matching(b: int, q: int, t: int, repeats: int, iters: int) -> dict:
  """Seconds per batch of our matching (both solvers) and scipy per image, same costs."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from scipy.optimize import linear_sum_assignment

  from research.models import mask_matching

  rng = np.random.default_rng(0)
  h = w = 16
  valid = np.arange(t)[None].repeat(b, 0) < rng.integers(t // 2, t + 1, (b, 1))
  cost = jax.jit(jax.vmap(mask_matching.matching_cost))(
    rng.normal(size=(b, q, 10)).astype(np.float32),
    rng.normal(size=(b, q, h, w)).astype(np.float32),
    rng.integers(0, 9, (b, t)),
    rng.random((b, t, h, w)) > 0.5,
    valid,
  )
  cost_host = np.asarray(cost)
  reps = _IN_PROGRAM.value
  costs, valids = jnp.stack([cost] * reps), jnp.stack([jnp.asarray(valid)] * reps)
  fns = {}
  for name in ("scipy", "optax"):
    match = jax.vmap(functools.partial(mask_matching.hungarian_match, solver=name))
    per_call, in_program = (
      jax.jit(match),
      jax.jit(lambda c, v, match=match: jax.lax.map(lambda cv: match(*cv), (c, v))),
    )
    fns[f"ours_{name}_jit_vmap"] = functools.partial(
      lambda f: jax.block_until_ready(f(cost, valid)), per_call
    )
    fns[f"ours_{name}_in_program"] = functools.partial(
      lambda f: jax.block_until_ready(f(costs, valids)), in_program
    )

  def run_scipy():
    return [linear_sum_assignment(cost_host[i][:, valid[i]]) for i in range(b)]

  out = {"compile_s": {}}
  for name, fn in fns.items():
    start = time.perf_counter()
    index, _ = fn()
    out["compile_s"][name] = time.perf_counter() - start
    index = np.asarray(index).reshape(-1, b, t)[0]
    for i, (rows, cols) in enumerate(run_scipy()):
      ours_total = cost_host[i][index[i][valid[i]], np.flatnonzero(valid[i])].sum()
      if not np.isclose(ours_total, cost_host[i][rows, np.flatnonzero(valid[i])[cols]].sum()):
        raise AssertionError(f"image {i}: {name} and scipy matchings differ in total cost")
  fns["scipy_per_image"] = run_scipy
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      times[name].append(_timed(fn, iters) / (reps if name.endswith("_in_program") else 1))
  out.update({name: _stats(ts) for name, ts in times.items()})  # seconds per batch
  peer = out["scipy_per_image"]["median"]
  out["ratio_vs_scipy"] = {
    name: peer / out[name]["median"] for name in fns if name.startswith("ours_")
  }
  return out


def bench_step(repeats: int, iters: int) -> dict:
  """Seconds per fine-tuning step of the demo config: this method vs naive (history off)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from configs import incremental_panoptic_street
  from research.incremental_panoptic import fine_tuning
  from research.incremental_panoptic.settings import Settings
  from research.training import parallel, state

  config = incremental_panoptic_street.get_config("demo")
  settings = Settings.from_config(config)
  mesh = parallel.data_mesh()
  model = fine_tuning.build_model(settings.model, settings.num_classes)
  tx = fine_tuning.make_optimizer(settings.weight_decay)
  b, s, t = settings.batch_size, config.data.image_size, config.data.max_segments
  h, w = settings.mask_shape
  rng = np.random.default_rng(0)
  batch = {
    "image": rng.integers(0, 255, (b, s, s, 3), dtype=np.uint8),
    "target_classes": rng.integers(6, 9, (b, t)).astype(np.int32),
    "target_masks": rng.random((b, t, h, w)) > 0.8,
    "target_valid": np.arange(t)[None].repeat(b, 0) < 3,
  }
  params = jax.device_get(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, s, s, 3)))["params"])
  hist = parallel.replicate(params, mesh)
  steps = {
    v: fine_tuning.compile_step(settings, model, tx, settings.loss_spec(v), mesh)
    for v in ("method", "naive")
  }
  key = jax.random.key(1)
  old_mask = settings.old_class_mask(1)
  schedule = fine_tuning.schedule_array(settings.step1)
  states = {}
  start = time.perf_counter()
  for v, step in steps.items():
    states[v] = parallel.replicate(state.create_train_state(params, tx), mesh)
    states[v], m = step(states[v], hist, old_mask, schedule, batch, key)
    jax.block_until_ready(m)
  compile_s = time.perf_counter() - start

  def run(v):
    states[v], m = steps[v](states[v], hist, old_mask, schedule, batch, key)
    jax.block_until_ready(m)

  times = {v: [] for v in steps}
  for _ in range(repeats):
    for v in steps:
      times[v].append(_timed(functools.partial(run, v), iters))
  out = {f"step_{v}": _stats(ts) for v, ts in times.items()}
  out["ratio_method_over_naive"] = out["step_method"]["median"] / out["step_naive"]["median"]
  out["compile_s_both"] = compile_s
  out["batch_size"] = b
  return out


def main(argv):
  """Runs both benchmarks, prints a table and writes the JSON."""
  del argv
  results = {"machine": bench_common.machine_info(), "matching": {}}
  for shape in _SHAPES.value:
    b, q, t = (int(x) for x in shape.split("x"))
    results["matching"][shape] = bench_matching(b, q, t, _REPEATS.value, _ITERS.value)
  if _STEP.value:
    results["step"] = bench_step(_REPEATS.value, _ITERS.value)
  results["machine"]["load_average_end"] = os.getloadavg()
  print(f"{'what':<44}{'median ms':>12}{'min ms':>10}{'max ms':>10}")
  for shape, r in results["matching"].items():
    for name in [k for k in r if k.startswith(("ours_", "scipy_"))]:
      st = r[name]
      print(
        f"{'match ' + shape + ' ' + name:<44}{1e3 * st['median']:>12.2f}"
        f"{1e3 * st['min']:>10.2f}{1e3 * st['max']:>10.2f}"
      )
    for name, ratio in r["ratio_vs_scipy"].items():
      print(f"{'  speed ratio ' + name + ' vs scipy':<44}{ratio:>12.2f}")
  if _STEP.value:
    for v in ("step_method", "step_naive"):
      st = results["step"][v]
      print(f"{v:<44}{1e3 * st['median']:>12.2f}{1e3 * st['min']:>10.2f}{1e3 * st['max']:>10.2f}")
    print(f"{'  ratio method / naive':<44}{results['step']['ratio_method_over_naive']:>12.2f}")
  bench_common.write_json(_OUT.value, results)


if __name__ == "__main__":
  app.run(main)
