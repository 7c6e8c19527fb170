"""A 2-D convolution whose weight gradient is a sum of shifted matmuls (faster on XLA:CPU).

XLA:CPU computes the weight gradient of a convolution with few input channels at high
resolution an order of magnitude slower than PyTorch does (`launch/bench_steps.py --layers`:
5-10 GFLOP/s for the 3- and 16-channel layers of the 32x32 ResNet, against 50-100 for the
forward pass). Written as one matmul per kernel tap,

    dW[i, j] = sum_{b, h, w} x_pad[b, s*h + i, s*w + j, :]^T dy[b, h, w, :],

it is several times faster there. `conv_general_dilated` is a drop-in for
`lax.conv_general_dilated` that flax's `nn.Conv(conv_general_dilated=...)` accepts: the forward
pass and the input gradient are XLA's own; only the weight gradient changes, and only for plain
NHWC/HWIO convolutions on CPU with at most `MAX_SHIFTED_IN_CHANNELS` input channels (elsewhere,
e.g. with 32 or more channels or on GPU/TPU, XLA's kernel is as fast or faster). The result equals
XLA's to float32 rounding (tests/models/test_conv.py).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# Widest input for which the shifted-matmul weight gradient is used (measured faster up to 16).
MAX_SHIFTED_IN_CHANNELS = 16
_NHWC = ("NHWC", "HWIO", "NHWC")
_NHWC_SPEC = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), _NHWC)


def _conv(x: jax.Array, w: jax.Array, strides, pads) -> jax.Array:
  return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC)


def shifted_weight_gradient(
  x: jax.Array, dy: jax.Array, kernel_size: Sequence[int], strides, pads
) -> jax.Array:
  """Weight gradient of an NHWC convolution as one matmul per kernel tap.

  Args:
    x: [B, H, W, C_in] convolution input.
    dy: [B, H_out, W_out, C_out] gradient of the output.
    kernel_size: (k_h, k_w).
    strides: (s_h, s_w).
    pads: ((top, bottom), (left, right)) explicit padding of the forward pass.

  Returns:
    [k_h, k_w, C_in, C_out] gradient of the HWIO kernel.
  """
  (k_h, k_w), (s_h, s_w) = kernel_size, strides
  _, h_out, w_out, _ = dy.shape
  x_pad = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  taps = [
    [
      jnp.einsum(
        "bhwc,bhwf->cf",
        x_pad[:, i : i + (h_out - 1) * s_h + 1 : s_h, j : j + (w_out - 1) * s_w + 1 : s_w],
        dy,
      )
      for j in range(k_w)
    ]
    for i in range(k_h)
  ]
  return jnp.stack([jnp.stack(row) for row in taps])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_shifted_grad(x: jax.Array, w: jax.Array, strides, pads) -> jax.Array:
  return _conv(x, w, strides, pads)


def _forward(x, w, strides, pads):
  return _conv(x, w, strides, pads), (x, w)


def _backward(strides, pads, residuals, dy):
  x, w = residuals
  dx = jax.vjp(lambda x: _conv(x, w, strides, pads), x)[1](dy)[0]
  return dx, shifted_weight_gradient(x, dy, w.shape[:2], strides, pads)


_conv_shifted_grad.defvjp(_forward, _backward)


def _varying_axes(a: jax.Array) -> frozenset:
  """The manual (shard_map) mesh axes ``a`` varies over; empty outside ``shard_map``."""
  aval = jax.typeof(a)
  manual = getattr(aval, "manual_axis_type", None)  # JAX >= 0.10
  return manual.varying if manual is not None else getattr(aval, "vma", frozenset())


def _vary_like(a: jax.Array, axes: frozenset) -> jax.Array:
  """``a`` marked as varying over the manual (shard_map) ``axes`` it does not vary over yet.

  Inside ``shard_map`` a replicated kernel meets per-device images; `lax.conv_general_dilated`
  marks the kernel varying implicitly (the transpose of that mark is the psum of its gradient),
  but a custom VJP must see both operands with the same axes to return matching cotangents.
  """
  missing = tuple(sorted(axes - _varying_axes(a)))
  return lax.pcast(a, missing, to="varying") if missing else a


def _is_plain(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count):
  """Whether the call is an undilated, ungrouped NHWC/HWIO 2-D convolution."""
  if lhs.ndim != 4 or feature_group_count != 1:
    return False
  if any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))):
    return False
  numbers = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  return numbers == _NHWC_SPEC


def conv_general_dilated(
  lhs: jax.Array,
  rhs: jax.Array,
  window_strides: Sequence[int],
  padding: str | Sequence[tuple[int, int]],
  lhs_dilation: Sequence[int] | None = None,
  rhs_dilation: Sequence[int] | None = None,
  dimension_numbers=None,
  feature_group_count: int = 1,
  precision=None,
  **kwargs,
) -> jax.Array:
  """`lax.conv_general_dilated` with the shifted-matmul weight gradient where it is faster.

  Same arguments and forward result as `lax.conv_general_dilated`; see the module docstring
  for when the weight gradient is replaced.
  """
  use_shifted = (
    jax.default_backend() == "cpu"
    and precision is None
    and not kwargs
    and rhs.shape[-2] <= MAX_SHIFTED_IN_CHANNELS
    and _is_plain(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count)
  )
  if not use_shifted:
    return lax.conv_general_dilated(
      lhs,
      rhs,
      window_strides,
      padding,
      lhs_dilation,
      rhs_dilation,
      dimension_numbers,
      feature_group_count,
      precision=precision,
      **kwargs,
    )
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  axes = _varying_axes(lhs) | _varying_axes(rhs)
  return _conv_shifted_grad(
    _vary_like(lhs, axes), _vary_like(rhs, axes), tuple(window_strides), pads
  )


# `nn.Conv` with the weight gradient above; parameters and names are those of `nn.Conv`.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
