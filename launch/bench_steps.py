r"""Step throughput of our jitted train steps against the same network in PyTorch (CPU).

    python -m launch.bench_steps --out=runs/bench_steps.json [--variants=default,xla_weight_grad]

For each step (supervised classification: ResNet with GroupNorm, widths 16-128, batch 128,
32x32x3; segmentation: the street-scene Segmenter, batch 32, 64x64x3) it measures images/s of
our `jax.jit` step and of the same network, batch, optimizer (Adam) and precision (float32) in
PyTorch, alternating JAX and PyTorch repeats in one process, and reports min/median/max and the
median ratio JAX / PyTorch. It also reports each step's compile time, XLA's FLOP count and
memory estimate, the achieved GFLOP/s against a 2048^3 matmul peak (the roofline), the
forward/backward split, and (`--layers`) the forward, input-gradient and weight-gradient time of
each 3x3 convolution of the classification network in both frameworks. Each variant
(`--variants`, XLA flags in `XLA_VARIANTS`) runs in its own subprocess because XLA flags are
read once at start-up; `xla_weight_grad` is the step before the optimisation of
`research/models/conv.py` (XLA's own convolution weight gradient everywhere). PyTorch is a
benchmark-only dependency: `pip install torch==2.13.0`.
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

XLA_VARIANTS = {
  "default": "",
  "xla_weight_grad": "",  # default flags, XLA's own conv weight gradient (the reference)
  "onednn": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true",
  "xnnpack": "--xla_cpu_use_xnnpack=true",
  "no_thunks": "--xla_cpu_use_thunk_runtime=false",
}

_OUT = flags.DEFINE_string("out", "runs/bench_steps.json", "Where to write the JSON results.")
_VARIANTS = flags.DEFINE_list("variants", ["default"], f"XLA flag sets from {list(XLA_VARIANTS)}.")
_STEPS = flags.DEFINE_list("steps", ["classification", "segmentation"], "Steps to measure.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Alternating repeats per framework.")
_ITERS = flags.DEFINE_integer("iters", 5, "Steps per repeat.")
_LAYERS = flags.DEFINE_bool(
  "layers", True, "Also time forward, input-gradient and weight-gradient of each 3x3 conv."
)
_PROFILE = flags.DEFINE_bool("profile", True, "Per-op profiles of both steps (default variant).")
_CHILD = flags.DEFINE_string("child_variant", None, "Internal: measure one variant in-process.")


# ----------------------------------------------------------------------------- measurements

STEP_SPECS = {
  "classification": dict(
    batch=128, size=32, channels=3, classes=10, stage_sizes=(1, 1, 1, 1), widths=(16, 32, 64, 128)
  ),
  "segmentation": dict(
    batch=32,
    size=64,
    channels=3,
    classes=9,
    stage_sizes=(1, 1, 1),
    widths=(16, 32, 64),
    decoder_width=32,
  ),
}


def jax_train_step(name: str, spec: dict):
  """Our jitted train step for `name` in `STEP_SPECS` at `spec`, on JAX's default device.

  Returns:
    (compiled step, state, batch, rng, info with compile seconds / FLOPs / temp bytes,
    jitted forward loss, jitted gradient, params).
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from research.models.resnet import ResNet, Segmenter
  from research.training import state as state_lib
  from research.training import steps

  rng = np.random.default_rng(0)
  b, s, c, k = spec["batch"], spec["size"], spec["channels"], spec["classes"]
  images = rng.integers(0, 256, (b, s, s, c), dtype=np.uint8)
  if name == "classification":
    model = ResNet(k, spec["stage_sizes"], spec["widths"], 64)
    batch = {"image": images, "label": rng.integers(0, k, (b,))}
    loss_fn = functools.partial(steps.classification_loss, model=model)
  else:
    model = Segmenter(k, spec["stage_sizes"], spec["widths"], spec["decoder_width"])
    batch = {"image": images, "semantic": rng.integers(0, k, (b, s, s)).astype(np.uint8)}
    loss_fn = functools.partial(steps.segmentation_loss, model=model)
  params = model.init(jax.random.key(0), jnp.zeros((1, s, s, c)))["params"]
  tx = optax.adam(1e-3)
  state = state_lib.create_train_state(jax.tree.map(jnp.copy, params), tx)  # donated below
  step = jax.jit(functools.partial(steps.train_step, loss_fn=loss_fn, tx=tx), donate_argnums=0)
  key = jax.random.key(1)
  batch = jax.device_put(batch)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch, key).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  mem = compiled.memory_analysis()
  info = {
    "compile_s": compile_s,
    "flops": float(cost.get("flops", float("nan"))),
    "temp_bytes": getattr(mem, "temp_size_in_bytes", None),
  }
  fwd = jax.jit(lambda p, bt: loss_fn(p, bt, key)[0])
  grad = jax.jit(jax.grad(lambda p, bt: loss_fn(p, bt, key)[0]))
  return compiled, state, batch, key, info, fwd, grad, params


def torch_train_step(name: str, spec: dict, device: str = "cpu"):
  """The same step in eager PyTorch on `device`: a function running one step (synchronised)."""
  import numpy as np
  import torch

  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  b, s, c, k = spec["batch"], spec["size"], spec["channels"], spec["classes"]
  x = torch.tensor(rng.integers(0, 256, (b, c, s, s)), dtype=torch.uint8)
  if name == "classification":
    model = bench_common.torch_classifier(spec["stage_sizes"], spec["widths"], k, 64, c)
    y = torch.tensor(rng.integers(0, k, (b,)))
  else:
    model = bench_common.torch_segmenter(
      spec["stage_sizes"], spec["widths"], spec["decoder_width"], k
    )
    y = torch.tensor(rng.integers(0, k, (b, s, s)))
  model, x, y = model.to(device), x.to(device), y.to(device)
  opt = torch.optim.Adam(model.parameters(), 1e-3)

  def step():
    opt.zero_grad(set_to_none=True)
    out = model(x.float() / 255.0)
    logits = out[0] if isinstance(out, tuple) else out
    loss = torch.nn.functional.cross_entropy(logits, y)
    loss.backward()
    opt.step()
    if device != "cpu":
      torch.cuda.synchronize()
    return loss

  return step


def _time(fn, iters: int) -> float:
  t0 = time.perf_counter()
  for _ in range(iters):
    fn()
  return time.perf_counter() - t0


def _best_call_s(fn, *args, tries: int = 3) -> float:
  """Fastest of `tries` timed calls of `fn(*args)` after one warm-up call."""
  import jax

  jax.block_until_ready(fn(*args))
  return min(_time(lambda: jax.block_until_ready(fn(*args)), 1) for _ in range(tries))


def matmul_peak_gflops(n: int = 2048) -> dict:
  """GFLOP/s of an n^3 float32 matmul in JAX and PyTorch (best of 3)."""
  import jax
  import jax.numpy as jnp
  import torch

  a = jnp.ones((n, n), jnp.float32)
  mm = jax.jit(lambda x: x @ x)
  mm(a).block_until_ready()
  jt = min(_time(lambda: mm(a).block_until_ready(), 1) for _ in range(3))
  ta = torch.ones(n, n)
  tt = min(_time(lambda: ta @ ta, 1) for _ in range(3))
  flops = 2 * n**3
  return {"jax_gflops": flops / jt / 1e9, "torch_gflops": flops / tt / 1e9}


# (input side, in channels, out channels, stride) of the classification ResNet's 3x3 convs.
CONV_LAYERS = (
  (32, 3, 16, 1),
  (32, 16, 16, 1),
  (32, 16, 32, 2),
  (16, 32, 32, 1),
  (16, 32, 64, 2),
  (8, 64, 64, 1),
  (8, 64, 128, 2),
  (4, 128, 128, 1),
)


def conv_layer_breakdown(batch: int, tries: int = 5) -> list[dict]:
  """Best-of-`tries` ms of forward, input gradient (dx) and weight gradient (dw) per 3x3 conv.

  JAX: `lax.conv_general_dilated` (NHWC, SAME) and its VJP, each jitted alone, and `dw_ours`,
  the weight gradient of `research.models.conv.conv_general_dilated` (the shifted matmuls where
  it applies); PyTorch: `conv2d` and `aten.convolution_backward` with one output at a time
  (NCHW, padding 1).
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  from research.models import conv as conv_lib

  rows = []
  rng = np.random.default_rng(0)
  for side, cin, cout, stride in CONV_LAYERS:
    x = rng.normal(size=(batch, side, side, cin)).astype(np.float32)
    w = rng.normal(size=(3, 3, cin, cout)).astype(np.float32)

    def conv(x, w, stride=stride):
      return jax.lax.conv_general_dilated(
        x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
      )

    y = conv(x, w)
    dy = jnp.asarray(rng.normal(size=y.shape).astype(np.float32))

    def ours(x, w, stride=stride):
      return conv_lib.conv_general_dilated(
        x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
      )

    jax_fns = {
      "forward": (jax.jit(conv), (x, w)),
      "dx": (jax.jit(lambda x, w, dy: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0]), (x, w, dy)),
      "dw": (jax.jit(lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0]), (x, w, dy)),
      "dw_ours": (
        jax.jit(lambda x, w, dy: jax.vjp(lambda w: ours(x, w), w)[1](dy)[0]),
        (x, w, dy),
      ),
    }
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    tw = torch.from_numpy(w.transpose(3, 2, 0, 1).copy())
    tdy = torch.from_numpy(np.asarray(dy).transpose(0, 3, 1, 2).copy())

    def backward(mask, tx=tx, tw=tw, tdy=tdy, stride=stride):
      return torch.ops.aten.convolution_backward(
        tdy, tx, tw, None, [stride] * 2, [1, 1], [1, 1], False, [0, 0], 1, mask
      )

    torch_fns = {
      "forward": lambda tx=tx, tw=tw, s=stride: torch.nn.functional.conv2d(tx, tw, None, s, 1),
      "dx": lambda: backward([True, False, False]),
      "dw": lambda: backward([False, True, False]),
    }
    torch_fns["dw_ours"] = torch_fns["dw"]
    gflop = 2.0 * y.size * 9 * cin / 1e9
    row = {"input": [batch, side, side, cin], "out_channels": cout, "stride": stride}
    for part in jax_fns:
      fn, args = jax_fns[part]
      jax_s = _best_call_s(fn, *args, tries=tries)
      torch_fns[part]()
      torch_s = min(_time(torch_fns[part], 1) for _ in range(tries))
      row[part] = {
        "jax_ms": 1e3 * jax_s,
        "torch_ms": 1e3 * torch_s,
        "jax_gflops": gflop / jax_s,
        "torch_gflops": gflop / torch_s,
      }
    rows.append(row)
  return rows


def measure_variant(variant: str, steps_to_run, repeats: int, iters: int) -> dict:
  """All measurements of one XLA variant, in this process."""
  import jax
  import numpy as np

  from research.models import conv

  if variant == "xla_weight_grad":
    conv.MAX_SHIFTED_IN_CHANNELS = 0  # every convolution takes XLA's weight gradient
  results = {
    "variant": variant,
    "xla_flags": XLA_VARIANTS[variant],
    "machine": bench_common.machine_info(),
    "matmul": matmul_peak_gflops(),
    "steps": {},
  }
  for name in steps_to_run:
    spec = STEP_SPECS[name]
    compiled, state, batch, key, info, fwd, grad, params = jax_train_step(name, spec)
    torch_step = torch_train_step(name, spec)
    holder = {"state": state}

    def jax_iter(holder=holder, compiled=compiled, batch=batch, key=key):
      holder["state"], metrics = compiled(holder["state"], batch, key)
      return metrics

    jax.block_until_ready(jax_iter())
    torch_step()
    jax_rates, torch_rates = [], []
    for _ in range(repeats):  # alternate the two frameworks
      t = _time(lambda: jax.block_until_ready(jax_iter()), iters)
      jax_rates.append(spec["batch"] * iters / t)
      t = _time(torch_step, iters)
      torch_rates.append(spec["batch"] * iters / t)
    fwd_s = _best_call_s(fwd, params, batch)
    grad_s = _best_call_s(grad, params, batch)
    jr, tr = np.array(jax_rates), np.array(torch_rates)
    step_s = spec["batch"] / np.median(jr)
    results["steps"][name] = {
      "spec": {k: list(v) if isinstance(v, tuple) else v for k, v in spec.items()},
      "jax_images_per_s": {"min": jr.min(), "median": float(np.median(jr)), "max": jr.max()},
      "torch_images_per_s": {"min": tr.min(), "median": float(np.median(tr)), "max": tr.max()},
      "ratio_jax_over_torch": float(np.median(jr) / np.median(tr)),
      "jax_achieved_gflops": info["flops"] / step_s / 1e9,
      "jax_forward_s": fwd_s,
      "jax_gradient_s": grad_s,
      **info,
    }
    if _PROFILE.value and variant == "default":
      results["steps"][name]["profile_jax"] = bench_common.jax_op_profile(
        lambda: jax.block_until_ready(jax_iter()), compiled
      )
      results["steps"][name]["profile_torch"] = bench_common.torch_op_profile(torch_step)
  if _LAYERS.value and variant == "default":
    results["conv_layers"] = conv_layer_breakdown(STEP_SPECS["classification"]["batch"])
  return results


def _layer_table(result: dict) -> str:
  lines = [
    f"{result['variant']}: 3x3 convs of the classification step, ms JAX / torch (JAX GFLOP/s)",
    f"{'input':<18} {'out':>4} {'s':>2}  {'forward':>20} {'dx':>20} {'dw (XLA)':>20} "
    f"{'dw (ours)':>20}",
  ]
  for row in result.get("conv_layers", []):
    cells = [
      f"{row[p]['jax_ms']:6.1f}/{row[p]['torch_ms']:5.1f} ({row[p]['jax_gflops']:4.0f})"
      for p in ("forward", "dx", "dw", "dw_ours")
    ]
    lines.append(
      f"{'x'.join(map(str, row['input'])):<18} {row['out_channels']:>4} {row['stride']:>2}  "
      + " ".join(f"{c:>20}" for c in cells)
    )
  return "\n".join(lines)


def _table(all_results: list[dict]) -> str:
  lines = [
    f"{'variant':<10} {'step':<15} {'jax img/s (min/med/max)':<26} "
    f"{'torch img/s (min/med/max)':<27} {'ratio':>6} {'compile s':>9} {'GFLOP/s':>8}"
  ]
  for r in all_results:
    for name, m in r["steps"].items():
      j, t = m["jax_images_per_s"], m["torch_images_per_s"]
      lines.append(
        f"{r['variant']:<10} {name:<15} {j['min']:6.0f}/{j['median']:6.0f}/{j['max']:6.0f}     "
        f"{t['min']:6.0f}/{t['median']:6.0f}/{t['max']:6.0f}      "
        f"{m['ratio_jax_over_torch']:6.2f} {m['compile_s']:9.1f} {m['jax_achieved_gflops']:8.1f}"
      )
    mm = r["matmul"]
    lines.append(
      f"{r['variant']:<10} matmul 2048^3 peak: jax {mm['jax_gflops']:.0f} GFLOP/s, "
      f"torch {mm['torch_gflops']:.0f} GFLOP/s"
    )
  return "\n".join(lines)


def main(argv):
  """Runs each variant in a subprocess (or, as the child, measures one) and writes the JSON."""
  del argv
  if _CHILD.value:
    print(
      json.dumps(
        measure_variant(_CHILD.value, _STEPS.value, _REPEATS.value, _ITERS.value), default=float
      )
    )
    return
  unknown = [v for v in _VARIANTS.value if v not in XLA_VARIANTS]
  if unknown:
    raise ValueError(f"--variants={unknown} is not known: choose from {list(XLA_VARIANTS)}")
  all_results = []
  for variant in _VARIANTS.value:
    env = {**os.environ, "XLA_FLAGS": XLA_VARIANTS[variant], "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
      [
        sys.executable,
        "-m",
        "launch.bench_steps",
        f"--child_variant={variant}",
        f"--steps={','.join(_STEPS.value)}",
        f"--repeats={_REPEATS.value}",
        f"--iters={_ITERS.value}",
        f"--layers={_LAYERS.value}",
        f"--profile={_PROFILE.value}",
      ],
      env=env,
      capture_output=True,
      text=True,
      check=False,
    )
    if out.returncode:
      print(f"variant {variant} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
      continue
    all_results.append(json.loads(out.stdout.strip().splitlines()[-1]))
  print(_table(all_results))
  for result in all_results:
    if result.get("conv_layers"):
      print(_layer_table(result))
    for name, m in result["steps"].items():
      for key, title in (("profile_jax", "JAX ops"), ("profile_torch", "PyTorch ops")):
        if key in m:
          print(bench_common.op_table(f"{result['variant']} {name} step, {title}:", m[key]))
  bench_common.write_json(_OUT.value, all_results, default=float)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
