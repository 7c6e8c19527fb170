"""A ResNet family: logits, an L2-normalised embedding and multi-scale maps.

Residual blocks (He et al. 2016) with GroupNorm, so that a step function needs no batch
statistics and results do not depend on how a batch is split across devices. Convolutions are
`research.models.conv.Conv`: `nn.Conv` with faster gradients on CPU.

The backbone is chosen by name (`BACKBONES`, `config.model.backbone`):

* `'small'` (the default): the configurable ResNet for small images. A 3x3 stem of stride
  `stem_strides`, then `len(stage_sizes)` stages of basic blocks with `widths` channels; each
  stage after the first halves the resolution, so stage `i` has stride
  `stem_strides * 2**i` (`feature_strides`). `stage_sizes=(2, 2, 2)` and
  `widths=(16, 32, 64)` is a CIFAR-style ResNet-20; (5, 5, 5) is ResNet-32.
* `'resnet18'`, `'resnet50'`: the standard ImageNet ResNets (basic blocks (2, 2, 2, 2); bottleneck
  blocks of expansion 4 (3, 4, 6, 3), stride on the 3x3 convolution as in torchvision), widths
  64-128-256-512 (x4 for bottlenecks), with the ImageNet stem: 7x7 convolution of stride 2 and a
  3x3 max-pool of stride 2. The four stages have strides 4, 8, 16 and 32 (output stride 32);
  `stage_sizes`, `widths` and `stem_strides` are ignored. GroupNorm (at most 8 groups) replaces
  BatchNorm: it has the same scale and bias parameters, so the parameter counts are
  torchvision's (11,689,512 and 25,557,032 with a 1000-class head, without the embedding).

`dtype` is the compute dtype (e.g. `jnp.bfloat16`): parameters stay float32, activations are
computed in `dtype`, and the returned `logits`, `embedding` and `pooled` are float32. None
computes in the parameters' dtype, float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from research import config_checks
from research.models import conv

BACKBONES = ("small", "resnet18", "resnet50")
# name -> (block, blocks per stage, widths per stage before expansion).
NAMED_BACKBONES = {
  "resnet18": ("basic", (2, 2, 2, 2), (64, 128, 256, 512)),
  "resnet50": ("bottleneck", (3, 4, 6, 3), (64, 128, 256, 512)),
}
BOTTLENECK_EXPANSION = 4
NAMED_STRIDES = (4, 8, 16, 32)  # Stage strides of the named backbones (ImageNet stem: 4).
DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


def check_backbone(backbone: str, field: str = "backbone") -> str:
  """`backbone`, which must be one of `BACKBONES`; else a ValueError naming `field`."""
  if backbone not in BACKBONES:
    raise ValueError(f"{field}={backbone!r} is not allowed: choose one of {sorted(BACKBONES)}")
  return backbone


def backbone_from_config(config: Any) -> str:
  """`config.model.backbone`, validated; `'small'` when the config has no such field.

  Raises:
    config_checks.ConfigError: naming `config.model.backbone`, its value and `BACKBONES`.
  """
  return config_checks.check_choice(config, "model.backbone", BACKBONES, default="small")


def dtype_from_config(config: Any) -> Any:
  """The compute dtype of `config.model.dtype` ('float32' -> None, 'bfloat16'); default None.

  Raises:
    config_checks.ConfigError: naming `config.model.dtype`, its value and `DTYPES`.
  """
  return DTYPES[config_checks.check_choice(config, "model.dtype", DTYPES, default="float32")]


def model_options(config: Any) -> dict[str, Any]:
  """`{"backbone": ..., "dtype": ...}` of `config.model`, validated, for `ResNet` / `Segmenter`."""
  return {"backbone": backbone_from_config(config), "dtype": dtype_from_config(config)}


def backbone_options(config: Any) -> dict[str, Any]:
  """`model_options` with `stage_sizes` and `widths` (tuples) of `config.model`.

  The backbone arguments that `ResNet` and `Segmenter` take alike, validated.
  """
  m = config.model
  return {"stage_sizes": tuple(m.stage_sizes), "widths": tuple(m.widths), **model_options(config)}


def feature_strides(
  backbone: str = "small", num_stages: int = 3, stem_strides: int = 1
) -> tuple[int, ...]:
  """Stride (input pixels per cell) of each stage output of a backbone, fine -> coarse.

  Args:
    backbone: one of `BACKBONES`.
    num_stages: `len(stage_sizes)` of the `'small'` backbone (ignored for named ones).
    stem_strides: stem stride of the `'small'` backbone (ignored for named ones).
  """
  if check_backbone(backbone) == "small":
    return tuple(stem_strides * 2**i for i in range(num_stages))
  return NAMED_STRIDES


def feature_channels(backbone: str = "small", widths: Sequence[int] = (16, 32, 64)) -> tuple:
  """Channels of each stage output of a backbone (`widths` for `'small'`)."""
  if check_backbone(backbone) == "small":
    return tuple(widths)
  block, _, named_widths = NAMED_BACKBONES[backbone]
  expansion = BOTTLENECK_EXPANSION if block == "bottleneck" else 1
  return tuple(w * expansion for w in named_widths)


def group_norm(channels: int, dtype: Any = None) -> nn.GroupNorm:
  """GroupNorm with at most 8 groups that divide `channels` (statistics in float32)."""
  groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
  return nn.GroupNorm(num_groups=groups, dtype=dtype)


def conv_norm(x: jnp.ndarray, features: int, kernel: int, strides: int, dtype: Any) -> jnp.ndarray:
  """A bias-free `kernel` x `kernel` convolution then GroupNorm (no activation), inside a module.

  [B, H, W, C_in] -> [B, H / strides, W / strides, features].
  """
  y = conv.Conv(features, (kernel, kernel), strides, use_bias=False, dtype=dtype)(x)
  return group_norm(features, dtype)(y)


def residual_out(x: jnp.ndarray, y: jnp.ndarray, strides: int, dtype: Any) -> jnp.ndarray:
  """`relu(shortcut(x) + y)`; the shortcut is a strided 1x1 projection when the shapes differ."""
  if x.shape != y.shape:
    x = conv_norm(x, y.shape[-1], 1, strides, dtype)
  return nn.relu(x + y)


class ResidualBlock(nn.Module):
  """The fields of a residual block, which `ResNet` builds as `block(width, strides, dtype=d)`.

  Attributes:
    features: the block's width (`BasicBlock` outputs it, `Bottleneck` 4 times it).
    strides: the stride of the block (its first 3x3 convolution and the shortcut).
    dtype: compute dtype (None: float32).
  """

  features: int
  strides: int = 1
  dtype: Any = None


class BasicBlock(ResidualBlock):
  """Two 3x3 convolutions with a projection shortcut when the shape changes."""

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """[B, H, W, C_in] -> [B, H / strides, W / strides, features]."""
    y = nn.relu(conv_norm(x, self.features, 3, self.strides, self.dtype))
    y = conv_norm(y, self.features, 3, 1, self.dtype)
    return residual_out(x, y, self.strides, self.dtype)


class Bottleneck(ResidualBlock):
  """1x1 reduce, 3x3 (strided), 1x1 expand by `BOTTLENECK_EXPANSION`; projection shortcut."""

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """[B, H, W, C_in] -> [B, H / strides, W / strides, 4 * features]."""
    y = nn.relu(conv_norm(x, self.features, 1, 1, self.dtype))
    y = nn.relu(conv_norm(y, self.features, 3, self.strides, self.dtype))
    y = conv_norm(y, self.features * BOTTLENECK_EXPANSION, 1, 1, self.dtype)
    return residual_out(x, y, self.strides, self.dtype)


class ResNet(nn.Module):
  """ResNet backbone with a classifier and an embedding head.

  Attributes:
    num_classes: classifier outputs (0 for none).
    stage_sizes: blocks per stage of the `'small'` backbone; each stage after the first halves
      the resolution.
    widths: channels per stage of the `'small'` backbone.
    embedding_dim: size of the L2-normalised embedding.
    stem_strides: stride of the 3x3 stem of the `'small'` backbone (1 for 8x8 or 32x32 inputs).
    backbone: one of `BACKBONES` (module docstring); the named ones ignore the three fields above.
    dtype: compute dtype (None: float32); parameters stay float32.
  """

  num_classes: int
  stage_sizes: Sequence[int] = (2, 2, 2)
  widths: Sequence[int] = (16, 32, 64)
  embedding_dim: int = 64
  stem_strides: int = 1
  backbone: str = "small"
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> dict:
    """Runs the network.

    Args:
      x: [B, H, W, C] float images in [0, 1].
      train: unused (GroupNorm behaves the same); kept for a uniform interface.

    Returns:
      dict with `logits` [B, num_classes], `embedding` [B, embedding_dim] (unit L2 norm),
      `pooled` [B, C_last], `features` (list of stage outputs [B, H / s_i, W / s_i, C_i] with
      `s_i = feature_strides(...)[i]` and `C_i = feature_channels(...)[i]`: for `'small'`
      `s_i = stem_strides * 2**i`, `C_i = widths[i]`; for `'resnet18'` strides 4, 8, 16, 32 and
      channels 64-512; for `'resnet50'` the same strides and channels 256-2048) and
      `feature_map` (the last stage output). `features` are in `dtype`; the rest float32 when
      `dtype` is given.
    """
    del train
    check_backbone(self.backbone, "ResNet.backbone")
    d = self.dtype
    if d is not None:
      x = x.astype(d)
    if self.backbone == "small":
      if len(self.stage_sizes) != len(self.widths):
        raise ValueError(
          f"stage_sizes={tuple(self.stage_sizes)} and widths={tuple(self.widths)} must have the "
          "same length"
        )
      block, stage_sizes, widths = BasicBlock, self.stage_sizes, self.widths
      y = conv.Conv(widths[0], (3, 3), self.stem_strides, use_bias=False, name="stem", dtype=d)(x)
      y = nn.relu(group_norm(widths[0], d)(y))
    else:
      kind, stage_sizes, widths = NAMED_BACKBONES[self.backbone]
      block = Bottleneck if kind == "bottleneck" else BasicBlock
      y = conv.Conv(64, (7, 7), 2, padding=((3, 3), (3, 3)), use_bias=False, name="stem", dtype=d)(
        x
      )
      y = nn.relu(group_norm(64, d)(y))
      y = nn.max_pool(y, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    features = []
    for stage, (blocks, width) in enumerate(zip(stage_sizes, widths)):
      for index in range(blocks):
        strides = 2 if stage > 0 and index == 0 else 1
        y = block(width, strides, dtype=d)(y)
      features.append(y)
    pooled = jnp.mean(y, axis=(1, 2))
    embedding = nn.Dense(self.embedding_dim, name="embedding", dtype=d)(pooled)
    if d is not None:
      pooled, embedding = pooled.astype(jnp.float32), embedding.astype(jnp.float32)
    embedding = embedding / jnp.sqrt(jnp.sum(embedding**2, -1, keepdims=True) + 1e-12)
    out = {"pooled": pooled, "embedding": embedding, "features": features, "feature_map": y}
    if self.num_classes:
      logits = nn.Dense(self.num_classes, name="classifier", dtype=d)(pooled)
      out["logits"] = logits.astype(jnp.float32) if d is not None else logits
    return out


class Segmenter(nn.Module):
  """A small encoder-decoder for semantic segmentation on a ResNet backbone.

  The decoder is FPN-like: each backbone stage is projected to `decoder_width` channels, the
  coarser map is upsampled and added, and the finest sum is upsampled to the input size.

  Attributes:
    num_classes: K output classes.
    stage_sizes: backbone blocks per stage (`'small'` backbone).
    widths: backbone channels per stage (`'small'` backbone).
    decoder_width: channels of the decoder.
    backbone: one of `BACKBONES`; a named one needs H and W divisible by 32.
    dtype: compute dtype (None: float32); parameters stay float32, `logits` are float32.
  """

  num_classes: int
  stage_sizes: Sequence[int] = (1, 1, 1)
  widths: Sequence[int] = (16, 32, 64)
  decoder_width: int = 32
  backbone: str = "small"
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> dict:
    """Per-pixel class logits.

    Args:
      x: [B, H, W, 3] float images in [0, 1].
      train: unused; kept for a uniform interface.

    Returns:
      dict with `logits` [B, H, W, K] and the backbone's `features` (see `ResNet`).
    """
    check_backbone(self.backbone, "Segmenter.backbone")
    b, h, w, _ = x.shape
    if self.backbone != "small" and (h % NAMED_STRIDES[-1] or w % NAMED_STRIDES[-1]):
      raise ValueError(
        f"input size {h}x{w} is not allowed with backbone={self.backbone!r}: height and width "
        f"must be multiples of its output stride {NAMED_STRIDES[-1]}"
      )
    d = self.dtype
    backbone = ResNet(
      0, self.stage_sizes, self.widths, backbone=self.backbone, dtype=d, name="backbone"
    )(x, train)
    features = backbone["features"]
    y = conv.Conv(self.decoder_width, (1, 1), name="lateral_last", dtype=d)(features[-1])
    for i, f in reversed(list(enumerate(features[:-1]))):
      y = jnp.repeat(jnp.repeat(y, f.shape[1] // y.shape[1], 1), f.shape[2] // y.shape[2], 2)
      y = y + conv.Conv(self.decoder_width, (1, 1), name=f"lateral_{i}", dtype=d)(f)
      y = conv.Conv(self.decoder_width, (3, 3), dtype=d)(y)
      y = nn.relu(group_norm(self.decoder_width, d)(y))
    y = jnp.repeat(jnp.repeat(y, h // y.shape[1], 1), w // y.shape[2], 2)
    logits = conv.Conv(self.num_classes, (3, 3), name="classifier", dtype=d)(y)
    if d is not None:
      logits = logits.astype(jnp.float32)
    return {"logits": logits, "features": features}
