"""A ResNet family for small images: logits, an L2-normalised embedding and multi-scale maps.

Basic residual blocks (He et al. 2016) with GroupNorm, so that a step function needs no batch
statistics and results do not depend on how a batch is split across devices. Convolutions are
`research.models.conv.Conv`: `nn.Conv` with faster gradients on CPU. Depth and width
are configurable: `stage_sizes=(2, 2, 2)` and `widths=(16, 32, 64)` is a CIFAR-style
ResNet-20; (5, 5, 5) is ResNet-32.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from research.models import conv


def group_norm(channels: int) -> nn.GroupNorm:
  """GroupNorm with at most 8 groups that divide `channels`."""
  groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
  return nn.GroupNorm(num_groups=groups)


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with a projection shortcut when the shape changes."""

  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """[B, H, W, C_in] -> [B, H / strides, W / strides, features]."""
    residual = x
    y = conv.Conv(self.features, (3, 3), self.strides, use_bias=False)(x)
    y = nn.relu(group_norm(self.features)(y))
    y = conv.Conv(self.features, (3, 3), use_bias=False)(y)
    y = group_norm(self.features)(y)
    if residual.shape != y.shape:
      residual = conv.Conv(self.features, (1, 1), self.strides, use_bias=False)(residual)
      residual = group_norm(self.features)(residual)
    return nn.relu(residual + y)


class ResNet(nn.Module):
  """ResNet backbone with a classifier and an embedding head.

  Attributes:
    num_classes: classifier outputs (0 for none).
    stage_sizes: blocks per stage; each stage after the first halves the resolution.
    widths: channels per stage.
    embedding_dim: size of the L2-normalised embedding.
    stem_strides: stride of the 3x3 stem (1 for 8x8 or 32x32 inputs).
  """

  num_classes: int
  stage_sizes: Sequence[int] = (2, 2, 2)
  widths: Sequence[int] = (16, 32, 64)
  embedding_dim: int = 64
  stem_strides: int = 1

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> dict:
    """Runs the network.

    Args:
      x: [B, H, W, C] float images in [0, 1].
      train: unused (GroupNorm behaves the same); kept for a uniform interface.

    Returns:
      dict with `logits` [B, num_classes], `embedding` [B, embedding_dim] (unit L2 norm),
      `pooled` [B, widths[-1]], `features` (list of stage outputs [B, h_i, w_i, widths[i]])
      and `feature_map` (the last stage output).
    """
    del train
    if len(self.stage_sizes) != len(self.widths):
      raise ValueError(
        f"stage_sizes={tuple(self.stage_sizes)} and widths={tuple(self.widths)} must have the "
        "same length"
      )
    y = conv.Conv(self.widths[0], (3, 3), self.stem_strides, use_bias=False, name="stem")(x)
    y = nn.relu(group_norm(self.widths[0])(y))
    features = []
    for stage, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for block in range(blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        y = BasicBlock(width, strides)(y)
      features.append(y)
    pooled = jnp.mean(y, axis=(1, 2))
    embedding = nn.Dense(self.embedding_dim, name="embedding")(pooled)
    embedding = embedding / jnp.sqrt(jnp.sum(embedding**2, -1, keepdims=True) + 1e-12)
    out = {"pooled": pooled, "embedding": embedding, "features": features, "feature_map": y}
    if self.num_classes:
      out["logits"] = nn.Dense(self.num_classes, name="classifier")(pooled)
    return out


class Segmenter(nn.Module):
  """A small encoder-decoder for semantic segmentation on a ResNet backbone.

  The decoder is FPN-like: each backbone stage is projected to `decoder_width` channels, the
  coarser map is upsampled and added, and the finest sum is upsampled to the input size.

  Attributes:
    num_classes: K output classes.
    stage_sizes: backbone blocks per stage.
    widths: backbone channels per stage.
    decoder_width: channels of the decoder.
  """

  num_classes: int
  stage_sizes: Sequence[int] = (1, 1, 1)
  widths: Sequence[int] = (16, 32, 64)
  decoder_width: int = 32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> dict:
    """Per-pixel class logits.

    Args:
      x: [B, H, W, 3] float images in [0, 1].
      train: unused; kept for a uniform interface.

    Returns:
      dict with `logits` [B, H, W, K] and the backbone's `features`.
    """
    backbone = ResNet(0, self.stage_sizes, self.widths, name="backbone")(x, train)
    features = backbone["features"]
    y = conv.Conv(self.decoder_width, (1, 1), name="lateral_last")(features[-1])
    for i, f in reversed(list(enumerate(features[:-1]))):
      y = jnp.repeat(jnp.repeat(y, f.shape[1] // y.shape[1], 1), f.shape[2] // y.shape[2], 2)
      y = y + conv.Conv(self.decoder_width, (1, 1), name=f"lateral_{i}")(f)
      y = nn.relu(group_norm(self.decoder_width)(conv.Conv(self.decoder_width, (3, 3))(y)))
    b, h, w, _ = x.shape
    y = jnp.repeat(jnp.repeat(y, h // y.shape[1], 1), w // y.shape[2], 2)
    logits = conv.Conv(self.num_classes, (3, 3), name="classifier")(y)
    return {"logits": logits, "features": features}
