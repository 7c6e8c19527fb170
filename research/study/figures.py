"""Figures people would rather look at than read, saved as PNG through `save_figure`."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from etils import epath  # noqa: E402


def save_figure(fig: Any, path: str | epath.Path) -> str:
  """Saves a matplotlib figure as PNG at `path` (any `etils.epath` location), closes it.

  Args:
    fig: the figure.
    path: the file to write; its folder is created.

  Returns:
    the path written, as a string.
  """
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
  plt.close(fig)
  path.write_bytes(buffer.getvalue())
  return os.fspath(path)


def plot_confusion(confusion: np.ndarray, class_names: Sequence[str], path: str) -> str:
  """Row-normalised confusion matrix as a heat map."""
  norm = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
  size = 1.5 + 0.45 * len(class_names)
  fig, ax = plt.subplots(figsize=(size, size))
  ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
  ax.set_xticks(range(len(class_names)), class_names, rotation=90)
  ax.set_yticks(range(len(class_names)), class_names)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  for i in range(len(class_names)):
    for j in range(len(class_names)):
      if norm[i, j] >= 0.01:
        ax.text(
          j,
          i,
          f"{norm[i, j]:.2f}",
          ha="center",
          va="center",
          fontsize=7,
          color="white" if norm[i, j] > 0.5 else "black",
        )
  return save_figure(fig, path)


def plot_bars(
  values: dict[str, Sequence[float]], labels: Sequence[str], ylabel: str, path: str
) -> str:
  """Grouped bars: one group per label, one bar per series in `values`."""
  n = len(values)
  width = 0.8 / max(n, 1)
  fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(labels) * max(n, 1)), 3.2))
  for i, (series, ys) in enumerate(values.items()):
    ax.bar(np.arange(len(labels)) + i * width - 0.4 + width / 2, ys, width, label=series)
  ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
  ax.set_ylabel(ylabel)
  if n > 1:
    ax.legend(fontsize=8)
  return save_figure(fig, path)


def class_palette(num_classes: int) -> np.ndarray:
  """[K, 3] distinct colours in [0, 1] for label maps."""
  return plt.get_cmap("tab10" if num_classes <= 10 else "tab20")(np.arange(num_classes))[:, :3]


def colourise(labels: np.ndarray, num_classes: int, ignore_label: int = 255) -> np.ndarray:
  """[H, W] labels -> [H, W, 3] colours (ignore pixels black)."""
  palette = np.concatenate([class_palette(num_classes), np.zeros((1, 3))])
  return palette[np.where(labels == ignore_label, num_classes, labels)]


def plot_segmentation_rows(
  rows: Sequence[tuple[str, Sequence[np.ndarray]]], num_classes: int, path: str
) -> str:
  """A grid of images: each row is (title, [panel, ...]); int panels are coloured label maps."""
  ncols = max(len(panels) for _, panels in rows)
  fig, axes = plt.subplots(len(rows), ncols, figsize=(2.0 * ncols, 2.0 * len(rows)), squeeze=False)
  for r, (title, panels) in enumerate(rows):
    for c in range(ncols):
      ax = axes[r, c]
      ax.axis("off")
      if c < len(panels):
        p = np.asarray(panels[c])
        ax.imshow(colourise(p, num_classes) if p.ndim == 2 else p)
    axes[r, 0].set_title(title, fontsize=8, loc="left")
  return save_figure(fig, path)


def plot_curves(
  series: dict[str, tuple[Sequence[float], Sequence[float], Sequence[float] | None]],
  xlabel: str,
  ylabel: str,
  path: str,
) -> str:
  """Lines with optional spread bands: {name: (xs, means, stds or None)}."""
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for name, (xs, ys, spread) in series.items():
    ax.plot(xs, ys, marker="o", label=name)
    if spread is not None:
      ax.fill_between(xs, np.asarray(ys) - spread, np.asarray(ys) + spread, alpha=0.2)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  return save_figure(fig, path)
