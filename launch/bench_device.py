r"""Each method's jitted hot step on JAX's default device, with the PyTorch peer on that device.

    python -m launch.bench_device --out=runs/bench_device.json [--scales=1,8] [--repeats=5]

`launch.bench_all` compares our step functions with their peers on this repository's 2-core
CPU. This benchmark times the same step functions on whatever device JAX runs on (a GPU or TPU
when the machine has one; the output names it), at the CPU benchmarks' batch (scale 1) and at
larger batches (`--scales`), because small batches only measure launch overhead on an
accelerator:

* M1 attack: `uap_segmentation.core.iterative_fgsm`, 5 rounds, street Segmenter, 16 x scale
  images of 32^2 (`bench_uap.jax_attack`); peer: the same attack in eager PyTorch.
* classification and segmentation train steps (M2's and M1's supervised step, Adam, float32;
  `bench_steps.jax_train_step`); peer: the same networks in PyTorch.
* M3 dual step (CE on the head batch + batch-hard triplet on the PK batch;
  `bench_long_tail.jax_dual_step`); peer: torch + pytorch-metric-learning.
* M4 fine-tuning step of the street demo config (this method and naive fine-tuning;
  `bench_incremental_panoptic.bench_step`), no peer.
* M5 training steps of the street demo config (clean-only, OT, PGD; `bench_ot.train_steps`),
  no peer.

Each part runs in its own subprocess (the benchmark modules it borrows from each define their
own command-line flags, so one process imports one of them). Each pair is timed alternately
(`bench_common.alternate`: warm-up call, then
`--repeats` rounds of `--iters` calls each; seconds per call, min / median / max). The PyTorch
peer runs on CUDA when `torch.cuda.is_available()`, else it is left out (a CPU peer against an
accelerator is no comparison). Ratios are the peer's median seconds over ours (> 1: ours
faster). A part that fails is recorded with its error; the others still run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
import tempfile

from absl import flags

from launch import bench_common

# Flags of this script live in their own FlagValues: the child processes import benchmark
# modules whose flags (`--out`, `--repeats`, ...) would collide with these in absl's global set.
FLAGS = flags.FlagValues()
_OUT = flags.DEFINE_string(
  "out", "runs/bench_device.json", "Where to write the JSON results.", flag_values=FLAGS
)
_SCALES = flags.DEFINE_list(
  "scales", ["1", "8"], "Batch multipliers of the CPU benchmark sizes.", flag_values=FLAGS
)
_REPEATS = flags.DEFINE_integer(
  "repeats", 5, "Alternating rounds per measurement.", flag_values=FLAGS
)
_ITERS = flags.DEFINE_integer("iters", 10, "Calls per round.", flag_values=FLAGS)
_PARTS = flags.DEFINE_list(
  "parts", ["attack", "steps", "dual", "panoptic", "ot"], "Parts to run.", flag_values=FLAGS
)
_TIMEOUT = flags.DEFINE_integer("timeout_s", 900, "Time limit per part.", flag_values=FLAGS)

ATTACK_ROUNDS = 5


@dataclasses.dataclass(frozen=True)
class Timing:
  """How each measurement is timed: `repeats` alternating rounds of `iters` calls each."""

  repeats: int
  iters: int


def torch_device() -> str | None:
  """'cuda' when PyTorch sees a GPU, else None (no peer)."""
  try:
    import torch
  except ImportError:
    return None
  return "cuda" if torch.cuda.is_available() else None


def paired(what: str, work: int, ours, peer, timing: Timing) -> dict:
  """Alternating timings of `ours` and (when not None) `peer`, with work units per second."""
  fns = {"ours": ours} if peer is None else {"ours": ours, "peer": peer}
  seconds = bench_common.alternate(fns, timing.repeats, timing.iters)
  row = {"what": what, "work_per_call": work, **seconds}
  row["ours_per_s"] = work / seconds["ours"]["median"]
  if peer is not None:
    row["peer_per_s"] = work / seconds["peer"]["median"]
    row["ratio_ours_over_peer"] = seconds["peer"]["median"] / seconds["ours"]["median"]
  return row


def attack_rows(scale: int, device: str | None, timing: Timing) -> list[dict]:
  """M1 attack rounds: image-rounds per second."""
  from launch import bench_uap

  n, s = 16 * scale, 32
  ours, _ = bench_uap.jax_attack(n, s, ATTACK_ROUNDS)
  peer = bench_uap.torch_attack(n, s, ATTACK_ROUNDS, device) if device else None
  what = f"M1 attack, {ATTACK_ROUNDS} rounds, {n} x {s}^2 (image-rounds/s)"
  return [paired(what, n * ATTACK_ROUNDS, ours, peer, timing)]


def step_rows(scale: int, device: str | None, timing: Timing) -> list[dict]:
  """Classification and segmentation train steps: images per second."""
  import jax

  from launch import bench_steps

  rows = []
  for name, spec in bench_steps.STEP_SPECS.items():
    spec = {**spec, "batch": spec["batch"] * scale}
    compiled, state, batch, key, info, *_ = bench_steps.jax_train_step(name, spec)
    holder = {"state": state}

    def ours(holder=holder, compiled=compiled, batch=batch, key=key):
      holder["state"], metrics = compiled(holder["state"], batch, key)
      return jax.block_until_ready(metrics)

    peer = bench_steps.torch_train_step(name, spec, device) if device else None
    what = f"{name} train step, batch {spec['batch']} x {spec['size']}^2 (images/s)"
    rows.append({**paired(what, spec["batch"], ours, peer, timing), "compile_s": info["compile_s"]})
  return rows


def dual_rows(scale: int, device: str | None, timing: Timing) -> list[dict]:
  """M3 dual step: images (head + PK) per second."""
  from launch import bench_long_tail

  inputs = bench_long_tail.dual_step_inputs(scale)
  ours = bench_long_tail.jax_dual_step(inputs)
  has_pml = importlib.util.find_spec("pytorch_metric_learning") is not None
  peer = bench_long_tail.torch_dual_step(inputs, device) if device and has_pml else None
  n = len(inputs["head_label"]) + len(inputs["pk_label"])
  return [paired(f"M3 dual step, {n} images of 8^2 (images/s)", n, ours, peer, timing)]


def panoptic_rows(timing: Timing) -> list[dict]:
  """M4 fine-tuning step (demo config), this method and naive: seconds per step."""
  from launch import bench_incremental_panoptic

  result = bench_incremental_panoptic.bench_step(timing.repeats, timing.iters)
  return [
    {
      "what": f"M4 fine-tuning step ({variant}), demo config, batch {result['batch_size']}",
      "ours": result[f"step_{variant}"],
      "compile_s_both": result["compile_s_both"],
    }
    for variant in ("method", "naive")
  ]


def ot_rows(timing: Timing) -> list[dict]:
  """M5 training steps (demo config): clean-only, OT and PGD, seconds per step."""
  from launch import bench_ot

  result = bench_ot.train_steps(timing.repeats)
  return [
    {
      "what": f"M5 {arm} train step, demo config, batch {result['batch_size']}",
      "ours": {"median": t["median_s"]},
      "ratio_to_clean": result["ratio_to_clean"][arm],
    }
    for arm, t in result["timing"].items()
  ]


SCALED_PARTS = {"attack": attack_rows, "steps": step_rows, "dual": dual_rows}
FIXED_PARTS = {"panoptic": panoptic_rows, "ot": ot_rows}


def part_rows(part: str, scales: list[int], device: str | None, timing: Timing) -> list[dict]:
  """The rows of one part (at every scale where it has one), in this process."""
  if part in SCALED_PARTS:
    return [row for s in scales for row in SCALED_PARTS[part](s, device, timing)]
  return FIXED_PARTS[part](timing)


def run_part_in_subprocess(part: str, scales: list[int], timing: Timing) -> list[dict]:
  """`part_rows` in a fresh process; a failure or timeout becomes one row with its error."""
  with tempfile.NamedTemporaryFile(suffix=".json") as out:
    code = (
      "import json, sys; from launch import bench_device as b; "
      f"rows = b.part_rows({part!r}, {scales!r}, b.torch_device(), b.{timing!r}); "
      f"json.dump(rows, open({out.name!r}, 'w'), default=float)"
    )
    try:
      done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=_TIMEOUT.value
      )
    except subprocess.TimeoutExpired:
      return [{"what": part, "error": f"timed out after {_TIMEOUT.value} s"}]
    if done.returncode:
      return [{"what": part, "error": done.stderr[-3000:]}]
    with open(out.name) as f:
      return json.load(f)


def format_row(row: dict) -> str:
  """One printed line: median milliseconds per call of ours and the peer, and their ratio."""
  if "error" in row:
    return f"{row['what']}: FAILED\n{row['error']}"
  line = f"{row['what']:<66} ours {row['ours']['median'] * 1e3:9.3f} ms"
  if "peer" in row:
    peer_ms = row["peer"]["median"] * 1e3
    line += f"   peer {peer_ms:9.3f} ms   ratio {row['ratio_ours_over_peer']:5.2f}"
  return line


def main(argv):
  """Runs every part, prints one line per step and writes the JSON."""
  FLAGS(argv)
  unknown = [p for p in _PARTS.value if p not in {**SCALED_PARTS, **FIXED_PARTS}]
  if unknown:
    allowed = [*SCALED_PARTS, *FIXED_PARTS]
    raise ValueError(f"--parts={unknown} is not allowed: choose from {allowed}")
  import jax

  device = torch_device()
  header = {
    "jax_devices": [str(d) for d in jax.devices()],
    "jax_backend": jax.default_backend(),
    "torch_peer_device": device,
    "machine": bench_common.machine_info(),
  }
  print(f"JAX on {header['jax_devices'][0]} ({header['jax_backend']}); peer: {device or 'none'}")
  print("seconds per call, medians; ratio = peer / ours (> 1: ours faster)", flush=True)
  timing = Timing(_REPEATS.value, _ITERS.value)
  scales = [int(s) for s in _SCALES.value]
  rows = []
  for part in _PARTS.value:
    for row in run_part_in_subprocess(part, scales, timing):
      print(format_row(row), flush=True)
      rows.append(row)
    bench_common.write_json(_OUT.value, {**header, "rows": rows}, default=float)  # after each
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  main(sys.argv)
