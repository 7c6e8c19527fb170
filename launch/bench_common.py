"""What every benchmark script records about the machine it ran on."""

from __future__ import annotations

import importlib
import json
import os
import platform
import statistics
import time

_PEERS = (
  "jax",
  "jaxlib",
  "flax",
  "optax",
  "ott",
  "torch",
  "ot",
  "pytorch_metric_learning",
  "scipy",
)


def write_json(path: str, data, default=None) -> None:
  """Writes a benchmark's results to the JSON file `path`, creating its folder.

  Args:
    path: the output file.
    data: the results (JSON-serialisable, or made so by `default`).
    default: `json.dump`'s `default`, called on objects it cannot serialise (e.g. `float`).
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(data, f, indent=2, default=default)


def cpu_model() -> str:
  """The CPU model name from /proc/cpuinfo ("unknown" elsewhere)."""
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  return "unknown"


def machine_info() -> dict:
  """CPU model, cores, load average, JAX devices and versions of the installed libraries."""
  import jax

  info = {
    "cpu": cpu_model(),
    "cores": os.cpu_count(),
    "load_average_1_5_15": list(os.getloadavg()),
    "python": platform.python_version(),
    "devices": [str(d) for d in jax.devices()],
  }
  for name in _PEERS:
    try:
      info[name] = importlib.import_module(name).__version__
    except (ImportError, AttributeError):
      info[name] = None
  if info["torch"] is not None:
    import torch

    info["torch_threads"] = torch.get_num_threads()
  return info


# PyTorch twins of this codebase's networks (same layers and shapes), for peer timings.


def _torch_group_norm(channels: int):
  import torch.nn as tnn

  groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
  return tnn.GroupNorm(groups, channels, eps=1e-6)


def _torch_resnet_backbone(stage_sizes, widths, in_channels):
  """The torch twin of `research.models.resnet.ResNet`'s backbone (same layers and shapes)."""
  import torch
  import torch.nn as tnn

  class Block(tnn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.gn1 = _torch_group_norm(cout)
      self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.gn2 = _torch_group_norm(cout)
      self.proj = None
      if stride != 1 or cin != cout:
        self.proj = tnn.Sequential(
          tnn.Conv2d(cin, cout, 1, stride, bias=False), _torch_group_norm(cout)
        )

    def forward(self, x):
      y = torch.relu(self.gn1(self.conv1(x)))
      y = self.gn2(self.conv2(y))
      return torch.relu((self.proj(x) if self.proj is not None else x) + y)

  class Backbone(tnn.Module):
    def __init__(self):
      super().__init__()
      self.stem = tnn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
      self.gn = _torch_group_norm(widths[0])
      stages, cin = [], widths[0]
      for s, (n, w) in enumerate(zip(stage_sizes, widths)):
        blocks = [Block(cin if b == 0 else w, w, 2 if s > 0 and b == 0 else 1) for b in range(n)]
        stages.append(tnn.Sequential(*blocks))
        cin = w
      self.stages = tnn.ModuleList(stages)

    def forward(self, x):
      y = torch.relu(self.gn(self.stem(x)))
      features = []
      for stage in self.stages:
        y = stage(y)
        features.append(y)
      return features

  return Backbone()


def torch_classifier(stage_sizes, widths, num_classes, embedding_dim, in_channels):
  """Torch twin of `ResNet(num_classes, ...)`: backbone, mean pool, embedding and classifier."""
  import torch
  import torch.nn as tnn

  class Classifier(tnn.Module):
    def __init__(self):
      super().__init__()
      self.backbone = _torch_resnet_backbone(stage_sizes, widths, in_channels)
      self.embedding = tnn.Linear(widths[-1], embedding_dim)
      self.classifier = tnn.Linear(widths[-1], num_classes)

    def forward(self, x):
      pooled = self.backbone(x)[-1].mean((2, 3))
      emb = self.embedding(pooled)
      emb = emb / torch.sqrt((emb**2).sum(-1, keepdim=True) + 1e-12)
      return self.classifier(pooled), emb

  return Classifier()


def torch_segmenter(stage_sizes, widths, decoder_width, num_classes):
  """Torch twin of `Segmenter`: FPN-like decoder with nearest upsampling."""
  import torch
  import torch.nn as tnn

  class Seg(tnn.Module):
    def __init__(self):
      super().__init__()
      self.backbone = _torch_resnet_backbone(stage_sizes, widths, 3)
      self.lateral_last = tnn.Conv2d(widths[-1], decoder_width, 1)
      self.laterals = tnn.ModuleList([tnn.Conv2d(w, decoder_width, 1) for w in widths[:-1]])
      self.smooth = tnn.ModuleList(
        [
          tnn.Sequential(
            tnn.Conv2d(decoder_width, decoder_width, 3, 1, 1),
            _torch_group_norm(decoder_width),
            tnn.ReLU(),
          )
          for _ in widths[:-1]
        ]
      )
      self.classifier = tnn.Conv2d(decoder_width, num_classes, 3, 1, 1)

    def forward(self, x):
      features = self.backbone(x)
      y = self.lateral_last(features[-1])
      for i in reversed(range(len(features) - 1)):
        f = features[i]
        y = torch.nn.functional.interpolate(y, size=f.shape[2:], mode="nearest")
        y = self.smooth[i](y + self.laterals[i](f))
      y = torch.nn.functional.interpolate(y, size=x.shape[2:], mode="nearest")
      return self.classifier(y)

  return Seg()


# Per-op profiles (which operation the time goes to), for both frameworks.


def _hlo_op_kinds(hlo_text: str) -> dict[str, str]:
  """Maps each instruction name of a compiled HLO module to a short description.

  Plain instructions map to their opcode; a fusion maps to ``fusion[...]`` listing the
  expensive opcodes inside it (convolution, dot, reduce, exponential, ...) so that a profile
  row says what the fused kernel computes.
  """
  import re

  computations, current = {}, None
  for line in hlo_text.splitlines():
    header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if header:
      current = computations.setdefault(header.group(1), [])
      continue
    op = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*? ([a-z][\w\-]*)\(", line)
    if op and current is not None:
      calls = re.search(r"calls=%?([\w.\-]+)", line)
      current.append((op.group(1), op.group(2), calls.group(1) if calls else None))
  notable = ("convolution", "dot", "reduce", "exponential", "log", "reduce-window", "scatter")
  kinds = {}
  for ops in computations.values():
    for name, opcode, called in ops:
      if opcode == "fusion" and called in computations:
        inner = sorted({o for _, o, _ in computations[called] if o in notable})
        kinds[name] = f"fusion[{','.join(inner)}]" if inner else "fusion[elementwise]"
      else:
        kinds[name] = opcode
  return kinds


def jax_op_profile(fn, compiled, calls: int = 3, top: int = 12) -> list[dict]:
  """Top XLA ops by time of a jitted function, from a `jax.profiler` trace.

  Args:
    fn: zero-argument function that runs the compiled program once and blocks.
    compiled: the `jax.stages.Compiled` of that program (for op descriptions).
    calls: traced calls; times are per call.
    top: rows to keep.

  Returns:
    Rows ``{"op", "kind", "ms_per_call", "share"}`` sorted by time; ``share`` is the fraction
    of the summed op time (ops on different threads may overlap, so the sum can exceed the
    wall time). Control flow (``while``, ``conditional``, ``call``) is left out: its time is
    that of the ops inside it, which are listed themselves.
  """
  import collections
  import glob
  import tempfile

  import jax

  kinds = _hlo_op_kinds(compiled.as_text())
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      for _ in range(calls):
        fn()
    (path,) = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)
    profile = jax.profiler.ProfileData.from_file(path)
    totals = collections.Counter()
    for plane in profile.planes:
      for line in plane.lines:
        for event in line.events:
          stats = dict(event.stats)
          name = stats.get("hlo_op")
          if name is not None and kinds.get(name) not in ("while", "conditional", "call"):
            totals[name] += event.duration_ns
  total = sum(totals.values()) or 1
  return [
    {
      "op": name,
      "kind": kinds.get(name, "?"),
      "ms_per_call": ns / calls / 1e6,
      "share": ns / total,
    }
    for name, ns in totals.most_common(top)
  ]


def torch_op_profile(fn, calls: int = 3, top: int = 12) -> list[dict]:
  """Top PyTorch operators by self CPU time, from `torch.profiler`.

  Args:
    fn: zero-argument function running the PyTorch work once.
    calls: profiled calls; times are per call.
    top: rows to keep.

  Returns:
    Rows ``{"op", "ms_per_call", "share"}`` sorted by self CPU time.
  """
  import torch

  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(calls):
      fn()
  events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
  total = sum(e.self_cpu_time_total for e in events) or 1
  events.sort(key=lambda e: -e.self_cpu_time_total)
  return [
    {
      "op": e.key,
      "ms_per_call": e.self_cpu_time_total / calls / 1e3,
      "share": e.self_cpu_time_total / total,
    }
    for e in events[:top]
  ]


def op_table(title: str, rows: list[dict]) -> str:
  """A printable table of `jax_op_profile` / `torch_op_profile` rows."""
  lines = [title]
  for row in rows:
    kind = f" {row['kind']}" if "kind" in row else ""
    lines.append(f"  {row['ms_per_call']:8.2f} ms {100 * row['share']:5.1f}%  {row['op']}{kind}")
  return "\n".join(lines)


def alternate(fns: dict, repeats: int, iters: int) -> dict:
  """Times each callable `iters` times per round, rounds alternating; seconds per call."""
  times = {name: [] for name in fns}
  for fn in fns.values():  # warm-up (compilation, allocator)
    fn()
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      for _ in range(iters):
        fn()
      times[name].append((time.perf_counter() - start) / iters)
  stats = lambda t: {"min": min(t), "median": statistics.median(t), "max": max(t)}  # noqa: E731
  return {name: stats(t) for name, t in times.items()}
