"""Run reports: `report.md` with tables, and PNG plots people would rather look at than read."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub-markdown table; floats are printed with 4 significant digits."""

  def cell(v: Any) -> str:
    if isinstance(v, float | np.floating):
      return "nan" if np.isnan(v) else f"{v:.4g}"
    return str(v)

  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def write_report(workdir: str, title: str, sections: Sequence[tuple[str, str]]) -> str:
  """Writes `<workdir>/report.md` from (heading, markdown body) sections; returns its path."""
  os.makedirs(workdir, exist_ok=True)
  parts = [f"# {title}", ""]
  for heading, body in sections:
    parts += [f"## {heading}", "", body, ""]
  path = os.path.join(workdir, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(parts))
  return path


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100, bbox_inches="tight")
  plt.close(fig)
  return path


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
  return _save(fig, path)


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
  return _save(fig, path)


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
  return _save(fig, path)


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
  return _save(fig, path)
