"""Mask2Former-style panoptic model in Flax Linen (METHODS.md M4, "Model").

Backbone -> multi-scale features; FPN pixel decoder -> per-pixel mask features and a
multi-scale memory; transformer decoder with ``Q`` learned queries (the patent's "preset object
division instructions") using masked cross-attention round-robin over the memory scales;
a linear classifier over ``C`` classes plus *no-object*, and a 3-layer MLP mask embedding whose
dot product with the per-pixel features gives the mask logits.

Resolution: ``mask_logits`` live at the resolution of the finest backbone feature map, i.e. at
stride 4 relative to the input for :class:`TinyMultiScaleBackbone` (and for a ResNet that
provides its C2 map first). For a ``[B, 32, 32, 3]`` input they are ``[B, Q, 8, 8]``.

Backbone interface: ``backbone(x [B, H, W, 3], train) -> {'features': [f_0, f_1, ...]}`` with
``f_i`` of shape ``[B, h_i, w_i, F_i]`` ordered fine -> coarse (e.g. strides 4, 8, 16).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from research import field_checks
from research.models import conv


def _group_norm(channels: int) -> nn.GroupNorm:
  """GroupNorm with up to 8 groups that divide ``channels``."""
  return nn.GroupNorm(num_groups=math.gcd(channels, 8))


class ConvGNReLU(nn.Module):
  """3x3 convolution (optionally strided) followed by GroupNorm and ReLU."""

  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the block to ``x`` of shape ``[B, H, W, F]``."""
    x = conv.Conv(self.features, (3, 3), strides=(self.stride, self.stride), use_bias=False)(x)
    return nn.relu(_group_norm(self.features)(x))


class TinyMultiScaleBackbone(nn.Module):
  """A small strided-conv backbone for tests and CPU experiments.

  Attributes:
    widths: channel widths of the returned feature maps; map ``i`` has stride
      ``stem_stride * 2 * 2**i`` (so the defaults give strides 4, 8, 16).
    stem_stride: stride of the stem convolution, 1 or 2 (1 halves every stride, e.g. for
      32x32 images whose masks would be too coarse at stride 4).
  """

  widths: Sequence[int] = (16, 32, 64)
  stem_stride: int = 2

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> dict[str, list[jax.Array]]:
    """Computes multi-scale features.

    Args:
      x: images ``[B, H, W, 3]`` in [0, 1]; ``H`` and ``W`` divisible by
        ``stem_stride * 2**n``.
      train: unused (GroupNorm has no train/eval difference); kept for the interface.

    Returns:
      ``{'features': [f_0, ..., f_{n-1}]}`` with ``f_i`` of shape
      ``[B, H / s_i, W / s_i, widths[i]]``, ``s_i = stem_stride * 2 * 2**i``.
    """
    del train
    if self.stem_stride not in (1, 2):
      raise ValueError(f"stem_stride={self.stem_stride} is not allowed: use 1 or 2")
    h = ConvGNReLU(self.widths[0], stride=self.stem_stride)(x - 0.5)
    features = []
    for width in self.widths:
      h = ConvGNReLU(width, stride=2)(h)
      h = ConvGNReLU(width)(h)
      features.append(h)
    return {"features": features}


class FPNPixelDecoder(nn.Module):
  """FPN-like pixel decoder: lateral 1x1 convs, top-down nearest upsampling, 3x3 convs.

  Attributes:
    hidden_dim: channel width of every output map.
  """

  hidden_dim: int

  @nn.compact
  def __call__(self, features: Sequence[jax.Array]) -> tuple[jax.Array, list[jax.Array]]:
    """Fuses multi-scale backbone features.

    Args:
      features: backbone maps ``[B, h_i, w_i, F_i]``, fine -> coarse.

    Returns:
      ``(mask_features, maps)``: per-pixel mask features ``[B, h_0, w_0, hidden_dim]`` at the
      finest scale, and the fused maps ``[B, h_i, w_i, hidden_dim]`` fine -> coarse.
    """
    laterals = [conv.Conv(self.hidden_dim, (1, 1))(f) for f in features]
    maps = [None] * len(features)
    top = laterals[-1]
    for i in reversed(range(len(features))):
      if i < len(features) - 1:
        target_shape = laterals[i].shape[:3] + (self.hidden_dim,)
        top = laterals[i] + jax.image.resize(top, target_shape, method="nearest")
      top = ConvGNReLU(self.hidden_dim)(top)
      maps[i] = top
    mask_features = conv.Conv(self.hidden_dim, (1, 1))(maps[0])
    return mask_features, maps


def sine_position_embedding(height: int, width: int, dim: int) -> jax.Array:
  """Fixed 2-D sine/cosine position embedding (DETR-style, normalised coordinates).

  Args:
    height: map height ``h``.
    width: map width ``w``.
    dim: embedding size; the first ``dim // 2`` channels encode y, the rest x.

  Returns:
    ``[h * w, dim]`` embedding, row-major over the map.
  """

  def encode(coords: jax.Array, n: int) -> jax.Array:
    j = jnp.arange(n)
    freq = 10000.0 ** (2 * (j // 2) / n)
    angle = coords[:, None] * (2 * jnp.pi) / freq
    return jnp.where(j % 2 == 0, jnp.sin(angle), jnp.cos(angle))

  ys = (jnp.arange(height, dtype=jnp.float32) + 0.5) / height
  xs = (jnp.arange(width, dtype=jnp.float32) + 0.5) / width
  ey = encode(ys, dim // 2)
  ex = encode(xs, dim - dim // 2)
  grid_y = jnp.broadcast_to(ey[:, None, :], (height, width, ey.shape[-1]))
  grid_x = jnp.broadcast_to(ex[None, :, :], (height, width, ex.shape[-1]))
  return jnp.concatenate([grid_y, grid_x], axis=-1).reshape(height * width, dim)


def attention_mask_from_mask_logits(
  mask_logits: jax.Array, target_hw: tuple[int, int]
) -> jax.Array:
  """Masked-attention mask from the previous layer's mask predictions (Mask2Former).

  The mask logits are resized bilinearly (half-pixel centres, no antialiasing, like
  ``F.interpolate(..., align_corners=False)``) to the attended scale. A query may attend to a
  position iff its mask probability there is ``>= 0.5``; a query whose mask is empty at that
  scale may attend everywhere.

  Args:
    mask_logits: ``[B, Q, h_0, w_0]`` mask logits.
    target_hw: ``(h, w)`` of the memory scale attended to.

  Returns:
    Boolean ``[B, Q, h * w]``; True = may attend.
  """
  b, q = mask_logits.shape[:2]
  h, w = target_hw
  resized = jax.image.resize(mask_logits, (b, q, h, w), method="bilinear", antialias=False)
  allowed = (jax.nn.sigmoid(resized) >= 0.5).reshape(b, q, h * w)
  empty = ~jnp.any(allowed, axis=-1, keepdims=True)
  return allowed | empty


class MaskedAttentionDecoderLayer(nn.Module):
  """One Mask2Former decoder layer: masked cross-attn, self-attn, FFN (post-LayerNorm).

  Attributes:
    hidden_dim: query width ``D``.
    num_heads: attention heads.
    ffn_dim: hidden width of the feed-forward network.
  """

  hidden_dim: int
  num_heads: int
  ffn_dim: int

  @nn.compact
  def __call__(
    self,
    queries: jax.Array,
    query_pos: jax.Array,
    memory: jax.Array,
    memory_pos: jax.Array,
    allowed: jax.Array,
  ) -> jax.Array:
    """Updates the queries.

    Args:
      queries: ``[B, Q, D]`` query features.
      query_pos: ``[Q, D]`` query position embeddings.
      memory: ``[B, N, D]`` flattened memory of one scale.
      memory_pos: ``[N, D]`` memory position embeddings.
      allowed: ``[B, Q, N]`` boolean cross-attention mask (True = attend).

    Returns:
      ``[B, Q, D]`` updated query features.
    """

    def attention(name: str) -> nn.MultiHeadDotProductAttention:
      return nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads,
        qkv_features=self.hidden_dim,
        out_features=self.hidden_dim,
        name=name,
      )

    cross = attention("cross_attention")(
      queries + query_pos, memory + memory_pos, memory, mask=allowed[:, None]
    )
    queries = nn.LayerNorm(name="cross_norm")(queries + cross)
    q = queries + query_pos
    queries = nn.LayerNorm(name="self_norm")(queries + attention("self_attention")(q, q, queries))
    ffn = nn.Dense(self.hidden_dim)(nn.relu(nn.Dense(self.ffn_dim)(queries)))
    return nn.LayerNorm(name="ffn_norm")(queries + ffn)


class MaskPredictionHeads(nn.Module):
  """Shared prediction heads: LayerNorm, linear classifier, 3-layer MLP mask embedding.

  Attributes:
    num_classes: number of real classes ``C`` (the classifier has ``C + 1`` outputs, the last
      being no-object).
    hidden_dim: query and mask-embedding width ``D``.
  """

  num_classes: int
  hidden_dim: int

  @nn.compact
  def __call__(self, queries: jax.Array, mask_features: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Predicts classes and masks from query features.

    Args:
      queries: ``[B, Q, D]``.
      mask_features: ``[B, h_0, w_0, D]`` per-pixel features.

    Returns:
      ``(class_logits [B, Q, C + 1], mask_logits [B, Q, h_0, w_0])``.
    """
    x = nn.LayerNorm(name="decoder_norm")(queries)
    class_logits = nn.Dense(self.num_classes + 1, name="class_embed")(x)
    e = nn.relu(nn.Dense(self.hidden_dim, name="mask_mlp_0")(x))
    e = nn.relu(nn.Dense(self.hidden_dim, name="mask_mlp_1")(e))
    e = nn.Dense(self.hidden_dim, name="mask_mlp_2")(e)
    mask_logits = jnp.einsum("bqd,bhwd->bqhw", e, mask_features)
    return class_logits, mask_logits


class MaskFormer(nn.Module):
  """Mask2Former-style panoptic model (METHODS.md M4, "Model").

  The transformer decoder attends, layer by layer, to the pixel-decoder maps *other than the
  finest one* (which gives the mask features), coarse -> fine, at most ``num_memory_scales`` of
  them (Mask2Former: strides 32, 16, 8 with mask features at stride 4). With a single-scale
  backbone that one map serves both purposes.

  Attributes:
    num_classes: number of real classes ``C``.
    backbone: module with the interface described in the module docstring.
    num_queries: number of learned queries ``Q``.
    hidden_dim: width ``D`` of the pixel decoder, queries and mask embeddings.
    num_decoder_layers: number of decoder layers ``L``.
    num_heads: attention heads (must divide ``hidden_dim``).
    ffn_dim: feed-forward width; ``None`` means ``8 * hidden_dim`` (Mask2Former: 2048 / 256).
    num_memory_scales: maximal number of memory scales used round-robin.
  """

  num_classes: int
  backbone: nn.Module
  num_queries: int = 100
  hidden_dim: int = 256
  num_decoder_layers: int = 9
  num_heads: int = 8
  ffn_dim: int | None = None
  num_memory_scales: int = 3

  def __post_init__(self):
    """Validates the configuration at construction."""
    field_checks.check_positive_int_fields(
      self, ("num_classes", "num_queries", "hidden_dim", "num_decoder_layers", "num_heads")
    )
    if self.hidden_dim % self.num_heads:
      raise ValueError(
        f"hidden_dim={self.hidden_dim} is not allowed: hidden_dim must be divisible by "
        f"num_heads={self.num_heads}"
      )
    if self.ffn_dim is not None and self.ffn_dim < 1:
      raise ValueError(f"ffn_dim={self.ffn_dim} is not allowed: ffn_dim must be None or >= 1")
    if self.num_memory_scales < 1:
      raise ValueError(f"num_memory_scales={self.num_memory_scales} is not allowed: must be >= 1")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> dict:
    """Runs the model.

    Args:
      x: images ``[B, H, W, 3]`` in [0, 1].
      train: passed to the backbone (the decoder has no dropout).

    Returns:
      A dict with
        ``class_logits``: ``[B, Q, C + 1]`` final-layer logits (index ``C`` = no-object);
        ``mask_logits``: ``[B, Q, h_0, w_0]`` final-layer mask logits at the finest backbone
          stride (4 for :class:`TinyMultiScaleBackbone`);
        ``aux``: dict with ``class_logits [L, B, Q, C + 1]`` and
          ``mask_logits [L, B, Q, h_0, w_0]``: the predictions made from the learned queries
          before the first layer and after layers ``1 .. L - 1`` (as in Mask2Former, whose
          auxiliary losses use these ``L`` predictions; the final one is the last layer's).
    """
    features = self.backbone(x, train)["features"]
    mask_features, maps = FPNPixelDecoder(self.hidden_dim, name="pixel_decoder")(features)
    memory_maps = maps[1:][::-1][: self.num_memory_scales] if len(maps) > 1 else maps
    batch = x.shape[0]
    level_embed = self.param(
      "level_embed", nn.initializers.normal(1.0), (len(memory_maps), self.hidden_dim)
    )
    memory, memory_pos, memory_hw = [], [], []
    for level, m in enumerate(memory_maps):
      h, w = m.shape[1:3]
      memory.append(m.reshape(batch, h * w, self.hidden_dim) + level_embed[level])
      memory_pos.append(sine_position_embedding(h, w, self.hidden_dim))
      memory_hw.append((h, w))

    query_feat = self.param(
      "query_feat", nn.initializers.normal(1.0), (self.num_queries, self.hidden_dim)
    )
    query_pos = self.param(
      "query_pos", nn.initializers.normal(1.0), (self.num_queries, self.hidden_dim)
    )
    queries = jnp.broadcast_to(query_feat, (batch, self.num_queries, self.hidden_dim))
    heads = MaskPredictionHeads(self.num_classes, self.hidden_dim, name="heads")
    class_logits, mask_logits = heads(queries, mask_features)
    predictions = [(class_logits, mask_logits)]
    ffn_dim = self.ffn_dim or 8 * self.hidden_dim
    for i in range(self.num_decoder_layers):
      level = i % len(memory)
      allowed = attention_mask_from_mask_logits(mask_logits, memory_hw[level])
      queries = MaskedAttentionDecoderLayer(
        self.hidden_dim, self.num_heads, ffn_dim, name=f"decoder_layer_{i}"
      )(queries, query_pos, memory[level], memory_pos[level], allowed)
      class_logits, mask_logits = heads(queries, mask_features)
      predictions.append((class_logits, mask_logits))

    aux = predictions[:-1]
    return {
      "class_logits": class_logits,
      "mask_logits": mask_logits,
      "aux": {
        "class_logits": jnp.stack([c for c, _ in aux]),
        "mask_logits": jnp.stack([m for _, m in aux]),
      },
    }
