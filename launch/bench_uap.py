r"""Benchmark of M1's perturbation rounds: our jitted round vs the same attack in PyTorch (CPU).

    python -m launch.bench_uap --out=runs/bench_uap.json [--images=16 --image_size=32]

1. Rounds per second (images x rounds / s) of `core.iterative_fgsm` (jitted, targeted
   iterative FGSM with the weighted per-pixel loss and Clip_xi) on the `Segmenter`, against the
   same targeted iterative FGSM on the same architecture written in PyTorch, timed alternately
   with repeats (min / median / max and the ratio of medians).
2. Per-op profiles of both: the top XLA ops of the compiled attack (`jax.profiler`) and the top
   PyTorch operators (`torch.profiler`), so each remaining gap has a named op.
3. Scaling of the per-dataset accumulation (`universal_perturbation_sharded`: data-parallel
   rounds and the `lax.psum` of the weighted sum, and `accumulate_with_shard_map` alone) over
   1, 2, 4, 8 fake CPU devices, in a subprocess with
   `XLA_FLAGS=--xla_force_host_platform_device_count=8`. Fake devices share the same CPU cores,
   so this measures overhead of the split, not a speed-up.

Prints a table and writes JSON with machine information (CPU model, cores, load, versions).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time

from absl import app, flags

from launch import bench_common

_OUT = flags.DEFINE_string("out", "runs/bench_uap.json", "Where to write the JSON results.")
_IMAGES = flags.DEFINE_integer("images", 16, "Images per attacked batch.")
_SIZE = flags.DEFINE_integer("image_size", 32, "Side of the square images.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Fast-gradient rounds per timed call.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Alternating timed repeats per implementation.")
_SCALING = flags.DEFINE_bool("scaling", True, "Also run the 1..8 fake-device scaling part.")
_SCALING_CHILD = flags.DEFINE_bool("scaling_child", False, "Internal: run the scaling part here.")
_PROFILE = flags.DEFINE_bool("profile", True, "Also record per-op profiles of both frameworks.")

NUM_CLASSES = 9
STAGE_SIZES, WIDTHS, DECODER_WIDTH = (1, 1, 1), (16, 32, 64), 32
XI, ALPHA = 8.0 / 255.0, 2.0 / 255.0
PAIRS = ((1, 0), (6, 5))  # sidewalk -> road, truck -> car in the street-scene classes.


def attack_inputs(n: int, s: int, seed: int = 0):
  """Random images [n, s, s, 3] in [0, 1] and semantic labels [n, s, s] of the street classes."""
  import numpy as np

  rng = np.random.default_rng(seed)
  x = rng.uniform(0.0, 1.0, (n, s, s, 3)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, (n, s, s)).astype(np.int32)
  return x, labels


def jax_attack(n: int, s: int, rounds: int):
  """Our jitted attack: `rounds` rounds on n images of s x s on JAX's default device.

  Returns:
    (a zero-argument function running it and blocking, its compiled program).
  """
  import jax
  import jax.numpy as jnp

  from research.models.resnet import Segmenter
  from research.uap_segmentation import core

  x, labels = attack_inputs(n, s)
  model = Segmenter(NUM_CLASSES, STAGE_SIZES, WIDTHS, DECODER_WIDTH)
  params = model.init(jax.random.key(0), jnp.zeros((1,) + x.shape[1:]))["params"]
  mixed, mask = core.partial_targeted_labels(None, jnp.asarray(labels), jnp.asarray(PAIRS))

  @jax.jit
  def attack(params, x, mixed, mask):
    logits_fn = lambda images: model.apply({"params": params}, images)["logits"]  # noqa: E731
    return core.iterative_fgsm(
      logits_fn, x, jnp.zeros_like(x), mixed, mask, rounds=rounds, alpha=ALPHA, xi=XI
    )

  x = jnp.asarray(x)
  compiled = attack.lower(params, x, mixed, mask).compile()
  return lambda: compiled(params, x, mixed, mask).block_until_ready(), compiled


def torch_attack(n: int, s: int, rounds: int, device: str = "cpu"):
  """The same attack on the same architecture in PyTorch, eager on `device`; None without torch.

  The returned function synchronises the device before it returns, so it can be timed.
  """
  try:
    import torch
  except ImportError:
    return None
  import torch.nn.functional as F

  torch.manual_seed(0)
  model = bench_common.torch_segmenter(STAGE_SIZES, WIDTHS, DECODER_WIDTH, NUM_CLASSES).eval()
  for p in model.parameters():
    p.requires_grad_(False)
  model = model.to(device)
  x_np, labels_np = attack_inputs(n, s)
  x = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous().to(device)
  labels = torch.from_numpy(labels_np).long().to(device)
  pairs = torch.tensor(PAIRS, device=device)
  matches = labels[..., None] == pairs[:, 0]
  mask = matches.any(-1)
  tgt = (matches.long() * pairs[:, 1]).sum(-1)
  mixed = torch.where(mask, tgt, labels)
  weights = torch.where(mask, 1.0, 1.0)
  lower, upper = torch.clamp(-x, min=-XI), torch.clamp(1.0 - x, max=XI)

  def attack():
    r = torch.zeros_like(x)
    for _ in range(rounds):
      r.requires_grad_(True)
      ce = F.cross_entropy(model(x + r), mixed, reduction="none")
      loss = (weights * ce).mean(dim=(1, 2)).sum()
      (grad,) = torch.autograd.grad(loss, r)
      with torch.no_grad():
        r = torch.minimum(torch.maximum(r - ALPHA * grad.sign(), lower), upper)
    if device != "cpu":
      torch.cuda.synchronize()
    return r

  attack()  # warm-up
  return attack


def _stats(times: list[float], work: float) -> dict:
  import numpy as np

  t = np.asarray(times)
  return {
    "seconds_min": float(t.min()),
    "seconds_median": float(np.median(t)),
    "seconds_max": float(t.max()),
    "rounds_per_s_median": work / float(np.median(t)),
    "rounds_per_s_best": work / float(t.min()),
  }


def bench_rounds() -> dict:
  """Alternating timings of the JAX and the PyTorch attack, and their per-op profiles."""
  work = float(_IMAGES.value * _ROUNDS.value)
  n, s, rounds = _IMAGES.value, _SIZE.value, _ROUNDS.value
  ours, compiled = jax_attack(n, s, rounds)
  impls = {"jax (ours, jitted)": ours, "pytorch (cpu, eager)": torch_attack(n, s, rounds)}
  impls = {k: v for k, v in impls.items() if v is not None}
  times = {k: [] for k in impls}
  for _ in range(_REPEATS.value):
    for name, fn in impls.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  out = {name: _stats(ts, work) for name, ts in times.items()}
  if len(out) == 2:
    ours_t, peer_t = (v["seconds_median"] for v in out.values())
    out["ratio_jax_over_pytorch_rounds_per_s"] = peer_t / ours_t
    ours_t, peer_t = (v["seconds_min"] for v in out.values() if isinstance(v, dict))
    out["ratio_jax_over_pytorch_best"] = peer_t / ours_t
  if _PROFILE.value:
    out["profile_jax"] = bench_common.jax_op_profile(ours, compiled)
    if "pytorch (cpu, eager)" in impls:
      out["profile_pytorch"] = bench_common.torch_op_profile(impls["pytorch (cpu, eager)"])
  return out


def bench_scaling() -> dict:
  """Accumulation timings over 1, 2, 4, 8 devices (call with 8 fake devices)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from research.models.resnet import Segmenter
  from research.uap_segmentation import core

  x, labels = attack_inputs(_IMAGES.value, _SIZE.value)
  model = Segmenter(NUM_CLASSES, STAGE_SIZES, WIDTHS, DECODER_WIDTH)
  params = model.init(jax.random.key(0), jnp.zeros((1,) + x.shape[1:]))["params"]
  apply_fn = functools.partial(_apply_logits, model)
  config = core.AttackConfig(rounds=_ROUNDS.value, alpha=ALPHA, xi=XI)
  x, labels, pairs = jnp.asarray(x), jnp.asarray(labels), jnp.asarray(PAIRS)
  r = jax.random.uniform(jax.random.key(1), (256,) + x.shape[1:], minval=-XI, maxval=XI)
  w = jnp.full((256,), 1.0 / 256)
  results, reference = {}, None
  for n_dev in (1, 2, 4, 8):
    if n_dev > jax.device_count():
      break
    mesh = core.device_mesh(jax.devices()[:n_dev])

    def full(mesh=mesh):
      return core.universal_perturbation_sharded(
        apply_fn, params, jax.random.key(0), x, labels, pairs, config=config, mesh=mesh
      ).r_d.block_until_ready()

    def accumulate(mesh=mesh):
      return core.accumulate_with_shard_map(r, w, mesh=mesh).block_until_ready()

    r_d = full()
    accumulate()
    reference = r_d if reference is None else reference
    timings = {"rounds_and_psum": [], "accumulate_only_256": []}
    for _ in range(_REPEATS.value):
      for key, fn in (("rounds_and_psum", full), ("accumulate_only_256", accumulate)):
        start = time.perf_counter()
        fn()
        timings[key].append(time.perf_counter() - start)
    results[str(n_dev)] = {
      "rounds_and_psum_s_median": float(np.median(timings["rounds_and_psum"])),
      "rounds_per_s": _IMAGES.value * _ROUNDS.value / float(np.median(timings["rounds_and_psum"])),
      "accumulate_only_256_s_median": float(np.median(timings["accumulate_only_256"])),
      "max_abs_diff_vs_1_device": float(np.max(np.abs(np.asarray(r_d) - np.asarray(reference)))),
    }
  return results


def _apply_logits(model, params, images):
  return model.apply({"params": params}, images)["logits"]


def _scaling_in_subprocess() -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
    env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
  env["JAX_PLATFORMS"] = "cpu"
  cmd = [
    sys.executable,
    "-m",
    "launch.bench_uap",
    "--scaling_child",
    f"--images={_IMAGES.value}",
    f"--image_size={_SIZE.value}",
    f"--rounds={_ROUNDS.value}",
    f"--repeats={_REPEATS.value}",
  ]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, check=True)
  return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv):
  """Runs the benchmark, prints a table and writes the JSON."""
  del argv
  if _SCALING_CHILD.value:
    print(json.dumps(bench_scaling()))
    return
  results = {
    "machine": bench_common.machine_info(),
    "setup": {
      "images": _IMAGES.value,
      "image_size": _SIZE.value,
      "rounds": _ROUNDS.value,
      "repeats": _REPEATS.value,
      "model": f"Segmenter stage_sizes={STAGE_SIZES} widths={WIDTHS} decoder={DECODER_WIDTH}",
    },
    "rounds": bench_rounds(),
  }
  if _SCALING.value:
    results["scaling_fake_devices"] = _scaling_in_subprocess()
  results["machine"]["load_average_after"] = list(os.getloadavg())
  lines = ["implementation | rounds/s (median) | s/call min / median / max"]
  for name, v in results["rounds"].items():
    if isinstance(v, dict) and "seconds_min" in v:
      lines.append(
        f"{name} | {v['rounds_per_s_median']:.1f} | {v['seconds_min']:.3f} / "
        f"{v['seconds_median']:.3f} / {v['seconds_max']:.3f}"
      )
  if "ratio_jax_over_pytorch_rounds_per_s" in results["rounds"]:
    lines.append(
      f"ratio jax / pytorch: {results['rounds']['ratio_jax_over_pytorch_rounds_per_s']:.2f} "
      f"(medians), {results['rounds']['ratio_jax_over_pytorch_best']:.2f} (best calls); "
      f"load {results['machine']['load_average_1_5_15'][0]:.1f} -> "
      f"{results['machine']['load_average_after'][0]:.1f} on {results['machine']['cores']} cores"
    )
  for key, title in (("profile_jax", "JAX ops"), ("profile_pytorch", "PyTorch ops")):
    if key in results["rounds"]:
      lines.append(
        bench_common.op_table(
          f"{title} per call of {_ROUNDS.value} rounds:", results["rounds"][key]
        )
      )
  for n_dev, v in results.get("scaling_fake_devices", {}).items():
    lines.append(
      f"{n_dev} fake devices | {v['rounds_per_s']:.1f} rounds/s | accumulate(256) "
      f"{1e3 * v['accumulate_only_256_s_median']:.2f} ms | "
      f"max diff {v['max_abs_diff_vs_1_device']:.1e}"
    )
  print("\n".join(lines))
  bench_common.write_json(_OUT.value, results)


if __name__ == "__main__":
  app.run(main)
