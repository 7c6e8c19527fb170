r"""Benchmark of M3: our jitted triplet loss and dual step vs pytorch-metric-learning on the CPU.

    python -m launch.bench_long_tail --out=runs/bench_long_tail.json

Two measurements, each timed alternately (JAX, torch, JAX, ...) with repeats:

1. Triplet loss forward + backward, B = 256, d = 128, batch-hard with margin 0.2 on
   L2-normalised embeddings: `core.batch_hard_triplet_loss` (jit of value_and_grad) vs
   pytorch-metric-learning's `TripletMarginLoss(margin, reducer=MeanReducer())` with
   `BatchHardMiner()` (the mean over anchors of the hardest triplet, the same quantity as
   ours; the values are compared too).
2. The full dual training step of the digits experiment (ResNet with stages (1, 1, 1),
   widths (16, 32, 64), GroupNorm, 8x8 images, 32 head images + 8 x 4 PK images, Adam):
   our compiled `steps.train_step` with `arms.dual_loss_fn` vs the same network written
   in torch with CE on the head batch + the pytorch-metric-learning loss on the PK batch.

torch and pytorch-metric-learning are benchmark-only dependencies (not in setup.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from launch import bench_common
from research.long_tail import arms, core
from research.models.resnet import ResNet
from research.training import state, steps

_OUT = flags.DEFINE_string("out", "", "Where to write the JSON results (optional).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Alternating rounds per measurement.")
_ITERS = flags.DEFINE_integer("iters", 3, "Calls per round (time per call is reported).")

MARGIN = 0.2


def triplet_benchmark(repeats: int, iters: int) -> dict:
  """Batch-hard triplet loss forward + backward, B = 256, d = 128."""
  import torch
  from pytorch_metric_learning import losses as pml_losses
  from pytorch_metric_learning import miners, reducers

  rs = np.random.RandomState(0)
  emb = rs.randn(256, 128).astype(np.float32)
  labels = np.repeat(np.arange(32), 8)

  def jax_loss(e, y):
    return core.batch_hard_triplet_loss(core.l2_normalize(e), y, MARGIN)

  jax_fn = jax.jit(jax.value_and_grad(jax_loss))
  e_j, y_j = jnp.asarray(emb), jnp.asarray(labels)

  pml_loss = pml_losses.TripletMarginLoss(margin=MARGIN, reducer=reducers.MeanReducer())
  miner = miners.BatchHardMiner()
  e_t = torch.tensor(emb, requires_grad=True)
  y_t = torch.tensor(labels)

  def torch_step():
    e_t.grad = None
    loss = pml_loss(e_t, y_t, miner(e_t, y_t))
    loss.backward()
    return loss

  def jax_step():
    return jax.block_until_ready(jax_fn(e_j, y_j))

  value_jax = float(jax_step()[0])
  value_torch = float(torch_step().detach())
  timing = bench_common.alternate({"jax": jax_step, "torch_pml": torch_step}, repeats, iters)
  return {
    "what": "batch-hard triplet loss forward+backward, B=256, d=128, margin 0.2",
    "loss_jax": value_jax,
    "loss_torch_pml": value_torch,
    **timing,
    "ratio_torch_over_jax": timing["torch_pml"]["median"] / timing["jax"]["median"],
  }


NUM_CLASSES, HEAD_CLASSES = 10, np.arange(5)


def dual_step_inputs(scale: int = 1) -> dict:
  """The digits dual step's batch as numpy: 32 x scale head images, (8 x 4) x scale PK images."""
  rs = np.random.RandomState(0)
  return {
    "head_image": rs.randint(0, 256, (32 * scale, 8, 8, 1)).astype(np.uint8),
    "head_label": rs.randint(0, 5, 32 * scale),
    "pk_image": rs.randint(0, 256, (32 * scale, 8, 8, 1)).astype(np.uint8),
    "pk_label": np.repeat(rs.choice(NUM_CLASSES, 8, replace=False), 4 * scale),
  }


def jax_dual_step(inputs: dict):
  """Our compiled dual step (`arms.dual_loss_fn`, Adam) on `inputs`: a function running one step."""
  model = ResNet(NUM_CLASSES, (1, 1, 1), (16, 32, 64), 32, 1)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
  tx = optax.adam(1e-3)
  loss_fn = functools.partial(
    arms.dual_loss_fn,
    model=model,
    head_classes=HEAD_CLASSES,
    lambda_ce=1.0,
    lambda_tri=1.0,
    mining="batch_hard",
    margin=MARGIN,
  )
  step = jax.jit(functools.partial(steps.train_step, loss_fn=loss_fn, tx=tx))
  batch = jax.device_put(inputs)
  holder = {"state": state.create_train_state(params, tx)}
  rng = jax.random.key(1)

  def jax_step():
    holder["state"], metrics = step(holder["state"], batch, rng)
    return jax.block_until_ready(metrics["loss"])

  return jax_step


def torch_dual_step(inputs: dict, device: str = "cpu"):
  """The same step in torch + pytorch-metric-learning on `device`: a function running one step."""
  import torch
  from pytorch_metric_learning import losses as pml_losses
  from pytorch_metric_learning import miners, reducers

  net = bench_common.torch_classifier((1, 1, 1), (16, 32, 64), NUM_CLASSES, 32, 1).to(device)
  opt = torch.optim.Adam(net.parameters(), lr=1e-3)
  pml_loss = pml_losses.TripletMarginLoss(margin=MARGIN, reducer=reducers.MeanReducer())
  miner = miners.BatchHardMiner()

  def to_t(im):
    return (torch.tensor(im, dtype=torch.float32).permute(0, 3, 1, 2) / 255.0).to(device)

  th_img, th_lab = to_t(inputs["head_image"]), torch.tensor(inputs["head_label"]).to(device)
  tp_img, tp_lab = to_t(inputs["pk_image"]), torch.tensor(inputs["pk_label"]).to(device)
  head_idx = torch.tensor(HEAD_CLASSES).to(device)

  def torch_step():
    opt.zero_grad()
    logits, _ = net(th_img)
    _, emb = net(tp_img)
    ce = torch.nn.functional.cross_entropy(logits[:, head_idx], th_lab)
    loss = ce + pml_loss(emb, tp_lab, miner(emb, tp_lab))
    loss.backward()
    opt.step()
    if device != "cpu":
      torch.cuda.synchronize()
    return loss

  return torch_step


def dual_step_benchmark(repeats: int, iters: int) -> dict:
  """The digits experiment's dual step (32 head + 8 x 4 PK images) in JAX vs torch + pml."""
  inputs = dual_step_inputs()
  fns = {"jax": jax_dual_step(inputs), "torch_pml": torch_dual_step(inputs)}
  timing = bench_common.alternate(fns, repeats, iters)
  return {
    "what": "dual step: ResNet(1,1,1)x(16,32,64) GroupNorm, 8x8x1, 32 head + 8x4 PK, Adam",
    **timing,
    "ratio_torch_over_jax": timing["torch_pml"]["median"] / timing["jax"]["median"],
  }


def main(argv):
  """Runs both benchmarks, prints a table and writes the JSON."""
  del argv
  results = {
    "machine": bench_common.machine_info(),
    "repeats": _REPEATS.value,
    "iters_per_repeat": _ITERS.value,
    "triplet_loss": triplet_benchmark(_REPEATS.value, _ITERS.value),
    "dual_step": dual_step_benchmark(_REPEATS.value, _ITERS.value),
  }
  print(f"{'benchmark':<14} {'impl':<10} {'min ms':>8} {'median ms':>10} {'max ms':>8}")
  for key in ("triplet_loss", "dual_step"):
    r = results[key]
    for impl in ("jax", "torch_pml"):
      t = r[impl]
      print(
        f"{key:<14} {impl:<10} {1e3 * t['min']:8.3f} {1e3 * t['median']:10.3f} "
        f"{1e3 * t['max']:8.3f}"
      )
    print(f"{key:<14} ratio torch/jax (median): {r['ratio_torch_over_jax']:.2f}")
  tl = results["triplet_loss"]
  print(f"loss values: jax {tl['loss_jax']:.6f}, torch_pml {tl['loss_torch_pml']:.6f}")
  if _OUT.value:
    bench_common.write_json(_OUT.value, results)


if __name__ == "__main__":
  app.run(main)
