"""Tests of the CenterNet-style detector against numpy re-implementations of CenterNet's code.

Also its ResNet backbones (`resnet_detector`: 'small', 'resnet18', 'resnet50' with the
top-down neck), the bfloat16 compute option and initialising the backbone from a checkpoint.
Images are 64x64 (a 16x16 heatmap); ResNet-50 is only traced (`jax.eval_shape`).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from test_backbones import count, random_params  # tests/models is on sys.path under pytest

from research import config_checks
from research.models import detector as det
from research.models import pretrained, resnet
from research.models.resnet import ResNet
from research.ot_perturbation import task

STRIDE = 4
NUM_CLASSES = 3
OUT_HW = (16, 16)  # 64x64 images
ENCODING = {"num_classes": NUM_CLASSES, "output_size": OUT_HW, "stride": STRIDE}


def _reference_radius(height, width, min_overlap=0.7):
  """CenterNet's ``gaussian_radius`` (src/lib/utils/image.py), verbatim in numpy."""
  a1 = 1
  b1 = height + width
  c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
  r1 = (b1 + np.sqrt(b1**2 - 4 * a1 * c1)) / 2
  a2 = 4
  b2 = 2 * (height + width)
  c2 = (1 - min_overlap) * width * height
  r2 = (b2 + np.sqrt(b2**2 - 4 * a2 * c2)) / 2
  a3 = 4 * min_overlap
  b3 = -2 * min_overlap * (height + width)
  c3 = (min_overlap - 1) * width * height
  r3 = (b3 + np.sqrt(b3**2 - 4 * a3 * c3)) / 2
  return min(r1, r2, r3)


def _reference_heatmap(boxes, classes, valid):
  """CenterNet's ctdet target drawing (draw_umich_gaussian) with python loops."""
  h, w = OUT_HW
  heat = np.zeros((NUM_CLASSES, h, w))
  for box, cls, ok in zip(boxes, classes, valid, strict=True):
    box = np.asarray(box, np.float64) / STRIDE
    bw, bh = box[2] - box[0], box[3] - box[1]
    if not ok or bw <= 0 or bh <= 0:
      continue
    radius = max(0, int(_reference_radius(np.ceil(bh), np.ceil(bw))))
    cx, cy = int((box[0] + box[2]) / 2), int((box[1] + box[3]) / 2)
    sigma = (2 * radius + 1) / 6
    for y in range(max(0, cy - radius), min(h, cy + radius + 1)):
      for x in range(max(0, cx - radius), min(w, cx + radius + 1)):
        g = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))
        heat[cls, y, x] = max(heat[cls, y, x], g)
  return heat.transpose(1, 2, 0)


BOXES = np.array(
  [
    [4.0, 6.0, 30.0, 22.0],
    [33.0, 35.0, 61.0, 62.0],
    [10.0, 40.0, 18.0, 47.0],
    [20.0, 20.0, 44.0, 50.0],
    [40.0, 30.0, 56.0, 50.0],  # same class as row 1, Gaussians overlap: splatted with max
    [0.0, 0.0, 0.0, 0.0],  # padding
  ],
  np.float32,
)
CLASSES = np.array([0, 2, 2, 1, 2, 0], np.int32)
VALID = np.array([True, True, True, True, True, False])
NUM_VALID = 5


def _encode():
  return det.encode_targets(BOXES, CLASSES, VALID, **ENCODING)


def _encode_batch(n):
  """The targets of a batch of `n` copies of the test image's boxes."""

  def tile(a):
    return np.stack([a] * n)

  encode = jax.jit(functools.partial(det.encode_batch_targets, **ENCODING))
  return encode(tile(BOXES), tile(CLASSES), tile(VALID))


def test_gaussian_radius_matches_centernet():
  for hw in [(4.0, 7.0), (1.0, 1.0), (30.0, 12.0)]:
    np.testing.assert_allclose(det.gaussian_radius(*hw), _reference_radius(*hw), rtol=1e-6)


def test_encoded_targets_match_reference():
  targets = _encode()
  np.testing.assert_allclose(
    targets["heatmap"], _reference_heatmap(BOXES, CLASSES, VALID), atol=1e-6
  )
  centres = np.stack([(BOXES[:, 0] + BOXES[:, 2]) / 2, (BOXES[:, 1] + BOXES[:, 3]) / 2], 1)
  centres = centres / STRIDE
  cells = np.floor(centres)
  np.testing.assert_array_equal(targets["mask"], VALID)
  n = NUM_VALID
  np.testing.assert_array_equal(
    targets["indices"][:n], (cells[:n, 1] * OUT_HW[1] + cells[:n, 0]).astype(int)
  )
  np.testing.assert_allclose(targets["offset"][:n], (centres - cells)[:n], atol=1e-6)
  sizes = np.stack([BOXES[:, 2] - BOXES[:, 0], BOXES[:, 3] - BOXES[:, 1]], 1) / STRIDE
  np.testing.assert_allclose(targets["size"][:n], sizes[:n], atol=1e-6)
  np.testing.assert_array_equal(targets["size"][n], [0, 0])
  # The two class-2 Gaussians overlap: some cell holds the max of two non-zero values.
  overlap = [
    _reference_heatmap(BOXES[i : i + 1], CLASSES[i : i + 1], [True])[..., 2] for i in (1, 4)
  ]
  assert np.any((overlap[0] > 0) & (overlap[1] > 0))
  # A batch is encoded image by image.
  jax.tree.map(
    lambda b, t: np.testing.assert_array_equal(b, np.stack([t, t])), _encode_batch(2), targets
  )


def _perfect_outputs(targets):
  """Head outputs that a perfect model would give, built with numpy loops."""
  h, w = OUT_HW
  heat = np.clip(np.asarray(targets["heatmap"], np.float64), 1e-6, 1 - 1e-6)
  size = np.zeros((h, w, 2))
  offset = np.zeros((h, w, 2))
  for n in range(len(targets["mask"])):
    if targets["mask"][n]:
      y, x = divmod(int(targets["indices"][n]), w)
      size[y, x] = targets["size"][n]
      offset[y, x] = targets["offset"][n]
  return {
    "heatmap": jnp.asarray(np.log(heat / (1 - heat)), jnp.float32)[None],
    "size": jnp.asarray(size, jnp.float32)[None],
    "offset": jnp.asarray(offset, jnp.float32)[None],
  }


def test_encode_decode_round_trip_recovers_boxes():
  outputs = _perfect_outputs(_encode())
  decoded = jax.jit(lambda o: det.decode_detections(o, stride=STRIDE, top_k=10))(outputs)
  chex.assert_shape(decoded["boxes"], (1, 10, 4))
  assert np.all(np.diff(np.asarray(decoded["scores"][0])) <= 0)
  top = np.asarray(decoded["scores"][0]) > 0.5
  assert top.sum() == NUM_VALID  # exactly the objects survive the 3x3 NMS as confident peaks
  got = sorted(
    zip(
      decoded["classes"][0][top].tolist(),
      np.round(np.asarray(decoded["boxes"][0][top]), 3).tolist(),
      strict=True,
    )
  )
  want = sorted(zip(CLASSES[:NUM_VALID].tolist(), BOXES[:NUM_VALID].tolist(), strict=True))
  for (gc, gb), (wc, wb) in zip(got, want, strict=True):
    assert gc == wc
    np.testing.assert_allclose(gb, wb, atol=1e-3)


def _reference_focal(logits, gt):
  """CenterNet's _neg_loss in numpy (without its sigmoid clamp; logits here are moderate)."""
  p = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
  gt = np.asarray(gt, np.float64)
  pos = gt == 1
  pos_loss = np.sum(np.log(p) * (1 - p) ** 2 * pos)
  neg_loss = np.sum(np.log(1 - p) * p**2 * (1 - gt) ** 4 * ~pos)
  num_pos = pos.sum()
  return -neg_loss if num_pos == 0 else -(pos_loss + neg_loss) / num_pos


def test_detection_loss_matches_numpy_reference(rng):
  targets = _encode_batch(2)
  keys = jax.random.split(rng, 3)
  outputs = {
    "heatmap": jax.random.normal(keys[0], (2, *OUT_HW, NUM_CLASSES)) * 2,
    "size": jax.random.normal(keys[1], (2, *OUT_HW, 2)) * 3,
    "offset": jax.random.uniform(keys[2], (2, *OUT_HW, 2)),
  }
  loss, metrics = jax.jit(det.detection_loss)(outputs, targets)
  focal = _reference_focal(outputs["heatmap"], targets["heatmap"])
  size_err, off_err, count = 0.0, 0.0, 0
  for b in range(2):
    for n in range(len(VALID)):
      if targets["mask"][b, n]:
        y, x = divmod(int(targets["indices"][b, n]), OUT_HW[1])
        size_err += np.abs(np.asarray(outputs["size"][b, y, x]) - targets["size"][b, n]).sum()
        off_err += np.abs(np.asarray(outputs["offset"][b, y, x]) - targets["offset"][b, n]).sum()
        count += 2
  np.testing.assert_allclose(metrics["heatmap_loss"], focal, rtol=1e-5)
  np.testing.assert_allclose(metrics["size_loss"], size_err / count, rtol=1e-5)
  np.testing.assert_allclose(metrics["offset_loss"], off_err / count, rtol=1e-5)
  np.testing.assert_allclose(loss, focal + 0.1 * size_err / count + off_err / count, rtol=1e-5)
  assert float(metrics["num_objects"]) == 2 * NUM_VALID


def test_focal_loss_without_objects_normalises_by_one():
  gt = jnp.zeros((1, 4, 4, 2))
  logits = jnp.linspace(-3, 3, 32).reshape(1, 4, 4, 2)
  total, num_pos = det.focal_loss(logits, gt)
  np.testing.assert_allclose(total, _reference_focal(logits, gt), rtol=1e-5)
  assert float(num_pos) == 0


def test_detector_forward_shapes_grad_and_single_compile(rng):
  model = det.Detector(det.TinyBackbone(features=8, stride=STRIDE), NUM_CLASSES, STRIDE, 16)
  x = jax.random.uniform(rng, (2, 64, 64, 3))
  params = model.init(jax.random.key(1), x)
  outputs = model.apply(params, x)
  chex.assert_shape(outputs["heatmap"], (2, *OUT_HW, NUM_CLASSES))
  chex.assert_shape(outputs["size"], (2, *OUT_HW, 2))
  chex.assert_shape(outputs["offset"], (2, *OUT_HW, 2))
  chex.assert_shape(outputs["embedding"], (2, 8))
  bias = params["params"]["head"]["heatmap_out"]["bias"]
  np.testing.assert_allclose(bias, det.HEATMAP_BIAS_INIT)

  targets = _encode_batch(2)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def loss_and_grad(params, x):
    return jax.value_and_grad(lambda p: det.detection_loss(model.apply(p, x), targets)[0])(params)

  loss, grads = loss_and_grad(params, x)
  loss_and_grad(params, x * 0.5)
  chex.assert_tree_all_finite((loss, grads))
  assert float(loss) > 0


def test_bad_inputs_raise(rng):
  with pytest.raises(ValueError, match="stride=3"):
    det.TinyBackbone(stride=3).init(rng, jnp.zeros((1, 8, 8, 3)))
  with pytest.raises(ValueError, match="feature_map has spatial shape"):
    model = det.Detector(det.TinyBackbone(stride=4), NUM_CLASSES, stride=2)
    model.init(rng, jnp.zeros((1, 16, 16, 3)))
  with pytest.raises(ValueError, match="num_classes=0"):
    det.CenterNetHead(num_classes=0).init(rng, jnp.zeros((1, 4, 4, 8)))
  with pytest.raises(ValueError, match="boxes has shape"):
    det.encode_targets(
      jnp.zeros((3, 5)),
      jnp.zeros(3, int),
      jnp.ones(3, bool),
      num_classes=2,
      output_size=(4, 4),
      stride=4,
    )
  with pytest.raises(ValueError, match="top_k=1000"):
    det.decode_detections(_perfect_outputs(_encode()), stride=STRIDE, top_k=1000)


def test_decoding_clips_negative_sizes_to_empty_boxes():
  outputs = {
    "heatmap": jnp.zeros((1, 4, 4, 1)).at[0, 1, 2, 0].set(5.0),
    "size": jnp.full((1, 4, 4, 2), -3.0),
    "offset": jnp.full((1, 4, 4, 2), 0.5),
  }
  decoded = det.decode_detections(outputs, stride=2, top_k=1)
  # Centre ((2 + 0.5) * 2, (1 + 0.5) * 2) = (5, 3); the negative size becomes 0.
  np.testing.assert_allclose(decoded["boxes"][0, 0], [5.0, 3.0, 5.0, 3.0])


# --------------------------------------------------------------------------------------------
# ResNet backbones (`resnet_detector`).

X64 = jax.random.uniform(jax.random.key(1), (2, 64, 64, 3))
SMALL = {"stage_sizes": (1, 1, 1), "widths": (8, 16, 32), "embedding_dim": 8}


def test_small_resnet_detector_is_the_m5_detector(rng):
  """'small' (no neck, float32) builds exactly the detector M5 had: same parameters, outputs.

  Both `init` and `apply` lower to the same XLA program as before (so they give the same
  parameters from the same key, and the same outputs), checked without compiling.
  """
  before = det.Detector(ResNet(0, (1, 1, 1), (8, 16, 32), 8, 1), NUM_CLASSES, STRIDE, 16)
  model = det.resnet_detector(NUM_CLASSES, STRIDE, 16, **SMALL)
  x = X64[:1]
  variables = jax.eval_shape(model.init, rng, x)
  assert sorted(variables["params"]) == ["backbone", "head"]
  for fn, args in [("init", (rng, x)), ("apply", (variables, x))]:
    program = jax.jit(getattr(model, fn)).lower(*args).as_text()
    assert program == jax.jit(getattr(before, fn)).lower(*args).as_text()
  bf16 = model.clone(dtype=jnp.bfloat16)  # (the check can see a difference)
  assert jax.jit(bf16.apply).lower(variables, x).as_text() != program


def _expected_count(backbone: str, head_channels: int, neck_channels: int) -> int:
  """Backbone (headless ResNet, embedding 8) + neck (named backbones) + the three heads."""
  net = ResNet(0, **SMALL, backbone=backbone)
  total = count(jax.eval_shape(net.init, jax.random.key(0), X64[:1])["params"])
  channels = resnet.feature_channels(backbone, SMALL["widths"])
  f = channels[-1]
  if backbone != "small":  # 1x1 laterals of every stage + the 3x3 output convolution
    f = neck_channels
    total += sum(c * f + f for c in channels) + 9 * f * f + f
  hidden = 9 * f * head_channels + head_channels
  return total + sum(hidden + head_channels * k + k for k in (NUM_CLASSES, 2, 2))


@pytest.mark.parametrize(
  "backbone, pooled, total",
  [("small", 32, 33_879), ("resnet18", 512, 11_234_703), ("resnet50", 2048, 23_670_671)],
)
def test_resnet_detector_shapes_and_parameters_per_backbone(backbone, pooled, total):
  model = det.resnet_detector(NUM_CLASSES, STRIDE, 16, backbone=backbone, neck_channels=32, **SMALL)
  x = X64[:1]
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  out = jax.eval_shape(model.apply, variables, x)
  assert out["heatmap"].shape == (1, *OUT_HW, NUM_CLASSES)
  assert out["size"].shape == out["offset"].shape == (1, *OUT_HW, 2)
  assert (out["embedding"].shape, out["pooled"].shape) == ((1, 8), (1, pooled))
  neck = [] if backbone == "small" else ["neck"]
  assert sorted(variables["params"]) == sorted(["backbone", "head", *neck])
  assert count(variables["params"]) == _expected_count(backbone, 16, 32) == total
  if backbone != "small":  # The neck also merges stages whose sizes do not halve exactly.
    x36 = jnp.zeros((1, 36, 36, 3))
    out = jax.eval_shape(model.apply, jax.eval_shape(model.init, jax.random.key(0), x36), x36)
    assert out["heatmap"].shape == (1, 9, 9, NUM_CLASSES)


# bfloat16 keeps 8 mantissa bits (relative rounding 2**-9 ~ 0.2%) per op. Through the backbone,
# neck and head the detection loss of one batch stays within 2% of float32's (measured 0.08% for
# 'small' and 0.4% for 'resnet18' with these weights), as the classifier's bfloat16 test allows.
BF16_LOSS_RTOL = 2e-2


@pytest.mark.parametrize("backbone", ["small", "resnet18"])
def test_bfloat16_detection_loss_close_to_float32(backbone, rng):
  f32 = det.resnet_detector(NUM_CLASSES, STRIDE, 16, backbone=backbone, neck_channels=16, **SMALL)
  bf16 = det.resnet_detector(
    NUM_CLASSES, STRIDE, 16, backbone=backbone, neck_channels=16, dtype=jnp.bfloat16, **SMALL
  )
  params = {"params": random_params(f32)}
  assert jax.eval_shape(bf16.init, rng, X64) == jax.eval_shape(f32.init, rng, X64)  # all f32
  targets = _encode_batch(2)

  def loss(model):
    @jax.jit
    def run(params):
      out = model.apply(params, X64)
      return out, det.detection_loss(out, targets)[0]

    return run(params)

  (out32, loss32), (out16, loss16) = loss(f32), loss(bf16)
  for name in ("heatmap", "size", "offset", "embedding", "pooled"):
    assert out16[name].dtype == out32[name].dtype == jnp.float32
  assert float(loss16) != float(loss32)  # computed in bfloat16 indeed
  np.testing.assert_allclose(loss16, loss32, rtol=BF16_LOSS_RTOL)
  scale = float(jnp.abs(out32["heatmap"]).max())
  np.testing.assert_allclose(out16["heatmap"], out32["heatmap"], atol=0.05 * scale)


def test_detector_backbone_restores_from_a_resnet_checkpoint(tmp_path):
  """A headless ResNet-18's checkpoint initialises the detector's backbone; neck, head stay."""
  net = ResNet(0, embedding_dim=8, backbone="resnet18")
  saved = random_params(net, X64[:1], seed=1)
  pretrained.save_params(tmp_path / "resnet18", saved)
  model = det.resnet_detector(NUM_CLASSES, STRIDE, 16, backbone="resnet18", embedding_dim=8)
  fresh = random_params(model, X64[:1], seed=2)
  restored = pretrained.restore_params(str(tmp_path / "resnet18"), fresh, target="backbone")
  jax.tree.map(np.testing.assert_array_equal, restored["backbone"], saved)
  for part in ("neck", "head"):
    jax.tree.map(np.testing.assert_array_equal, restored[part], fresh[part])
  # The checkpoint of another backbone: one error naming the first parameter that differs.
  with pytest.raises(pretrained.PretrainedMismatchError, match=r"^parameter backbone/"):
    small = det.resnet_detector(NUM_CLASSES, STRIDE, 16, embedding_dim=8)
    pretrained.restore_params(
      str(tmp_path / "resnet18"), random_params(small, X64[:1]), target="backbone"
    )


def test_backbone_name_and_stride_are_validated():
  with pytest.raises(
    ValueError,
    match=r"^backbone='resnet34' is not allowed: choose one of "
    r"\['resnet18', 'resnet50', 'small'\]$",
  ):
    det.resnet_detector(NUM_CLASSES, STRIDE, backbone="resnet34")
  with pytest.raises(ValueError, match=r"^stride=8 is not allowed with backbone='resnet18'"):
    det.resnet_detector(NUM_CLASSES, 8, backbone="resnet18")

  config = ml_collections.ConfigDict(
    {"model": {"stage_sizes": (1, 1, 1), "widths": (8, 16, 32), "embedding_dim": 8}}
  )
  config.model.head_channels = 8
  config.model.backbone = "resnet34"
  with pytest.raises(
    config_checks.ConfigError,
    match=r"^config.model.backbone='resnet34' is not allowed: choose one of "
    r"\['resnet18', 'resnet50', 'small'\]$",
  ):
    task.build_task_model(config, "detection", NUM_CLASSES)
  config.model.backbone, config.model.dtype = "resnet50", "bfloat16"
  model = task.build_task_model(config, "detection", NUM_CLASSES)
  assert isinstance(model.neck, det.TopDownNeck) and model.dtype == jnp.bfloat16
  assert (model.backbone.backbone, model.stride) == ("resnet50", STRIDE)
