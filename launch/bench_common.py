"""What every benchmark script records about the machine it ran on."""

from __future__ import annotations

import importlib
import os
import platform

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
