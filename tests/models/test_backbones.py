"""Tests of the named backbones, their bfloat16 compute option and checkpoint initialisation.

research/models/resnet.py (`backbone` 'small' | 'resnet18' | 'resnet50', `dtype`) and
research/models/pretrained.py. Inputs are 32x32, batches of 2; ResNet-50 is only traced
(`jax.eval_shape`) for its shapes and parameter count.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from research import config_checks
from research.incremental_panoptic import fine_tuning
from research.incremental_panoptic.settings import ModelSettings
from research.models import pretrained, resnet
from research.models.resnet import ResNet, Segmenter
from research.training import checkpoint

X = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))


def random_params(model, x=X, seed=0):
  """Parameters shaped by `model.init` (traced, not compiled) filled with scaled normals."""
  rs = np.random.RandomState(seed)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return jnp.asarray(1 + 0.1 * rs.randn(*s.shape), s.dtype)
    if "bias" in name:
      return jnp.asarray(0.1 * rs.randn(*s.shape), s.dtype)
    fan_in = int(np.prod(s.shape[:-1]))
    return jnp.asarray(rs.randn(*s.shape) / np.sqrt(fan_in), s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def count(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def torchvision_count(block: str, stage_sizes, num_classes: int = 1000) -> int:
  """Parameters of torchvision's ResNet (conv kernels, norm scale+bias, fc), by formula."""
  expansion = 4 if block == "bottleneck" else 1
  total = 7 * 7 * 3 * 64 + 2 * 64  # stem conv + norm
  c_in = 64
  for stage, (blocks, width) in enumerate(zip(stage_sizes, (64, 128, 256, 512))):
    out = width * expansion
    for index in range(blocks):
      if block == "basic":
        total += 9 * c_in * width + 2 * width + 9 * width * width + 2 * width
      else:
        total += c_in * width + 2 * width + 9 * width * width + 2 * width + width * out + 2 * out
      strides = 2 if stage > 0 and index == 0 else 1
      if c_in != out or strides != 1:
        total += c_in * out + 2 * out
      c_in = out
  return total + c_in * num_classes + num_classes


@pytest.mark.parametrize(
  "name, block, stage_sizes, published, channels",
  [
    ("resnet18", "basic", (2, 2, 2, 2), 11_689_512, (64, 128, 256, 512)),
    ("resnet50", "bottleneck", (3, 4, 6, 3), 25_557_032, (256, 512, 1024, 2048)),
  ],
)
def test_named_backbone_parameter_count_and_strides(name, block, stage_sizes, published, channels):
  model = ResNet(1000, backbone=name)
  variables = jax.eval_shape(model.init, jax.random.key(0), X)
  params = dict(variables["params"])
  embedding = params.pop("embedding")
  assert count(embedding) == channels[-1] * 64 + 64
  # GroupNorm has BatchNorm's scale and bias: torchvision's published count, derived here too.
  assert torchvision_count(block, stage_sizes) == published
  assert count(params) == published
  out = jax.eval_shape(model.apply, variables, X)
  assert [f.shape for f in out["features"]] == [
    (2, 32 // s, 32 // s, c) for s, c in zip((4, 8, 16, 32), channels)
  ]
  assert resnet.feature_strides(name) == (4, 8, 16, 32)
  assert resnet.feature_channels(name) == channels
  assert out["logits"].shape == (2, 1000)


def test_resnet18_runs_and_small_keeps_its_layout():
  model = ResNet(10, backbone="resnet18", embedding_dim=8)
  out = model.apply({"params": random_params(model)}, X)
  assert out["feature_map"].shape == (2, 1, 1, 512)
  assert out["logits"].shape == (2, 10) and bool(jnp.all(jnp.isfinite(out["logits"])))
  small = ResNet(10, stage_sizes=(1, 2), widths=(8, 16), embedding_dim=8)
  shapes = jax.eval_shape(small.init, jax.random.key(0), X)["params"]
  blocks = ["BasicBlock_0", "BasicBlock_1", "BasicBlock_2"]
  assert sorted(shapes) == sorted(["stem", "GroupNorm_0", *blocks, "embedding", "classifier"])
  assert shapes["stem"]["kernel"].shape == (3, 3, 3, 8)
  assert resnet.feature_strides("small", 2, 1) == (1, 2)


def test_backbone_name_is_validated():
  with pytest.raises(ValueError, match=r"ResNet.backbone='resnet34' is not allowed: choose one"):
    jax.eval_shape(ResNet(3, backbone="resnet34").init, jax.random.key(0), X)
  config = ml_collections.ConfigDict({"model": {"widths": (8,)}})
  assert resnet.backbone_from_config(config) == "small"
  assert resnet.dtype_from_config(config) is None
  config.model.backbone = "vgg"
  with pytest.raises(
    config_checks.ConfigError,
    match=r"^config.model.backbone='vgg' is not allowed: choose one of "
    r"\['resnet18', 'resnet50', 'small'\]$",
  ):
    resnet.backbone_from_config(config)
  config.model.dtype = "float16"
  with pytest.raises(config_checks.ConfigError, match=r"config.model.dtype='float16'"):
    resnet.dtype_from_config(config)


def test_segmenter_and_mask_former_take_a_named_backbone():
  seg = Segmenter(4, backbone="resnet18", decoder_width=8)
  out = jax.eval_shape(seg.apply, jax.eval_shape(seg.init, jax.random.key(0), X), X)
  assert out["logits"].shape == (2, 32, 32, 4)
  assert [f.shape[1] for f in out["features"]] == [8, 4, 2, 1]
  with pytest.raises(ValueError, match="multiples of its output stride 32"):
    jax.eval_shape(seg.init, jax.random.key(0), X[:, :24, :24])
  settings = ModelSettings((8,), 1, 16, 4, 1, 2, 32, backbone="resnet18", dtype="bfloat16")
  assert settings.output_stride == 32
  model = fine_tuning.build_model(settings, 3)
  out = jax.eval_shape(model.apply, jax.eval_shape(model.init, jax.random.key(0), X), X)
  assert out["mask_logits"].shape == (2, 4, 8, 8)  # stride 4, the C2 map of the ResNet
  assert out["class_logits"].shape == (2, 4, 4)


# bfloat16 keeps 8 mantissa bits (relative rounding 2**-9 ~ 0.2%) per op; through ~10 layers
# the cross-entropy of one batch stays within 2% of float32's (measured 0.1% for 'small' and
# 0.6% for 'resnet18' with these weights).
BF16_LOSS_RTOL = 2e-2


@pytest.mark.parametrize("backbone", ["small", "resnet18"])
def test_bfloat16_compute_close_to_float32(backbone):
  f32 = ResNet(10, stage_sizes=(1, 1), widths=(8, 16), embedding_dim=8, backbone=backbone)
  bf16 = f32.clone(dtype=jnp.bfloat16)
  params = random_params(f32)
  assert (
    jax.eval_shape(bf16.init, jax.random.key(0), X)["params"]
    == jax.eval_shape(f32.init, jax.random.key(0), X)["params"]
  )  # same parameters, all float32
  labels = jnp.array([3, 7])

  def loss(model):
    out = model.apply({"params": params}, X)
    ce = optax.softmax_cross_entropy_with_integer_labels(out["logits"], labels).mean()
    return out, ce

  (out32, loss32), (out16, loss16) = loss(f32), loss(bf16)
  assert out16["features"][-1].dtype == jnp.bfloat16
  assert out16["logits"].dtype == jnp.float32 and out32["logits"].dtype == jnp.float32
  np.testing.assert_allclose(loss16, loss32, rtol=BF16_LOSS_RTOL)
  scale = float(jnp.abs(out32["logits"]).max())
  np.testing.assert_allclose(out16["logits"], out32["logits"], atol=0.05 * scale)


def test_restore_params_round_trip_and_into_a_part(tmp_path):
  model = ResNet(5, stage_sizes=(1, 1), widths=(8, 16), embedding_dim=8)
  saved = random_params(model, seed=1)
  pretrained.save_params(tmp_path / "resnet", saved)
  fresh = random_params(model, seed=2)
  restored = pretrained.restore_params(str(tmp_path / "resnet"), fresh)
  jax.tree.map(np.testing.assert_array_equal, restored, saved)
  assert jax.tree.structure(restored) == jax.tree.structure(fresh)

  # A whole Segmenter's backbone into a fresh Segmenter's backbone, its decoder kept.
  seg = Segmenter(3, stage_sizes=(1, 1), widths=(8, 16), decoder_width=8)
  seg_saved = random_params(seg, seed=3)
  pretrained.save_params(tmp_path / "segmenter", seg_saved)
  seg_fresh = random_params(seg, seed=4)
  out = pretrained.restore_params(
    str(tmp_path / "segmenter"), seg_fresh, target="backbone", source="backbone"
  )
  jax.tree.map(np.testing.assert_array_equal, out["backbone"], seg_saved["backbone"])
  jax.tree.map(np.testing.assert_array_equal, out["classifier"], seg_fresh["classifier"])

  # The parameters of a training checkpoint (research.training.checkpoint) by `source`.
  ckpt = checkpoint.Checkpointer(str(tmp_path / "train"))
  ckpt.save(7, {"step": jnp.int32(7), "params": saved})
  ckpt.close()
  restored = pretrained.restore_params(
    str(tmp_path / "train" / "7" / "state"), fresh, source="params"
  )
  jax.tree.map(np.testing.assert_array_equal, restored, saved)


def test_restore_params_mismatch_names_the_first_parameter(tmp_path):
  small = ResNet(5, stage_sizes=(1, 1), widths=(8, 16), embedding_dim=8)
  pretrained.save_params(tmp_path / "small", random_params(small))
  wider = small.clone(widths=(8, 32))
  with pytest.raises(
    pretrained.PretrainedMismatchError,
    match=r"^parameter BasicBlock_1/Conv_0/kernel has shape \(3, 3, 8, 16\) in the checkpoint "
    r"but \(3, 3, 8, 32\) in the model$",
  ):
    pretrained.restore_params(str(tmp_path / "small"), random_params(wider))
  headless = small.clone(num_classes=0)
  pretrained.save_params(tmp_path / "headless", random_params(headless))
  with pytest.raises(
    pretrained.PretrainedMismatchError,
    match=r"parameter classifier/bias is missing from the checkpoint \(model shape \(5,\)",
  ):
    pretrained.restore_params(str(tmp_path / "headless"), random_params(small))
  with pytest.raises(pretrained.PretrainedMismatchError, match=r"parameter classifier/bias of "):
    pretrained.restore_params(str(tmp_path / "small"), random_params(headless))
  resnet18 = ResNet(5, backbone="resnet18", embedding_dim=8)
  with pytest.raises(
    pretrained.PretrainedMismatchError, match=r"^parameter BasicBlock_0/Conv_0/kernel has shape"
  ):
    pretrained.restore_params(str(tmp_path / "small"), random_params(resnet18))


def test_the_m5_classifier_takes_a_named_backbone_and_dtype():
  from research.ot_perturbation import task

  config = ml_collections.ConfigDict(
    {"model": {"stage_sizes": (1,), "widths": (8,), "embedding_dim": 8, "stem_strides": 1}}
  )
  config.model.backbone = "resnet18"
  config.model.dtype = "bfloat16"
  model = task.build_task_model(config, "classification", 3)
  assert (model.backbone, model.dtype) == ("resnet18", jnp.bfloat16)
