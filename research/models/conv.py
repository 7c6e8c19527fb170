"""A 2-D convolution with faster input and weight gradients on XLA:CPU.

Two XLA:CPU slow paths are avoided, each measured with `launch/bench_steps.py --layers` and
`launch/bench_uap.py`:

* **Input gradient.** JAX's transpose rule writes the input gradient as a convolution whose
  kernel is the forward kernel read with swapped in/out dimensions (`dim_labels ..._01oi`).
  Outside a loop XLA:CPU materialises that transposed kernel and calls its fast (Eigen)
  convolution; inside a `while` loop (`lax.fori_loop`, `lax.scan`) it keeps the `01oi` layout
  and runs a generic convolution loop about ten times slower, so an attack written with
  `fori_loop` ran 9x slower than the same rounds unrolled (issue 18). Here the input gradient
  is a plain HWIO convolution of the (stride-dilated) output gradient with the flipped,
  in/out-swapped kernel `w[::-1, ::-1].swapaxes(2, 3)`, which XLA runs on its fast path
  everywhere.
* **Weight gradient.** XLA:CPU computes the weight gradient of a convolution with few input
  channels at high resolution an order of magnitude slower than PyTorch does (5-10 GFLOP/s for
  the 3- and 16-channel layers of the 32x32 ResNet, against 50-100 for the forward pass).
  Written as one matmul per kernel tap,

      dW[i, j] = sum_{b, h, w} x_pad[b, s*h + i, s*w + j, :]^T dy[b, h, w, :],

  it is several times faster there; it is used up to `MAX_SHIFTED_IN_CHANNELS` input channels
  (wider layers keep XLA's weight gradient, which is as fast or faster).

`conv_general_dilated` is a drop-in for `lax.conv_general_dilated` that flax's
`nn.Conv(conv_general_dilated=...)` accepts. The forward pass is XLA's own; only the gradients
change, and only for plain (undilated, ungrouped) NHWC/HWIO convolutions on CPU (on GPU/TPU the
vendor libraries handle both layouts). Results equal XLA's to float32 rounding
(tests/models/test_conv.py).
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


def transposed_input_gradient(
  dy: jax.Array, w: jax.Array, input_hw: Sequence[int], strides, pads
) -> jax.Array:
  """Input gradient of an NHWC convolution as a plain HWIO convolution (fast on XLA:CPU).

  For one spatial axis with kernel size k, stride s, padding (lo, hi), input size n and output
  size m, ``dx[t] = sum_i dy_dilated[t + lo - i] w[i]``: a correlation of ``dy`` dilated by
  ``s`` (length ``(m - 1) s + 1``) with the flipped kernel, padded by ``k - 1 - lo`` before and
  ``n + lo - (m - 1) s - 1`` after (negative padding crops).

  Args:
    dy: [B, H_out, W_out, C_out] gradient of the output.
    w: [k_h, k_w, C_in, C_out] HWIO kernel of the forward pass.
    input_hw: (H, W) of the forward input.
    strides: (s_h, s_w).
    pads: ((top, bottom), (left, right)) explicit padding of the forward pass.

  Returns:
    [B, H, W, C_in] gradient of the input.
  """
  dilated = [(m - 1) * s + 1 for m, s in zip(dy.shape[1:3], strides)]
  padding = [
    (k - 1 - lo, n + lo - d) for k, (lo, _), n, d in zip(w.shape[:2], pads, input_hw, dilated)
  ]
  w_flipped = jnp.swapaxes(w[::-1, ::-1], 2, 3)  # [k_h, k_w, C_out, C_in]
  return lax.conv_general_dilated(
    dy, w_flipped, (1, 1), padding, lhs_dilation=tuple(strides), dimension_numbers=_NHWC
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_fast_grads(x: jax.Array, w: jax.Array, strides, pads, shifted: bool) -> jax.Array:
  return _conv(x, w, strides, pads)


def _forward(x, w, strides, pads, shifted):
  del shifted
  return _conv(x, w, strides, pads), (x, w)


def _backward(strides, pads, shifted, residuals, dy):
  x, w = residuals
  dx = transposed_input_gradient(dy, w, x.shape[1:3], strides, pads)
  if shifted:
    dw = shifted_weight_gradient(x, dy, w.shape[:2], strides, pads)
  else:
    dw = jax.vjp(lambda w: _conv(x, w, strides, pads), w)[1](dy)[0]
  return dx, dw


_conv_fast_grads.defvjp(_forward, _backward)


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
  """`lax.conv_general_dilated` with the faster CPU gradients of the module docstring.

  Same arguments and forward result as `lax.conv_general_dilated`; see the module docstring
  for when the gradients are replaced.
  """
  pads = None
  if (
    jax.default_backend() == "cpu"
    and precision is None
    and not kwargs
    and _is_plain(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count)
  ):
    if isinstance(padding, str):
      padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  if pads is None or min(min(p) for p in pads) < 0:  # negative (cropping) pads stay XLA's
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
  axes = _varying_axes(lhs) | _varying_axes(rhs)
  shifted = rhs.shape[-2] <= MAX_SHIFTED_IN_CHANNELS
  return _conv_fast_grads(
    _vary_like(lhs, axes), _vary_like(rhs, axes), tuple(window_strides), pads, shifted
  )


# `nn.Conv` with the gradients above; parameters and names are those of `nn.Conv`.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
