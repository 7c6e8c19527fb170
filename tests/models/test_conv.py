"""The shifted-matmul weight gradient against XLA's and against a numpy loop."""

import functools

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


def _uses_custom_vjp(x, w):
  return "custom_vjp" in str(jax.make_jaxpr(lambda x, w: _ours(x, w, (1, 1), "SAME"))(x, w))


def test_only_narrow_plain_convolutions_take_the_shifted_gradient():
  narrow = jnp.zeros((1, 4, 4, conv.MAX_SHIFTED_IN_CHANNELS))
  wide = jnp.zeros((1, 4, 4, conv.MAX_SHIFTED_IN_CHANNELS + 1))
  assert _uses_custom_vjp(narrow, jnp.zeros((3, 3, narrow.shape[-1], 2)))
  assert not _uses_custom_vjp(wide, jnp.zeros((3, 3, wide.shape[-1], 2)))
  dilated = jax.make_jaxpr(
    lambda x, w: conv.conv_general_dilated(
      x, w, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=NHWC
    )
  )(narrow, jnp.zeros((3, 3, narrow.shape[-1], 2)))
  assert "custom_vjp" not in str(dilated)


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
  monkeypatch.setattr(conv, "MAX_SHIFTED_IN_CHANNELS", 0)  # every conv takes XLA's gradient
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
