"""The CPU convolution gradients (transposed-kernel input gradient, shifted-matmul weight
gradient) against XLA's own and against numpy loops."""

import functools
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from research.models import conv
from research.models.resnet import ResNet
from research.training import steps

NHWC = ("NHWC", "HWIO", "NHWC")


def _lax_conv(x, w, strides, padding):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)


def _ours(x, w, strides, padding):
  return conv.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)


@pytest.mark.parametrize(
  "shape, kernel, strides, padding",
  [
    ((2, 9, 9, 3), (3, 3, 3, 4), (1, 1), "SAME"),
    ((2, 8, 8, 16), (3, 3, 16, 8), (2, 2), "SAME"),
    ((1, 7, 10, 5), (3, 3, 5, 6), (2, 1), "VALID"),
    ((2, 8, 8, 4), (1, 1, 4, 3), (2, 2), "SAME"),
    ((1, 6, 6, 2), (3, 3, 2, 2), (1, 1), ((2, 0), (1, 1))),
    ((2, 8, 8, 24), (3, 3, 24, 32), (2, 2), "SAME"),  # wide: XLA's weight gradient
    ((1, 9, 8, 20), (3, 3, 20, 5), (3, 2), "VALID"),  # stride leaves a remainder
    ((1, 7, 7, 17), (1, 1, 17, 4), (2, 2), ((0, 0), (0, 0))),
    ((1, 8, 8, 2), (3, 3, 2, 3), (2, 2), ((1, -1), (0, 1))),  # negative padding crops
  ],
)
def test_forward_and_gradients_equal_xla(shape, kernel, strides, padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=kernel), jnp.float32)
  y_ref, vjp_ref = jax.vjp(lambda x, w: _lax_conv(x, w, strides, padding), x, w)
  y, vjp = jax.vjp(lambda x, w: _ours(x, w, strides, padding), x, w)
  np.testing.assert_array_equal(y, y_ref)  # the forward pass is XLA's own
  dy = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
  chex.assert_trees_all_close(vjp(dy), vjp_ref(dy), rtol=1e-5, atol=1e-5)


def test_weight_gradient_matches_a_numpy_loop():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 5, 6, 3)).astype(np.float32)
  dy = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)  # stride 2, SAME: 5x6 -> 3x3
  pads = ((1, 1), (0, 1))  # lax's SAME split for these sizes
  got = conv.shifted_weight_gradient(jnp.asarray(x), jnp.asarray(dy), (3, 3), (2, 2), pads)
  x_pad = np.pad(x, ((0, 0), *pads, (0, 0)))
  want = np.zeros((3, 3, 3, 4), np.float64)
  for b in range(2):
    for h in range(3):
      for w in range(3):
        for i in range(3):
          for j in range(3):
            want[i, j] += np.outer(x_pad[b, 2 * h + i, 2 * w + j], dy[b, h, w])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert lax.padtype_to_pads((5, 6), (3, 3), (2, 2), "SAME") == list(pads)


def _jaxprs(x, w, **kwargs):
  """Jaxprs of the forward pass and of both gradients of a stride-1 SAME convolution."""

  def forward(x, w):
    return conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC, **kwargs)

  backward = jax.grad(lambda x, w: jnp.sum(forward(x, w)), argnums=(0, 1))
  return str(jax.make_jaxpr(forward)(x, w)), str(jax.make_jaxpr(backward)(x, w))


def test_plain_convolutions_take_the_custom_gradients():
  narrow = jnp.zeros((1, 4, 4, conv.MAX_SHIFTED_IN_CHANNELS))
  wide = jnp.zeros((1, 4, 4, conv.MAX_SHIFTED_IN_CHANNELS + 1))
  narrow_forward, narrow_backward = _jaxprs(narrow, jnp.zeros((3, 3, narrow.shape[-1], 2)))
  wide_forward, wide_backward = _jaxprs(wide, jnp.zeros((3, 3, wide.shape[-1], 2)))
  assert "custom_vjp" in narrow_forward and "custom_vjp" in wide_forward
  # Both input gradients flip and transpose the kernel; only the narrow one has tap matmuls.
  assert "rev[" in narrow_backward and "rev[" in wide_backward
  assert "dot_general" in narrow_backward and "dot_general" not in wide_backward
  dilated_forward, _ = _jaxprs(narrow, jnp.zeros((3, 3, narrow.shape[-1], 2)), rhs_dilation=(2, 2))
  assert "custom_vjp" not in dilated_forward


def _input_grad_kernel_layouts(conv_fn):
  """dim_labels of the convolutions XLA:CPU compiles for input gradients inside a fori_loop."""
  x = jnp.zeros((2, 8, 8, 32))
  w = jnp.zeros((3, 3, 32, 32))

  def attack(x, w):
    grad = jax.grad(lambda x: jnp.sum(conv_fn(x, w, (1, 1), "SAME") ** 2))
    return lax.fori_loop(0, 3, lambda _, x: x - 0.1 * jnp.sign(grad(x)), x)

  hlo = jax.jit(attack).lower(x, w).compile().as_text()
  return set(re.findall(r"dim_labels=b01f_(\w+)->b01f", hlo))


def test_input_gradient_inside_a_loop_uses_the_fast_kernel_layout():
  """Issue 18: XLA's own transpose keeps an `01oi` kernel in a loop and runs ~10x slower."""
  assert _input_grad_kernel_layouts(_ours) == {"01io"}
  assert "01oi" in _input_grad_kernel_layouts(_lax_conv)  # the slow layout this avoids


def test_input_gradient_matches_a_numpy_loop():
  rng = np.random.default_rng(4)
  x_shape, strides, pads = (1, 7, 6, 2), (2, 2), ((1, 1), (0, 1))
  w = rng.normal(size=(3, 3, 2, 3)).astype(np.float32)
  dy = rng.normal(size=(1, 4, 3, 3)).astype(np.float32)  # (7 + 2 - 3) // 2 + 1 = 4, 3
  got = conv.transposed_input_gradient(jnp.asarray(dy), jnp.asarray(w), x_shape[1:3], strides, pads)
  dx_pad = np.zeros((1, 7 + 2, 6 + 1, 2), np.float64)
  for h in range(4):
    for v in range(3):
      for i in range(3):
        for j in range(3):
          dx_pad[0, 2 * h + i, 2 * v + j] += w[i, j] @ dy[0, h, v]
  np.testing.assert_allclose(got, dx_pad[:, 1:8, 0:6], rtol=1e-5, atol=1e-5)


def test_conv_module_has_the_parameters_of_nn_conv(rng):
  x = jnp.ones((1, 8, 8, 3))
  ours = conv.Conv(4, (3, 3)).init(rng, x)
  theirs = nn.Conv(4, (3, 3)).init(rng, x)
  chex.assert_trees_all_equal(ours, theirs)


def test_resnet_step_loss_and_gradients_equal_the_xla_reference(rng, monkeypatch):
  """The optimisation of issue #8 changes a train step's loss and gradients by rounding only."""
  model = ResNet(10, (1, 1), (8, 16), 16)
  data = np.random.default_rng(2)
  batch = {
    "image": data.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8),
    "label": data.integers(0, 10, (8,)),
  }
  params = model.init(rng, jnp.zeros((1, 16, 16, 3)))["params"]
  loss_fn = functools.partial(steps.classification_loss, model=model)

  def loss_and_grads():
    return jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, rng)[0]))(params)

  loss, grads = loss_and_grads()
  monkeypatch.setattr(conv, "Conv", nn.Conv)  # every conv takes XLA's own gradients
  ref_loss, ref_grads = loss_and_grads()
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  chex.assert_trees_all_close(grads, ref_grads, rtol=1e-4, atol=1e-6)
  chex.assert_tree_all_finite(grads)


def test_gradients_under_shard_map_with_a_replicated_kernel():
  """Per-device images and a replicated kernel, as in the data-parallel attack of M1."""
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(jax.device_count(), 6, 6, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
  spec = jax.sharding.PartitionSpec

  def per_device_grads(conv_fn):
    def loss(x, w):
      return jnp.sum(jnp.sin(conv_fn(x, w, (1, 1), "SAME")))

    def grads(x, w):
      dx, dw = jax.grad(loss, argnums=(0, 1))(x, w)
      return dx, jax.lax.psum(dw, "data")

    return jax.jit(
      jax.shard_map(
        grads, mesh=mesh, in_specs=(spec("data"), spec()), out_specs=(spec("data"), spec())
      )
    )(x, w)

  chex.assert_trees_all_close(
    per_device_grads(_ours), per_device_grads(_lax_conv), rtol=1e-5, atol=1e-4
  )  # dW entries reach ~200: atol 1e-4 is float32 rounding of sums over all devices
