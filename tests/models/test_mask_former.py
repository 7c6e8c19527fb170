"""Tests of research/models/mask_former.py (tiny dims; METHODS.md M4 model)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.models import mask_former as mf

B, S, Q, C, D, L = 2, 32, 6, 5, 32, 2


def tiny_model(**kwargs):
  config = dict(
    num_classes=C,
    backbone=mf.TinyMultiScaleBackbone(),
    num_queries=Q,
    hidden_dim=D,
    num_decoder_layers=L,
    num_heads=4,
    ffn_dim=64,
  )
  config.update(kwargs)
  return mf.MaskFormer(**config)


def random_params(init_fn, *args, seed=0):
  """Parameters shaped by `init_fn` (traced with eval_shape, never compiled), filled with numpy.

  Compiling flax's own initialisers (dozens of inlined PRNG calls) takes tens of seconds on the
  shared 2-core CPU, so tests use scaled normal weights instead: std 1/sqrt(fan_in) for kernels,
  around 1 for norm scales, 0.1 for biases and embeddings.
  """
  rs = np.random.RandomState(seed)
  shapes = jax.eval_shape(init_fn, jax.random.key(0), *args)

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return jnp.asarray(1.0 + 0.1 * rs.normal(size=s.shape), s.dtype)
    if "kernel" in name:
      return jnp.asarray(rs.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1])), s.dtype)
    return jnp.asarray(0.1 * rs.normal(size=s.shape), s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def model_and_variables():
  model = tiny_model()
  x = jax.random.uniform(jax.random.key(1), (B, S, S, 3))
  return model, random_params(model.init, x), x


def test_backbone_strides(rng):
  backbone = mf.TinyMultiScaleBackbone()
  x = jnp.zeros((B, S, S, 3))
  feats = jax.eval_shape(lambda: backbone.apply(backbone.init(rng, x), x))["features"]
  assert [f.shape for f in feats] == [(B, 8, 8, 16), (B, 4, 4, 32), (B, 2, 2, 64)]


def test_model_init_traces(rng):
  variables = jax.eval_shape(tiny_model().init, rng, jnp.zeros((B, S, S, 3)))
  assert set(variables["params"]) == {
    "backbone",
    "pixel_decoder",
    "decoder_layer_0",
    "decoder_layer_1",
    "heads",
    "level_embed",
    "query_feat",
    "query_pos",
  }
  chex.assert_shape(variables["params"]["query_feat"], (Q, D))


def test_forward_shapes_aux_gradients_single_compile(model_and_variables):
  model, variables, x = model_and_variables

  @jax.jit
  @chex.assert_max_traces(n=1)
  def forward_and_grad(params, x):
    def loss(params):
      out = model.apply({"params": params}, x, train=True)
      return jnp.sum(out["class_logits"] ** 2) + jnp.mean(jax.nn.sigmoid(out["mask_logits"])), out

    return jax.value_and_grad(loss, has_aux=True)(params)

  forward_and_grad(variables["params"], x)
  (_, out), grads = forward_and_grad(variables["params"], x + 0.1)
  chex.assert_shape(out["class_logits"], (B, Q, C + 1))
  chex.assert_shape(out["mask_logits"], (B, Q, S // 4, S // 4))
  # Aux predictions: from the learned queries and after layers 1 .. L-1 (Mask2Former).
  chex.assert_shape(out["aux"]["class_logits"], (L, B, Q, C + 1))
  chex.assert_shape(out["aux"]["mask_logits"], (L, B, Q, S // 4, S // 4))
  chex.assert_tree_all_finite((out, grads))
  # Layers actually change the predictions; different images give different masks.
  assert not np.allclose(out["aux"]["class_logits"][-1], out["class_logits"])
  assert not np.allclose(out["mask_logits"][0], out["mask_logits"][1])
  # Gradients reach every part; the two layers use the two memory scales (stride 16, then 8).
  chex.assert_shape(grads["level_embed"], (2, D))
  assert np.abs(grads["level_embed"]).sum(-1).min() > 0
  for name in ("decoder_layer_0", "decoder_layer_1", "pixel_decoder", "backbone", "query_pos"):
    assert any(np.abs(g).sum() > 0 for g in jax.tree.leaves(grads[name])), name


def test_sine_position_embedding_is_bounded_and_distinct():
  emb = np.asarray(mf.sine_position_embedding(3, 5, 10))
  chex.assert_shape(emb, (15, 10))
  assert np.abs(emb).max() <= 1.0
  distances = np.linalg.norm(emb[:, None] - emb[None], axis=-1)
  assert distances[~np.eye(15, dtype=bool)].min() > 1e-3


def test_attention_mask_thresholds_and_empty_fallback():
  logits = np.full((1, 3, 4, 4), -2.0, np.float32)
  logits[0, 0, 1, 2] = 0.5  # query 0: one allowed position
  logits[0, 1, :2] = 3.0  # query 1: top two rows
  # query 2: empty everywhere -> may attend everywhere
  allowed = np.asarray(mf.attention_mask_from_mask_logits(jnp.asarray(logits), (4, 4)))
  want0 = np.zeros(16, bool)
  want0[1 * 4 + 2] = True
  np.testing.assert_array_equal(allowed[0, 0], want0)
  np.testing.assert_array_equal(allowed[0, 1], np.arange(16) < 8)
  np.testing.assert_array_equal(allowed[0, 2], np.ones(16, bool))


def test_attention_mask_downsamples_bilinearly():
  # 2x2 constant blocks: half-pixel bilinear 8 -> 4 resizing gives exactly the block values.
  blocks = np.array([[1.0, -1.0, 2.0, -3.0], [-1.0, -1.0, 0.5, 4.0]] * 2, np.float32)
  logits = np.kron(blocks, np.ones((2, 2), np.float32))[None, None]
  allowed = np.asarray(mf.attention_mask_from_mask_logits(jnp.asarray(logits), (4, 4)))
  np.testing.assert_array_equal(allowed[0, 0], (blocks >= 0).reshape(-1))


def test_decoder_layer_respects_attention_mask(rng):
  layer = mf.MaskedAttentionDecoderLayer(hidden_dim=8, num_heads=2, ffn_dim=16)
  k1, k2, k3 = jax.random.split(rng, 3)
  queries = jax.random.normal(k1, (1, 1, 8))
  memory = jax.random.normal(k2, (1, 5, 8))
  pos_q, pos_m = jnp.zeros((1, 8)), jnp.zeros((5, 8))
  allowed = jnp.array([[[True, False, False, False, False]]])
  params = random_params(layer.init, queries, pos_q, memory, pos_m, allowed)
  apply = jax.jit(layer.apply)
  out = apply(params, queries, pos_q, memory, pos_m, allowed)
  noise = jax.random.normal(k3, (1, 5, 8))
  masked_changed = memory.at[:, 1:].add(noise[:, 1:])
  np.testing.assert_allclose(
    apply(params, queries, pos_q, masked_changed, pos_m, allowed), out, atol=1e-6
  )
  attended_changed = memory.at[:, :1].add(noise[:, :1])
  assert not np.allclose(apply(params, queries, pos_q, attended_changed, pos_m, allowed), out)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    ({"hidden_dim": 30}, "hidden_dim=30.*num_heads=4"),
    ({"num_queries": 0}, "num_queries=0"),
    ({"num_memory_scales": 0}, "num_memory_scales=0"),
  ],
)
def test_rejects_bad_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    tiny_model(**kwargs)
