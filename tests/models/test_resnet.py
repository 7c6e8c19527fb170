import chex
import jax
import jax.numpy as jnp

from research.models.resnet import ResNet, Segmenter


def test_resnet_outputs(rng):
  model = ResNet(7, stage_sizes=(1, 1), widths=(8, 16), embedding_dim=12)
  x = jnp.ones((3, 16, 16, 1))
  params = model.init(rng, x)["params"]
  out = model.apply({"params": params}, x)
  chex.assert_shape(out["logits"], (3, 7))
  chex.assert_shape(out["embedding"], (3, 12))
  chex.assert_shape(out["feature_map"], (3, 8, 8, 16))
  chex.assert_trees_all_close(jnp.linalg.norm(out["embedding"], axis=-1), jnp.ones(3), atol=1e-5)
  assert len(out["features"]) == 2


def test_segmenter_logits_at_input_resolution(rng):
  model = Segmenter(5, stage_sizes=(1, 1, 1), widths=(8, 8, 16), decoder_width=8)
  x = jax.random.uniform(rng, (2, 32, 32, 3))
  params = model.init(rng, x)["params"]
  out = model.apply({"params": params}, x)
  chex.assert_shape(out["logits"], (2, 32, 32, 5))
  chex.assert_tree_all_finite(out["logits"])
