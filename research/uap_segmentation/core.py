"""Pure core of M1: universal adversarial training samples for segmentation.

Implements METHODS.md M1 (patent seed 000, "训练样本生成方法"):

1. ``partial_targeted_labels``: pixels of a configured ``src`` class take the wrong label
   ``tgt`` (step 1).
2. ``weighted_pixel_loss`` (batch mean or per sample): ``L_adv = w * L`` with ``w_t`` on
   targeted pixels and ``w_c`` on the others (step 2).
3. ``random_start``, ``fgsm_round``, ``iterative_fgsm``: the iterative fast-gradient step with
   the input-amplitude control ``Clip_xi`` (step 3).
4. ``sample_weights``, ``dataset_perturbation``, ``accumulate_perturbation`` and the drivers
   ``accumulate_with_shard_map``, ``accumulate_with_pmap``, ``universal_perturbation_sharded``:
   the per-dataset universal perturbation ``r_D = sum_n w_n r_n``, accumulated across devices
   with ``lax.psum`` over a named device axis (step 4).
5. ``unified_perturbation``: the unified universal perturbation over M datasets (step 5).
6. ``second_samples``: ``x' = clip(x + R, 0, 1)`` (step 6).
7. ``mix_batches``: the adversarial-training batch of clean and second samples (step 7).

The segmentation model enters as ``logits_fn(images [B, H, W, C]) -> logits [B, H, W, K]`` (a
closure over parameters) or, for the sharded driver, as ``apply_fn(params, images)``. Images are
NHWC in [0, 1]; all radii (``xi``, ``alpha``, ``eps_r``) are in that [0, 1] scale (8/255 is
``xi=8/255``).

Configuration scalars (``alpha``, ``xi``, ``rho``, ``w_t``, ...) are static Python numbers:
they are validated when a function is called or traced (before compilation) and raise one
``ValueError`` naming the field, the value and what is allowed. Bind them with
``functools.partial`` (or pass an ``AttackConfig``) before ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

AXIS_NAME = "devices"
WEIGHT_MODES = ("uniform", "success")
NORMS = ("linf", "l2")
CORRECT_PIXELS = ("all", "partner")

LogitsFn = Callable[[jax.Array], jax.Array]
ApplyFn = Callable[[Any, jax.Array], jax.Array]


# --------------------------------------------------------------------------------------------
# Validation of static configuration values.


def _static_float(name: str, value: Any) -> float:
  """Returns ``value`` as a Python float; a traced value is a usage error."""
  if isinstance(value, jax.core.Tracer):
    raise TypeError(
      f"{name} must be a static Python number, got a traced value; bind it with "
      "functools.partial before jax.jit"
    )
  return float(value)


def _check_unit_interval(name: str, value: Any) -> float:
  """Checks ``0 < value <= 1`` (radii and fractions in the image's [0, 1] scale)."""
  value = _static_float(name, value)
  if not 0.0 < value <= 1.0:
    raise ValueError(f"{name}={value} is not allowed: {name} must be in (0, 1]")
  return value


def _check_non_negative(name: str, value: Any) -> float:
  value = _static_float(name, value)
  if not value >= 0.0:
    raise ValueError(f"{name}={value} is not allowed: {name} must be >= 0")
  return value


def _check_loss_weights(w_t: Any, w_c: Any) -> tuple[float, float]:
  w_t = _check_non_negative("w_t", w_t)
  w_c = _check_non_negative("w_c", w_c)
  if w_t == 0.0 and w_c == 0.0:
    raise ValueError("w_t=0.0 and w_c=0.0 is not allowed: at least one weight must be > 0")
  return w_t, w_c


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> str:
  if value not in allowed:
    raise ValueError(f"{name}={value!r} is not allowed: {name} must be one of {list(allowed)}")
  return value


def _check_rounds(rounds: Any) -> int:
  if isinstance(rounds, bool) or not isinstance(rounds, int | np.integer) or rounds < 1:
    raise ValueError(f"rounds={rounds!r} is not allowed: rounds must be an integer >= 1")
  return int(rounds)


@dataclasses.dataclass(frozen=True)
class AttackConfig:
  """Static settings of METHODS.md M1 steps 1-3 (hashable, so usable as a jit static arg).

  Attributes:
    rounds: number of fast-gradient rounds i = 1..rounds (step 3), >= 1.
    alpha: perturbation-amplitude control ("扰动幅度控制因子"), step size in (0, 1].
    xi: input-amplitude control ("输入幅度控制因子"), L-inf radius in (0, 1].
    eps_r: control factor of the random start ("指定的随机扰动及其相关控制因子"), >= 0;
      0 disables the random start.
    w_t: loss weight on targeted pixels ("针对所述一部分像素...的损失函数权重"), >= 0.
    w_c: loss weight on the other (correctly labelled) pixels, >= 0.
    rho: fraction of ``src`` pixels that are targeted, in (0, 1] (METHODS.md option).
    ignore_label: label value excluded from the loss and never targeted.
    eps_round: control factor of the random term *inside* every round (patent claim 5's
      second formula, ``r_i = Clip_xi(r_{i-1} - alpha sign(grad) + eps r_random)``), >= 0;
      0 disables it. A fresh ``N(0, 1)`` draw per round and sample (``round_keys``).
    correct_pixels: which non-targeted pixels keep their correct label in ``L_adv``
      (``CORRECT_PIXELS``): ``'all'`` (claim 1) or ``'partner'`` (the dependent claim: only
      pixels of a pair's ``tgt`` class; all others get weight 0).
  """

  rounds: int = 10
  alpha: float = 1.0 / 255.0
  xi: float = 8.0 / 255.0
  eps_r: float = 0.0
  w_t: float = 1.0
  w_c: float = 1.0
  rho: float = 1.0
  ignore_label: int = 255
  eps_round: float = 0.0
  correct_pixels: str = "all"

  def __post_init__(self):
    _check_non_negative("eps_round", self.eps_round)
    _check_choice("correct_pixels", self.correct_pixels, CORRECT_PIXELS)
    _check_rounds(self.rounds)
    _check_unit_interval("alpha", self.alpha)
    _check_unit_interval("xi", self.xi)
    _check_non_negative("eps_r", self.eps_r)
    _check_loss_weights(self.w_t, self.w_c)
    _check_unit_interval("rho", self.rho)


def check_same_image_size(shapes: Sequence[Sequence[int]]) -> tuple[int, int, int]:
  """Checks that all datasets share one image size (METHODS.md M1 step 4: resize first).

  Args:
    shapes: one shape per dataset, each ending in ``[H, W, C]`` (e.g. ``[N, H, W, C]``).

  Returns:
    The common ``(H, W, C)``.

  Raises:
    ValueError: if ``shapes`` is empty (M = 0), a shape has fewer than 3 dimensions, or the
      image sizes differ.
  """
  if len(shapes) == 0:
    raise ValueError("shapes=[] is not allowed: at least one dataset (M >= 1) is needed")
  sizes = []
  for j, shape in enumerate(shapes):
    if len(shape) < 3:
      raise ValueError(
        f"shapes[{j}]={tuple(shape)} is not allowed: each shape must end in [H, W, C]"
      )
    sizes.append(tuple(int(d) for d in shape[-3:]))
  if len(set(sizes)) > 1:
    listing = ", ".join(f"dataset {j}: {s}" for j, s in enumerate(sizes))
    raise ValueError(
      f"image sizes differ across datasets ({listing}): universal perturbations need one "
      "[H, W, C]; resize every dataset to one size first (e.g. with jax.image.resize)"
    )
  return sizes[0]


# --------------------------------------------------------------------------------------------
# Step 1: partial targeted labels.


def resolve_confusable_pairs(
  pairs: Sequence[tuple[str, str]], class_names: Sequence[str]
) -> np.ndarray:
  """Turns named confusable pairs ``(src, tgt)`` into class indices (METHODS.md M1 step 1).

  Args:
    pairs: e.g. ``[("sidewalk", "road"), ("truck", "car")]``; pixels of ``src`` are targeted
      to ``tgt``.
    class_names: the K class names, index = class id.

  Returns:
    ``[P, 2]`` int32 array of ``(src_id, tgt_id)`` rows.

  Raises:
    ValueError: for no pairs, a malformed pair, an unknown class name (the message lists the
      allowed names), ``src == tgt``, or a ``src`` that appears twice.
  """
  if len(pairs) == 0:
    raise ValueError("pairs=[] is not allowed: give at least one (src, tgt) confusable pair")
  index = {name: k for k, name in enumerate(class_names)}
  rows = []
  seen_src = set()
  for pair in pairs:
    if len(pair) != 2:
      raise ValueError(f"pairs entry {pair!r} is not allowed: each pair must be (src, tgt)")
    src, tgt = pair
    for name in (src, tgt):
      if name not in index:
        raise ValueError(
          f"pairs entry {pair!r} is not allowed: class {name!r} is unknown; allowed class "
          f"names are {list(class_names)}"
        )
    if src == tgt:
      raise ValueError(f"pairs entry {pair!r} is not allowed: src and tgt must differ")
    if src in seen_src:
      raise ValueError(
        f"pairs entry {pair!r} is not allowed: src {src!r} already has a target; each src "
        "class may appear once"
      )
    seen_src.add(src)
    rows.append((index[src], index[tgt]))
  return np.asarray(rows, dtype=np.int32)


def partial_targeted_labels(
  rng: jax.Array | None,
  labels: jax.Array,
  pairs: jax.Array,
  rho: float = 1.0,
  ignore_label: int = 255,
  *,
  correct_pixels: str = "all",
) -> tuple[jax.Array, jax.Array]:
  """Gives the pixels of each ``src`` class the wrong label ``tgt`` (METHODS.md M1 step 1).

  Patent: "训练时每个所述第一训练样本中的一部分像素采用错误分类标签，另一部分像素采用正确分类
  标签" — part of the pixels take a wrong label, the rest keep the correct one. The ``rho``
  option (target a random fraction of the ``src`` pixels) is the METHODS.md option.

  ``correct_pixels='partner'`` is the dependent claim ("所述一部分像素和所述另一部分像素属于
  指定的易混淆类别"): the correctly labelled pixels are only those whose true class is a
  pair's ``tgt``; every other non-targeted pixel (including ``src`` pixels left untargeted
  when ``rho < 1``) gets ``ignore_label``, i.e. weight 0 in ``L_adv``. (Its per-sample mean
  then divides by the pair pixels only: a positive per-sample factor, so ``sign(∇)`` and hence
  the attack equal those of weight 0 under the all-pixel mean.)

  Args:
    rng: PRNG key for the Bernoulli(rho) draw per pixel; unused (may be None) when rho == 1.
    labels: ``[B, H, W]`` int true labels; ``ignore_label`` pixels are never targeted.
    pairs: ``[P, 2]`` int ``(src_id, tgt_id)`` rows with distinct ``src_id``
      (see ``resolve_confusable_pairs``).
    rho: static fraction in (0, 1] of ``src`` pixels that are targeted.
    ignore_label: static label value to leave untouched.
    correct_pixels: static, one of ``CORRECT_PIXELS`` (``'all'`` default).

  Returns:
    ``mixed_labels [B, H, W]`` (``tgt`` on targeted pixels, the true label elsewhere) and
    ``targeted_mask [B, H, W]`` bool.
  """
  _check_choice("correct_pixels", correct_pixels, CORRECT_PIXELS)
  rho = _check_unit_interval("rho", rho)
  pairs = jnp.asarray(pairs, dtype=jnp.int32)
  matches = labels[..., None] == pairs[:, 0]  # [B, H, W, P]; at most one True per pixel
  targeted = jnp.any(matches, axis=-1) & (labels != ignore_label)
  if rho < 1.0:
    targeted &= jax.random.bernoulli(rng, rho, labels.shape)
  tgt = jnp.sum(jnp.where(matches, pairs[:, 1], 0), axis=-1).astype(labels.dtype)
  kept = labels
  if correct_pixels == "partner":
    partner = jnp.any(labels[..., None] == pairs[:, 1], axis=-1)
    kept = jnp.where(partner, labels, jnp.asarray(ignore_label, labels.dtype))
  return jnp.where(targeted, tgt, kept), targeted


# --------------------------------------------------------------------------------------------
# Step 2: weighted per-pixel loss.


def _weighted_pixel_ce(
  logits: jax.Array,
  mixed_labels: jax.Array,
  targeted_mask: jax.Array,
  w_t: float,
  w_c: float,
  ignore_label: int,
) -> tuple[jax.Array, jax.Array]:
  """Returns ``w * CE`` per pixel ``[B, H, W]`` (0 on ignored pixels) and the valid mask."""
  w_t, w_c = _check_loss_weights(w_t, w_c)
  valid = mixed_labels != ignore_label
  safe_labels = jnp.where(valid, mixed_labels, 0)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe_labels)
  weights = jnp.where(targeted_mask, w_t, w_c)
  return jnp.where(valid, weights * ce, 0.0), valid


def weighted_pixel_loss(
  logits: jax.Array,
  mixed_labels: jax.Array,
  targeted_mask: jax.Array,
  w_t: float = 1.0,
  w_c: float = 1.0,
  ignore_label: int = 255,
  *,
  per_sample: bool = False,
) -> jax.Array:
  """``L_adv = w * L``, the mean over valid pixels of the batch (METHODS.md M1 step 2).

  The mean is over *pixels*, as METHODS.md fixes it: ``sum(w * CE) / #valid pixels``, not
  ``sum(w * CE) / sum(w)``; so ``w_t = 2, w_c = 2`` doubles the loss. With ``per_sample`` each
  sample's loss is the mean over its own valid pixels (the attack's gradient uses their sum,
  so every image's step is independent of the others in its batch).

  Args:
    logits: ``[B, H, W, K]``.
    mixed_labels: ``[B, H, W]`` int labels from ``partial_targeted_labels``.
    targeted_mask: ``[B, H, W]`` bool, pixels that get weight ``w_t`` (others get ``w_c``).
    w_t: static loss weight of targeted pixels, >= 0.
    w_c: static loss weight of the other pixels, >= 0.
    ignore_label: static label value excluded from the loss and the pixel count.
    per_sample: static; return one loss per sample instead of the batch mean.

  Returns:
    Scalar loss, or ``[B]`` with ``per_sample`` (0 where no pixel is valid).
  """
  pixel_loss, valid = _weighted_pixel_ce(
    logits, mixed_labels, targeted_mask, w_t, w_c, ignore_label
  )
  axes = (1, 2) if per_sample else None
  return jnp.sum(pixel_loss, axis=axes) / jnp.maximum(jnp.sum(valid, axis=axes), 1)


# --------------------------------------------------------------------------------------------
# Step 3: iterative fast-gradient rounds.


def clip_perturbation(r: jax.Array, x: jax.Array, xi: float) -> jax.Array:
  """``Clip_xi``: projects ``r`` onto the L-inf ball of radius ``xi`` with ``x + r`` in [0, 1].

  Both constraints are per-coordinate intervals that contain 0 (because ``x`` is in [0, 1]),
  so clipping to ``[max(-xi, -x), min(xi, 1 - x)]`` is the exact projection onto their
  intersection (METHODS.md M1 step 3, the patent's input-amplitude control).

  Args:
    r: ``[B, H, W, C]`` perturbation.
    x: ``[B, H, W, C]`` clean images in [0, 1] (or anything broadcastable to ``r``).
    xi: static radius in (0, 1].

  Returns:
    ``[B, H, W, C]`` clipped perturbation.
  """
  xi = _check_unit_interval("xi", xi)
  return jnp.clip(r, jnp.maximum(-xi, -x), jnp.minimum(xi, 1.0 - x))


def random_start(rng: jax.Array, x: jax.Array, eps_r: float, xi: float) -> jax.Array:
  """``r_0 = Clip_xi(eps_r * N(0, 1))`` (METHODS.md M1 step 3, optional random start).

  Patent: "所述计算过程中还使用了指定的随机扰动及其相关控制因子" (a specified random
  perturbation, standard normal, and its control factor ε).

  Args:
    rng: PRNG key.
    x: ``[B, H, W, C]`` clean images in [0, 1].
    eps_r: static control factor >= 0 (0 gives ``r_0 = 0``).
    xi: static L-inf radius in (0, 1].

  Returns:
    ``[B, H, W, C]`` initial perturbation, already clipped.
  """
  eps_r = _check_non_negative("eps_r", eps_r)
  noise = jax.random.normal(rng, x.shape, dtype=x.dtype)
  return clip_perturbation(eps_r * noise, x, xi)


def adversarial_loss_grad(
  logits_fn: LogitsFn,
  x_adv: jax.Array,
  mixed_labels: jax.Array,
  targeted_mask: jax.Array,
  w_t: float = 1.0,
  w_c: float = 1.0,
  ignore_label: int = 255,
) -> jax.Array:
  """``∇_x L_adv`` at ``x_adv`` for every sample independently (METHODS.md M1 step 3).

  The differentiated objective is the *sum* of per-sample means, so sample n's gradient is the
  gradient of its own ``L_adv`` and does not depend on the other samples (nor on how the batch
  is split across devices).

  Args:
    logits_fn: ``images [B, H, W, C] -> logits [B, H, W, K]``.
    x_adv: ``[B, H, W, C]`` perturbed images ``x + r``.
    mixed_labels: ``[B, H, W]`` int.
    targeted_mask: ``[B, H, W]`` bool.
    w_t: static loss weight of targeted pixels.
    w_c: static loss weight of the other pixels.
    ignore_label: static ignored label.

  Returns:
    ``[B, H, W, C]`` gradient.
  """

  def total_loss(images):
    return jnp.sum(
      weighted_pixel_loss(
        logits_fn(images), mixed_labels, targeted_mask, w_t, w_c, ignore_label, per_sample=True
      )
    )

  return jax.grad(total_loss)(x_adv)


def fgsm_round(
  logits_fn: LogitsFn,
  x: jax.Array,
  r: jax.Array,
  mixed_labels: jax.Array,
  targeted_mask: jax.Array,
  *,
  alpha: float,
  xi: float,
  w_t: float = 1.0,
  w_c: float = 1.0,
  ignore_label: int = 255,
  noise: jax.Array | None = None,
) -> jax.Array:
  """One round ``r_i = Clip_xi(r_{i-1} - alpha * sign(∇_x L_adv(x + r_{i-1})) [+ noise])``.

  METHODS.md M1 step 3. The step *descends* ``L_adv`` on the mixed labels, so targeted pixels
  move toward ``tgt`` while the other pixels keep their correct class. ``noise`` (optional,
  ``[B, H, W, C]``) is claim 5's in-round random term ``eps * r_random``, added before the
  clip (``round_noise``).

  Args:
    logits_fn: ``images [B, H, W, C] -> logits [B, H, W, K]``.
    x: ``[B, H, W, C]`` clean images in [0, 1].
    r: ``[B, H, W, C]`` perturbation of round i-1.
    mixed_labels: ``[B, H, W]`` int.
    targeted_mask: ``[B, H, W]`` bool.
    alpha: static step size in (0, 1].
    xi: static L-inf radius in (0, 1].
    w_t: static loss weight of targeted pixels.
    w_c: static loss weight of the other pixels.
    ignore_label: static ignored label.
    noise: optional ``[B, H, W, C]`` in-round random term (already scaled by ``eps``).

  Returns:
    ``[B, H, W, C]`` perturbation of round i.
  """
  alpha = _check_unit_interval("alpha", alpha)
  grad = adversarial_loss_grad(
    logits_fn, x + r, mixed_labels, targeted_mask, w_t, w_c, ignore_label
  )
  step = r - alpha * jnp.sign(grad)
  return clip_perturbation(step if noise is None else step + noise, x, xi)


def round_keys(rng: jax.Array, n: int) -> jax.Array:
  """``[n]`` per-sample keys of claim 5's in-round random term.

  One key per sample, drawn before any device split, so the draws do not depend on the number
  of devices.
  """
  return jax.random.split(jax.random.fold_in(rng, 2), n)


def round_noise(keys: jax.Array, i: jax.Array | int, shape: Sequence[int], dtype) -> jax.Array:
  """Claim 5's ``r_random ~ N(0, 1)`` of round ``i``: a fresh draw per round and sample.

  Args:
    keys: ``[B]`` per-sample keys (``round_keys``).
    i: the round index (may be traced).
    shape: ``[H, W, C]`` of one sample.
    dtype: float dtype.

  Returns:
    ``[B, H, W, C]`` standard normal draws; sample b's depends only on ``keys[b]`` and ``i``.
  """
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), tuple(shape), dtype))(keys)


def iterative_fgsm(
  logits_fn: LogitsFn,
  x: jax.Array,
  r0: jax.Array,
  mixed_labels: jax.Array,
  targeted_mask: jax.Array,
  *,
  rounds: int,
  alpha: float,
  xi: float,
  w_t: float = 1.0,
  w_c: float = 1.0,
  ignore_label: int = 255,
  eps_round: float = 0.0,
  keys: jax.Array | None = None,
) -> jax.Array:
  """Runs ``rounds`` fast-gradient rounds from ``r0`` with ``lax.fori_loop`` (M1 step 3).

  With ``eps_round > 0`` every round adds claim 5's random term ``eps_round * N(0, 1)`` before
  the clip, a fresh draw per round from ``round_noise(keys, i, ...)``; ``keys`` (``[B]``
  per-sample keys, ``round_keys``) is then required.

  The rounds stay one compiled loop (no Python between rounds, compile time independent of
  ``rounds``). With ``research.models.conv.Conv`` models the loop runs as fast as the same
  rounds unrolled: XLA:CPU used to run the input-gradient convolutions inside a loop on a slow
  path (issue 18), which ``conv.py`` avoids at the convolution itself.

  Args:
    logits_fn: ``images [B, H, W, C] -> logits [B, H, W, K]``.
    x: ``[B, H, W, C]`` clean images in [0, 1].
    r0: ``[B, H, W, C]`` initial perturbation (zeros or ``random_start``).
    mixed_labels: ``[B, H, W]`` int.
    targeted_mask: ``[B, H, W]`` bool.
    rounds: static number of rounds >= 1.
    alpha: static step size in (0, 1].
    xi: static L-inf radius in (0, 1].
    w_t: static loss weight of targeted pixels.
    w_c: static loss weight of the other pixels.
    ignore_label: static ignored label.
    eps_round: static control factor >= 0 of the in-round random term (0: none).
    keys: ``[B]`` per-sample keys (``round_keys``); needed when ``eps_round > 0``.

  Returns:
    ``[B, H, W, C]`` perturbation ``r_rounds``.
  """
  rounds = _check_rounds(rounds)
  one_round = functools.partial(
    fgsm_round,
    logits_fn,
    x,
    mixed_labels=mixed_labels,
    targeted_mask=targeted_mask,
    alpha=alpha,
    xi=xi,
    w_t=w_t,
    w_c=w_c,
    ignore_label=ignore_label,
  )
  eps_round = _check_non_negative("eps_round", eps_round)
  if eps_round == 0.0:
    return lax.fori_loop(0, rounds, lambda _, r: one_round(r), r0)
  if keys is None:
    raise ValueError(f"eps_round={eps_round} needs keys: pass round_keys(rng, batch_size)")

  def noisy_round(i, r):
    return one_round(r, noise=eps_round * round_noise(keys, i, x.shape[1:], x.dtype))

  return lax.fori_loop(0, rounds, noisy_round, r0)


def targeted_success(
  logits: jax.Array, mixed_labels: jax.Array, targeted_mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Fraction of targeted pixels predicted as their ``tgt`` (METHODS.md M1 "Measure").

  On targeted pixels ``mixed_labels`` holds ``tgt``, so a hit is ``argmax(logits) == tgt``.

  Args:
    logits: ``[B, H, W, K]``.
    mixed_labels: ``[B, H, W]`` int from ``partial_targeted_labels``.
    targeted_mask: ``[B, H, W]`` bool.

  Returns:
    ``(rate, per_sample)``: the scalar fraction over all targeted pixels of the batch, and the
    ``[B]`` fraction per sample. A sample (or batch) without targeted pixels has rate 0.
  """
  hits = (jnp.argmax(logits, axis=-1) == mixed_labels) & targeted_mask
  per_sample = jnp.sum(hits, axis=(1, 2)) / jnp.maximum(jnp.sum(targeted_mask, axis=(1, 2)), 1)
  rate = jnp.sum(hits) / jnp.maximum(jnp.sum(targeted_mask), 1)
  return rate, per_sample


def prepare_attack(
  rng: jax.Array, x: jax.Array, labels: jax.Array, pairs: jax.Array, config: AttackConfig
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Draws the random parts of steps 1 and 3: targeted labels and the random start.

  Args:
    rng: PRNG key (split into a label key and a start key).
    x: ``[N, H, W, C]`` clean images in [0, 1].
    labels: ``[N, H, W]`` int true labels.
    pairs: ``[P, 2]`` int confusable pairs.
    config: static attack settings.

  Returns:
    ``r0 [N, H, W, C]``, ``mixed_labels [N, H, W]``, ``targeted_mask [N, H, W]``.
  """
  label_key, start_key = jax.random.split(rng)
  mixed_labels, targeted_mask = partial_targeted_labels(
    label_key,
    labels,
    pairs,
    config.rho,
    config.ignore_label,
    correct_pixels=config.correct_pixels,
  )
  r0 = random_start(start_key, x, config.eps_r, config.xi)
  return r0, mixed_labels, targeted_mask


# --------------------------------------------------------------------------------------------
# Step 4: per-dataset universal perturbation, accumulated across devices.


def _global_sum(values: jax.Array, axis_name: str | None) -> jax.Array:
  total = jnp.sum(values)
  return total if axis_name is None else lax.psum(total, axis_name)


def sample_weights(
  success: jax.Array,
  mode: str = "uniform",
  valid: jax.Array | None = None,
  axis_name: str | None = None,
) -> jax.Array:
  """Weights ``w_n`` of ``r_D = sum_n w_n r_n`` (METHODS.md M1 step 4), summing to 1.

  Patent: "wn表示所述多个第一训练样本中的至少部分样本中第n个样本的扰动权重" (the weight of
  sample n); the two modes are the METHODS.md interpretation.

  * ``uniform`` (default): ``1 / N_valid`` for every valid sample.
  * ``success``: proportional to the sample's targeted success rate; zero-success samples get
    weight 0. If *every* valid sample has zero success, the weights fall back to uniform (so
    ``r_D`` is still the mean perturbation rather than zero).

  Invalid (padding) samples always get weight 0; with no valid sample all weights are 0.

  Args:
    success: ``[N]`` per-sample targeted success rates in [0, 1].
    mode: static, one of ``WEIGHT_MODES``.
    valid: optional ``[N]`` bool; False marks padding samples.
    axis_name: inside ``shard_map``/``pmap``, the device axis over which ``N`` is split; the
      normalisation then uses totals over all devices (``lax.psum``).

  Returns:
    ``[N]`` float32 weights.
  """
  _check_choice("mode", mode, WEIGHT_MODES)
  valid = jnp.ones(success.shape, bool) if valid is None else valid
  counts = valid.astype(jnp.float32)
  count_total = _global_sum(counts, axis_name)
  if mode == "success":
    scores = jnp.where(valid, success.astype(jnp.float32), 0.0)
    score_total = _global_sum(scores, axis_name)
    fallback = score_total <= 0.0
    scores = jnp.where(fallback, counts, scores)
    total = jnp.where(fallback, count_total, score_total)
  else:
    scores, total = counts, count_total
  return jnp.where(total > 0.0, scores / jnp.where(total > 0.0, total, 1.0), 0.0)


def dataset_perturbation(r: jax.Array, weights: jax.Array) -> jax.Array:
  """``r_D = sum_n w_n r_n`` (METHODS.md M1 step 4, patent claim 6).

  Args:
    r: ``[N, H, W, C]`` final per-sample perturbations.
    weights: ``[N]`` sample weights.

  Returns:
    ``[H, W, C]`` weighted sum.
  """
  return jnp.einsum("n,n...->...", weights.astype(r.dtype), r)


def accumulate_perturbation(r_local: jax.Array, w_local: jax.Array, axis_name: str) -> jax.Array:
  """Per-device part of step 4: ``psum`` over devices of the local weighted sum.

  Runs unchanged inside ``jax.shard_map`` and ``jax.pmap`` (METHODS.md M1: "accumulated across
  devices with named-axis collectives").

  Args:
    r_local: ``[n_local, H, W, C]`` this device's perturbations.
    w_local: ``[n_local]`` their (globally normalised) weights.
    axis_name: the device axis name.

  Returns:
    ``[H, W, C]`` ``r_D``, identical on every device.
  """
  return lax.psum(dataset_perturbation(r_local, w_local), axis_name)


def device_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with axis ``AXIS_NAME`` over ``devices`` (default: all devices)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (AXIS_NAME,))


def _mesh_axis(mesh: Mesh) -> str:
  if len(mesh.axis_names) != 1:
    raise ValueError(
      f"mesh.axis_names={mesh.axis_names} is not allowed: the mesh must be 1-D (see device_mesh)"
    )
  return mesh.axis_names[0]


def _pad_samples(array: jax.Array, multiple: int, value: Any = 0) -> jax.Array:
  """Pads the leading (sample) axis with ``value`` up to a multiple of ``multiple``."""
  pad = -array.shape[0] % multiple
  widths = [(0, pad)] + [(0, 0)] * (array.ndim - 1)
  return jnp.pad(array, widths, constant_values=value)


@functools.partial(jax.jit, static_argnames="mesh")
def accumulate_with_shard_map(
  r: jax.Array, weights: jax.Array, mesh: Mesh | None = None
) -> jax.Array:
  """``r_D = sum_n w_n r_n`` with the samples split over a 1-D mesh (``jax.shard_map``).

  If N is not divisible by the number of devices, the samples are padded with zero
  perturbations of weight 0, which adds nothing to the sum.

  Args:
    r: ``[N, H, W, C]`` per-sample perturbations.
    weights: ``[N]`` sample weights.
    mesh: static 1-D mesh (default: ``device_mesh()`` over all devices).

  Returns:
    ``[H, W, C]`` ``r_D``.
  """
  mesh = device_mesh() if mesh is None else mesh
  axis = _mesh_axis(mesh)
  n_dev = mesh.devices.size
  accumulate = jax.shard_map(
    functools.partial(accumulate_perturbation, axis_name=axis),
    mesh=mesh,
    in_specs=(P(axis), P(axis)),
    out_specs=P(),
  )
  return accumulate(_pad_samples(r, n_dev), _pad_samples(weights, n_dev))


_pmapped_accumulate = jax.pmap(
  functools.partial(accumulate_perturbation, axis_name=AXIS_NAME), axis_name=AXIS_NAME
)


def accumulate_with_pmap(
  r: jax.Array, weights: jax.Array, num_devices: int | None = None
) -> jax.Array:
  """``r_D = sum_n w_n r_n`` with ``jax.pmap`` over ``[n_dev, n_local, ...]`` shards.

  N is padded to a multiple of ``num_devices`` with zero perturbations of weight 0.

  Args:
    r: ``[N, H, W, C]`` per-sample perturbations.
    weights: ``[N]`` sample weights.
    num_devices: number of local devices to use (default: all local devices).

  Returns:
    ``[H, W, C]`` ``r_D``.
  """
  n_dev = jax.local_device_count() if num_devices is None else num_devices
  if not 1 <= n_dev <= jax.local_device_count():
    raise ValueError(
      f"num_devices={n_dev} is not allowed: must be in [1, {jax.local_device_count()}]"
    )
  r = _pad_samples(jnp.asarray(r), n_dev)
  weights = _pad_samples(jnp.asarray(weights), n_dev)
  r_shards = r.reshape(n_dev, -1, *r.shape[1:])
  w_shards = weights.reshape(n_dev, -1)
  return _pmapped_accumulate(r_shards, w_shards)[0]


class DatasetPerturbation(NamedTuple):
  """Result of step 4 for one dataset.

  Attributes:
    r_d: ``[H, W, C]`` per-dataset universal perturbation.
    success: ``[N]`` targeted success rate of each sample under its own final ``r_n``.
    weights: ``[N]`` weights ``w_n`` used in ``r_D``.
  """

  r_d: jax.Array
  success: jax.Array
  weights: jax.Array


@functools.partial(jax.jit, static_argnames=("apply_fn", "config", "mesh", "weight_mode"))
def universal_perturbation_sharded(
  apply_fn: ApplyFn,
  params: Any,
  rng: jax.Array,
  x: jax.Array,
  labels: jax.Array,
  pairs: jax.Array,
  *,
  config: AttackConfig,
  mesh: Mesh,
  weight_mode: str = "uniform",
) -> DatasetPerturbation:
  """Steps 1-4 for one dataset: data-parallel rounds, then ``psum`` of the weighted sum.

  The random draws (targeted labels, random start) are made for all N samples before the
  split, so the result does not depend on the number of devices. Each device runs the rounds
  on its samples (per-sample gradients need no communication), measures their success, and
  computes globally normalised weights and ``r_D`` with ``lax.psum`` over the mesh axis. N not
  divisible by the device count is padded with zero images whose labels are all
  ``ignore_label`` and whose weight is 0.

  Args:
    apply_fn: static ``apply_fn(params, images [B, H, W, C]) -> logits [B, H, W, K]``.
    params: model parameters (replicated on every device).
    rng: PRNG key.
    x: ``[N, H, W, C]`` images of one dataset, in [0, 1].
    labels: ``[N, H, W]`` int true labels.
    pairs: ``[P, 2]`` int confusable pairs.
    config: static ``AttackConfig``.
    mesh: static 1-D mesh (``device_mesh()``).
    weight_mode: static, one of ``WEIGHT_MODES``.

  Returns:
    ``DatasetPerturbation(r_d [H, W, C], success [N], weights [N])``.
  """
  _check_choice("weight_mode", weight_mode, WEIGHT_MODES)
  axis = _mesh_axis(mesh)
  n_dev = mesh.devices.size
  n = x.shape[0]
  per_device = functools.partial(
    attack_device_body, apply_fn=apply_fn, config=config, weight_mode=weight_mode, axis_name=axis
  )
  sharded = jax.shard_map(
    per_device,
    mesh=mesh,
    in_specs=(P(),) + (P(axis),) * 6,
    out_specs=(P(), P(axis), P(axis)),
  )
  inputs = _padded_attack_inputs(rng, x, labels, pairs, config, n_dev)
  r_d, success, weights = sharded(params, *inputs)
  return DatasetPerturbation(r_d, success[:n], weights[:n])


def _padded_attack_inputs(rng, x, labels, pairs, config: AttackConfig, n_dev: int) -> tuple:
  """The per-sample inputs of ``attack_device_body``, drawn for all N, padded to ``n_dev``."""
  n = x.shape[0]
  r0, mixed_labels, targeted_mask = prepare_attack(rng, x, labels, pairs, config)
  keys = jax.random.key_data(round_keys(rng, n))
  return (
    _pad_samples(x, n_dev),
    _pad_samples(r0, n_dev),
    _pad_samples(mixed_labels, n_dev, config.ignore_label),
    _pad_samples(targeted_mask, n_dev, False),
    _pad_samples(jnp.ones(n, bool), n_dev, False),
    _pad_samples(keys, n_dev),
  )


def attack_device_body(
  params: Any,
  x: jax.Array,
  r0: jax.Array,
  mixed_labels: jax.Array,
  targeted_mask: jax.Array,
  valid: jax.Array,
  key_data: jax.Array,
  *,
  apply_fn: ApplyFn,
  config: AttackConfig,
  weight_mode: str,
  axis_name: str,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The per-device body of steps 3-4: rounds, success, global weights, ``psum`` of ``r_D``.

  Runs unchanged under ``jax.shard_map`` (``universal_perturbation_sharded``) and ``jax.pmap``
  (``universal_perturbation_pmap``); ``axis_name`` is the device axis of either.

  Args:
    params: model parameters (replicated).
    x: ``[n, H, W, C]`` this device's images in [0, 1].
    r0: ``[n, H, W, C]`` their initial perturbations.
    mixed_labels: ``[n, H, W]`` int.
    targeted_mask: ``[n, H, W]`` bool.
    valid: ``[n]`` bool, False on padding samples (weight 0).
    key_data: ``[n, ...]`` uint32 ``jax.random.key_data`` of the per-sample ``round_keys``.
    apply_fn: static ``apply_fn(params, images) -> logits``.
    config: static ``AttackConfig`` (``eps_round`` > 0 adds claim 5's in-round term).
    weight_mode: static, one of ``WEIGHT_MODES``.
    axis_name: the device axis.

  Returns:
    ``(r_D [H, W, C] (the same on every device), success [n], weights [n])``.
  """
  logits_fn = functools.partial(apply_fn, params)
  r = iterative_fgsm(
    logits_fn,
    x,
    r0,
    mixed_labels,
    targeted_mask,
    rounds=config.rounds,
    alpha=config.alpha,
    xi=config.xi,
    w_t=config.w_t,
    w_c=config.w_c,
    ignore_label=config.ignore_label,
    eps_round=config.eps_round,
    keys=jax.random.wrap_key_data(key_data),
  )
  _, success = targeted_success(logits_fn(x + r), mixed_labels, targeted_mask)
  weights = sample_weights(success, weight_mode, valid, axis_name=axis_name)
  return accumulate_perturbation(r, weights, axis_name), success, weights


@functools.lru_cache(maxsize=16)
def _pmapped_attack(apply_fn: ApplyFn, config: AttackConfig, weight_mode: str) -> Callable:
  body = functools.partial(
    attack_device_body,
    apply_fn=apply_fn,
    config=config,
    weight_mode=weight_mode,
    axis_name=AXIS_NAME,
  )
  return jax.pmap(body, axis_name=AXIS_NAME, in_axes=(None,) + (0,) * 6)


def universal_perturbation_pmap(
  apply_fn: ApplyFn,
  params: Any,
  rng: jax.Array,
  x: jax.Array,
  labels: jax.Array,
  pairs: jax.Array,
  *,
  config: AttackConfig,
  weight_mode: str = "uniform",
  num_devices: int | None = None,
) -> DatasetPerturbation:
  """``universal_perturbation_sharded`` with ``jax.pmap`` over ``[n_dev, n_local, ...]`` shards.

  The same draws, padding and per-device body (``attack_device_body``); the result equals the
  ``shard_map`` driver's. One compiled function per ``(apply_fn, config, weight_mode)``, so
  ``apply_fn`` must be hashable (reuse one per model).

  The arguments are those of ``universal_perturbation_sharded``, with ``num_devices`` (the local
  devices to use, default all) in place of its ``mesh``.

  Returns:
    ``DatasetPerturbation(r_d [H, W, C], success [N], weights [N])``.
  """
  _check_choice("weight_mode", weight_mode, WEIGHT_MODES)
  n_dev = jax.local_device_count() if num_devices is None else num_devices
  if not 1 <= n_dev <= jax.local_device_count():
    raise ValueError(
      f"num_devices={n_dev} is not allowed: must be in [1, {jax.local_device_count()}]"
    )
  n = x.shape[0]
  inputs = _padded_attack_inputs(rng, jnp.asarray(x), jnp.asarray(labels), pairs, config, n_dev)
  shards = [a.reshape(n_dev, -1, *a.shape[1:]) for a in inputs]
  fn = _pmapped_attack(apply_fn, config, weight_mode)
  r_d, success, weights = fn(params, *shards)
  return DatasetPerturbation(r_d[0], success.reshape(-1)[:n], weights.reshape(-1)[:n])


# --------------------------------------------------------------------------------------------
# Steps 5-7: unified perturbation, second samples, training batches.


def unified_perturbation(
  rng: jax.Array,
  r_ds: jax.Array,
  *,
  xi: float,
  gamma: float | None = None,
  eps_r: float = 0.0,
  norm: str = "linf",
) -> jax.Array:
  """``R = Clip_xi(gamma * (1/M) sum_j r_D^j / ||r_D^j|| + eps_r * N(0, 1))`` (M1 step 5).

  Patent claim 3: "对获取的各所述通用扰动进行归一化处理；根据归一化处理的结果、指定的随机扰动
  和扰动幅度限制因子，确定统一的通用扰动" (normalise each dataset's perturbation, then combine
  with a random perturbation and the amplitude-limiting factor γ).

  ``Clip_xi`` here is the L-inf ball of radius ``xi`` only; the [0, 1] image range is enforced
  when ``R`` is applied (``second_samples``). A zero ``r_D^j`` contributes zero (no NaN). With
  ``norm='l2'`` each normalised term has unit L2 norm over all ``H*W*C`` entries, so per-pixel
  values are small; pass e.g. ``gamma = xi * sqrt(H*W*C)`` for a comparable amplitude.

  Args:
    rng: PRNG key of the random term, drawn as ``jax.random.normal(rng, [H, W, C])``.
    r_ds: ``[M, H, W, C]`` per-dataset perturbations, M >= 1.
    xi: static L-inf radius in (0, 1].
    gamma: static amplitude-limiting factor > 0 (default ``xi``).
    eps_r: static factor of the random term, >= 0.
    norm: static normalisation, one of ``NORMS`` (``'linf'`` default, ``'l2'`` option).

  Returns:
    ``[H, W, C]`` unified perturbation ``R``.
  """
  xi = _check_unit_interval("xi", xi)
  gamma = xi if gamma is None else _static_float("gamma", gamma)
  if not gamma > 0.0:
    raise ValueError(f"gamma={gamma} is not allowed: gamma must be > 0")
  eps_r = _check_non_negative("eps_r", eps_r)
  _check_choice("norm", norm, NORMS)
  if r_ds.ndim != 4 or r_ds.shape[0] == 0:
    raise ValueError(
      f"r_ds.shape={tuple(r_ds.shape)} is not allowed: r_ds must be [M, H, W, C] with M >= 1"
    )
  flat = r_ds.reshape(r_ds.shape[0], -1)
  if norm == "linf":
    norms = jnp.max(jnp.abs(flat), axis=1)
  else:
    norms = jnp.sqrt(jnp.sum(jnp.square(flat), axis=1))
  positive = norms > 0.0
  scale = jnp.where(positive, 1.0 / jnp.where(positive, norms, 1.0), 0.0)
  mean_direction = jnp.mean(r_ds * scale[:, None, None, None], axis=0)
  noise = jax.random.normal(rng, r_ds.shape[1:], dtype=r_ds.dtype)
  return jnp.clip(gamma * mean_direction + eps_r * noise, -xi, xi)


def second_samples(x: jax.Array, perturbation: jax.Array) -> jax.Array:
  """``x' = clip(x + R, 0, 1)`` (METHODS.md M1 step 6); labels stay the true labels.

  Args:
    x: ``[B, H, W, C]`` images in [0, 1] from any of the M datasets.
    perturbation: ``[H, W, C]`` unified perturbation ``R`` (broadcast over the batch).

  Returns:
    ``[B, H, W, C]`` second training samples.
  """
  return jnp.clip(x + perturbation, 0.0, 1.0)


def mix_batches(
  x_clean: jax.Array,
  y_clean: jax.Array,
  x_adv: jax.Array,
  y_adv: jax.Array,
  ratio: float = 0.5,
) -> tuple[jax.Array, jax.Array]:
  """Adversarial-training batch of clean and second samples (METHODS.md M1 step 7).

  The output keeps the batch size B: its first ``B - n_adv`` entries are
  ``x_clean[:B - n_adv]`` and its last ``n_adv = round(ratio * B)`` entries are
  ``x_adv[B - n_adv:]``. When ``x_adv = second_samples(x_clean, R)`` every image thus appears
  once, clean or perturbed. The default ratio 0.5 is the 1:1 mix within each batch.

  Args:
    x_clean: ``[B, H, W, C]`` original samples.
    y_clean: ``[B, ...]`` their labels.
    x_adv: ``[B, H, W, C]`` second samples.
    y_adv: ``[B, ...]`` their (true) labels.
    ratio: static fraction in [0, 1] of the batch taken from the second samples.

  Returns:
    ``(x [B, H, W, C], y [B, ...])``.
  """
  ratio = _static_float("ratio", ratio)
  if not 0.0 <= ratio <= 1.0:
    raise ValueError(f"ratio={ratio} is not allowed: ratio must be in [0, 1]")
  if x_clean.shape != x_adv.shape or y_clean.shape != y_adv.shape:
    raise ValueError(
      f"x_adv.shape={x_adv.shape}, y_adv.shape={y_adv.shape} are not allowed: they must "
      f"equal x_clean.shape={x_clean.shape}, y_clean.shape={y_clean.shape}"
    )
  n_clean = x_clean.shape[0] - int(round(ratio * x_clean.shape[0]))
  x = jnp.concatenate([x_clean[:n_clean], x_adv[n_clean:]], axis=0)
  y = jnp.concatenate([y_clean[:n_clean], y_adv[n_clean:]], axis=0)
  return x, y


def mixed_adversarial_batch(batch: dict, perturbation: jax.Array, ratio: float = 0.5) -> dict:
  """The step-7 training batch: clean images mixed with their second samples ``clip(x + R)``.

  METHODS.md M1 steps 6-7: the last ``round(ratio * B)`` images of the batch are replaced by
  ``clip(x + R, 0, 1)``; every label stays the true label.

  Args:
    batch: ``{"image": [B, H, W, C] uint8 or float in [0, 1], "semantic": [B, H, W], ...}``.
    perturbation: ``[H, W, C]`` unified perturbation ``R``.
    ratio: static fraction in [0, 1] of second samples (0.5 is the 1:1 default).

  Returns:
    The batch with ``image`` as float32 ``[B, H, W, C]`` (other entries unchanged).
  """
  x = batch["image"]
  x = x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
  y = batch["semantic"]
  images, _ = mix_batches(x, y, second_samples(x, perturbation), y, ratio)
  return {**batch, "image": images}


def adversarial_training_loss(
  params: Any,
  batch: dict,
  rng: jax.Array,
  *,
  loss_fn: Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]],
  perturbation: jax.Array,
  ratio: float = 0.5,
) -> tuple[jax.Array, dict]:
  """Adversarial-training loss: ``loss_fn`` on the mixed clean + second-sample batch (step 7).

  Args:
    params: model parameters.
    batch: ``{"image": [B, H, W, C], "semantic": [B, H, W]}``.
    rng: PRNG key passed on to ``loss_fn``.
    loss_fn: the segmentation loss ``loss_fn(params, batch, rng) -> (loss, metrics)``.
    perturbation: ``[H, W, C]`` unified perturbation ``R``.
    ratio: static fraction of second samples per batch.

  Returns:
    ``(loss, metrics)`` of ``loss_fn`` on the mixed batch.
  """
  return loss_fn(params, mixed_adversarial_batch(batch, perturbation, ratio), rng)
