r"""Matching time per batch (optax jitted Hungarian vs scipy) and the M4 fine-tuning step time.

    python -m launch.bench_incremental_panoptic --out=runs/bench_incremental_panoptic.json

Matching: the same `[B, Q, T]` Mask2Former cost matrices (`mask_matching.matching_cost` of
random predictions and targets) are matched by our `jax.jit(jax.vmap(hungarian_match))` and by
`scipy.optimize.linear_sum_assignment` per image (what Mask2Former's `HungarianMatcher` does
after moving the costs to the host), alternating the two in repeats; both results are checked to
have the same total cost. Step: the demo config's compiled fine-tuning step (this method: the
historical forward pass, pseudo labels, matching over every decoder layer, distillation) and the
same step with the history switched off (naive fine-tuning). Reports min/median/max and
median ratios; writes JSON with machine info.
"""

from __future__ import annotations

import functools
import json
import os
import time

from absl import app, flags

from launch import bench_common

_OUT = flags.DEFINE_string("out", "runs/bench_incremental_panoptic.json", "JSON output path.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Alternating repeats.")
_ITERS = flags.DEFINE_integer("iters", 5, "Calls per repeat.")
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
  """Seconds per batch of optax (jit + vmap) and scipy (per-image loop) on the same costs."""
  import jax
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
  ours = jax.jit(jax.vmap(mask_matching.hungarian_match))

  def run_ours():
    return jax.block_until_ready(ours(cost, valid))

  def run_scipy():
    return [linear_sum_assignment(cost_host[i][:, valid[i]]) for i in range(b)]

  start = time.perf_counter()
  index, matched = run_ours()
  compile_s = time.perf_counter() - start
  index, matched = np.asarray(index), np.asarray(matched)
  for i, (rows, cols) in enumerate(run_scipy()):
    ours_total = cost_host[i][index[i][valid[i]], np.flatnonzero(valid[i])].sum()
    if not np.isclose(ours_total, cost_host[i][rows, np.flatnonzero(valid[i])[cols]].sum()):
      raise AssertionError(f"image {i}: optax and scipy matchings differ in total cost")
  times = {"optax_jit_vmap": [], "scipy_per_image": []}
  for _ in range(repeats):
    times["optax_jit_vmap"].append(_timed(run_ours, iters))
    times["scipy_per_image"].append(_timed(run_scipy, iters))
  out = {name: _stats(ts) for name, ts in times.items()}
  out["ratio_optax_over_scipy"] = out["optax_jit_vmap"]["median"] / out["scipy_per_image"]["median"]
  out["optax_compile_s"] = compile_s
  return out


def bench_step(repeats: int, iters: int) -> dict:
  """Seconds per fine-tuning step of the demo config: this method vs naive (history off)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from configs import incremental_panoptic_street
  from research.incremental_panoptic import experiment as ex
  from research.training import harness, state

  config = incremental_panoptic_street.get_config("demo")
  model = ex.build_model(config)
  run = harness.Run("", ex.parallel.data_mesh(), None, 0.0)
  step, tx = ex.compile_step(config, model, run)
  b, s, t = config.train.batch_size, config.data.image_size, config.data.max_segments
  h, w = ex.mask_shape(config)
  rng = np.random.default_rng(0)
  batch = {
    "image": rng.integers(0, 255, (b, s, s, 3), dtype=np.uint8),
    "target_classes": rng.integers(6, 9, (b, t)).astype(np.int32),
    "target_masks": rng.random((b, t, h, w)) > 0.8,
    "target_valid": np.arange(t)[None].repeat(b, 0) < 3,
  }
  params = jax.device_get(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, s, s, 3)))["params"])
  hist = jax.device_put(params)
  states = {}
  controls = {v: ex.variant_controls(config, v, "step1") for v in ("method", "naive")}
  key = jax.random.key(1)
  start = time.perf_counter()
  for v in controls:
    states[v] = state.create_train_state(params, tx)
    for _ in range(2):  # the second call sees the replicated output state: compile both.
      states[v], m = step(states[v], hist, controls[v], batch, key)
      jax.block_until_ready(m)
  compile_s = time.perf_counter() - start

  def run(v):
    states[v], m = step(states[v], hist, controls[v], batch, key)
    jax.block_until_ready(m)

  times = {v: [] for v in controls}
  for _ in range(repeats):
    for v in controls:
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
  results["step"] = bench_step(_REPEATS.value, _ITERS.value)
  results["machine"]["load_average_end"] = os.getloadavg()
  print(f"{'what':<40}{'median ms':>12}{'min ms':>10}{'max ms':>10}")
  for shape, r in results["matching"].items():
    for name in ("optax_jit_vmap", "scipy_per_image"):
      st = r[name]
      print(
        f"{'match ' + shape + ' ' + name:<40}{1e3 * st['median']:>12.2f}"
        f"{1e3 * st['min']:>10.2f}{1e3 * st['max']:>10.2f}"
      )
    print(f"{'  ratio optax / scipy':<40}{r['ratio_optax_over_scipy']:>12.2f}")
  for v in ("step_method", "step_naive"):
    st = results["step"][v]
    print(f"{v:<40}{1e3 * st['median']:>12.2f}{1e3 * st['min']:>10.2f}{1e3 * st['max']:>10.2f}")
  print(f"{'  ratio method / naive':<40}{results['step']['ratio_method_over_naive']:>12.2f}")
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
