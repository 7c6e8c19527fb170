r"""Every hot-loop benchmark, each against its peer, into one JSON (issue 18).

    python -m launch.bench_all [--out=runs/bench_all.json] [--full]

Runs one subprocess per benchmark (so each has a fresh process, XLA flags and thread pools):
`bench_uap` (M1 attack rounds vs PyTorch, per-op profiles), `bench_ot` (M5 OT matching vs POT,
gradient accuracy per Sinkhorn threshold), `bench_incremental_panoptic` (M4 Hungarian matching
vs scipy), `bench_steps` (classification and segmentation train steps vs PyTorch, per-op
profiles) and `bench_long_tail` (M3 triplet loss and dual step vs pytorch-metric-learning).
Each writes its own JSON under `<out>.d/`; this script collects them with the machine
description, the load average before and after each benchmark, and a summary of the speed
ratios (ours over the peer's speed: above 1 means ours is faster). By default every
benchmark runs at its quick size (few repeats, no optional parts) so the whole run takes a few
minutes; `--full` uses each benchmark's own defaults. A benchmark that fails is recorded with
its error and does not stop the others.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app, flags

from launch import bench_common

_OUT = flags.DEFINE_string("out", "runs/bench_all.json", "Where to write the combined JSON.")
_FULL = flags.DEFINE_bool("full", False, "Run each benchmark at its default (full) size.")
_ONLY = flags.DEFINE_list("only", [], "Run only these benchmarks (names of BENCHMARKS).")
_TIMEOUT = flags.DEFINE_integer("timeout_s", 1800, "Time limit per benchmark.")

# name -> (module, quick arguments).
BENCHMARKS = {
  "uap": ("launch.bench_uap", ["--noscaling", "--repeats=3"]),
  "ot": (
    "launch.bench_ot",
    ["--notrain_step", "--repeats=3", "--sizes=32,64,128,256,512", "--accuracy_sizes=128"],
  ),
  "incremental_panoptic": ("launch.bench_incremental_panoptic", ["--nostep", "--repeats=3"]),
  "steps": ("launch.bench_steps", ["--repeats=2", "--iters=2", "--nolayers"]),
  "long_tail": ("launch.bench_long_tail", ["--repeats=3"]),
}


def summarize(name: str, result: dict | list) -> dict:
  """Speed ratios (ours over the peer's speed; > 1 is faster) of one benchmark's JSON.

  Args:
    name: a key of ``BENCHMARKS``.
    result: the JSON that benchmark wrote.

  Returns:
    ``{what: ratio}``.
  """
  if name == "uap":
    rounds = result["rounds"]
    return {
      "M1 attack rounds vs PyTorch (medians)": rounds.get("ratio_jax_over_pytorch_rounds_per_s"),
      "M1 attack rounds vs PyTorch (best calls)": rounds.get("ratio_jax_over_pytorch_best"),
    }
  if name == "ot":
    return {f"M5 OT matching N={r['n']} vs POT": r["speedup_vs_pot"] for r in result["ot_matching"]}
  if name == "incremental_panoptic":
    return {
      f"M4 matching {shape} {solver} vs scipy": ratio
      for shape, r in result["matching"].items()
      for solver, ratio in r["ratio_vs_scipy"].items()
    }
  if name == "steps":
    return {
      f"{step} train step ({variant['variant']}) vs PyTorch": m["ratio_jax_over_torch"]
      for variant in result
      for step, m in variant["steps"].items()
    }
  if name == "long_tail":
    return {
      f"M3 {key} vs pytorch-metric-learning": result[key]["ratio_torch_over_jax"]
      for key in ("triplet_loss", "dual_step")
    }
  raise ValueError(f"name={name!r} is not allowed: choose from {list(BENCHMARKS)}")


def run_one(name: str, out_dir: str) -> dict:
  """Runs one benchmark in a subprocess and returns its record for the combined JSON."""
  module, quick = BENCHMARKS[name]
  out = os.path.join(out_dir, f"{name}.json")
  cmd = [sys.executable, "-m", module, f"--out={out}", *([] if _FULL.value else quick)]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  record = {"command": " ".join(cmd[1:]), "load_average_before": list(os.getloadavg())}
  start = time.perf_counter()
  try:
    done = subprocess.run(
      cmd, cwd=root, capture_output=True, text=True, timeout=_TIMEOUT.value, check=False
    )
    record["returncode"], record["stdout"] = done.returncode, done.stdout
    if done.returncode:
      record["error"] = done.stderr[-3000:]
  except subprocess.TimeoutExpired:
    record["returncode"], record["error"] = None, f"timed out after {_TIMEOUT.value} s"
  record["wall_s"] = time.perf_counter() - start
  record["load_average_after"] = list(os.getloadavg())
  if record["returncode"] == 0:
    with open(out) as f:
      record["result"] = json.load(f)
    record["ratios"] = summarize(name, record["result"])
  return record


def main(argv):
  """Runs the benchmarks, prints their tables and the ratio summary, writes the JSON."""
  del argv
  names = _ONLY.value or list(BENCHMARKS)
  unknown = [n for n in names if n not in BENCHMARKS]
  if unknown:
    raise ValueError(f"--only={unknown} is not allowed: choose from {list(BENCHMARKS)}")
  out_dir = _OUT.value + ".d"
  os.makedirs(out_dir, exist_ok=True)
  combined = {"machine": bench_common.machine_info(), "full": _FULL.value, "benchmarks": {}}
  for name in names:
    print(f"== {name}", flush=True)
    record = run_one(name, out_dir)
    combined["benchmarks"][name] = record
    print(record.get("stdout", ""), record.get("error", ""), sep="\n", flush=True)
  print("== speed ratios, ours / peer (> 1: ours faster); load = 1-min average before -> after")
  for name, record in combined["benchmarks"].items():
    load = f"load {record['load_average_before'][0]:.1f} -> {record['load_average_after'][0]:.1f}"
    if "ratios" not in record:
      print(f"{name}: failed ({load}); see the JSON")
      continue
    for what, ratio in record["ratios"].items():
      print(f"{what:<58} {ratio:6.2f}   {load}")
  combined["machine"]["load_average_end"] = list(os.getloadavg())
  bench_common.write_json(_OUT.value, combined, default=float)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
