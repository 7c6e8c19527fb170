"""Procedural street scenes: semantic, panoptic and detection labels in several visual domains.

A seeded generator of small road scenes (numpy only). Each scene has stuff classes (road,
sidewalk, building, sky, vegetation) and thing instances (car, truck, person, bicycle) drawn
far-to-near so that near objects occlude far ones, scaled by a simple perspective. Road and
sidewalk share a grey palette that differs only slightly in tone and texture, and trucks are
taller, longer cars of the same colours: the two deliberately confusable pairs that the
universal-perturbation method (M1) targets.

A *domain* changes palette, light, fog, noise and texture (day, dusk, fog, night, rain), so
that "several image datasets" and a held-out domain exist.

Labels (one image of size S):
  image:     [S, S, 3] uint8.
  semantic:  [S, S] uint8 class index, `IGNORE_LABEL` (255) never occurs in generated data.
  panoptic:  [S, S] int32 segment id = (class + 1) * 1000 + instance (0 for stuff), the
             Cityscapes-style encoding; 0 would be void. `panoptic_category` decodes it.
  boxes:     [MAX_BOXES, 4] float32 (x0, y0, x1, y1) in pixels of the visible part,
             box_classes [MAX_BOXES] int32 (class index), box_valid [MAX_BOXES] bool.
"""

from __future__ import annotations

import dataclasses

import numpy as np

CLASS_NAMES = (
  "road",
  "sidewalk",
  "building",
  "sky",
  "vegetation",
  "car",
  "truck",
  "person",
  "bicycle",
)
STUFF_CLASSES = (0, 1, 2, 3, 4)
THING_CLASSES = (5, 6, 7, 8)
NUM_CLASSES = len(CLASS_NAMES)
IGNORE_LABEL = 255
MAX_BOXES = 16
PANOPTIC_DIVISOR = 1000
MIN_VISIBLE_PIXELS = 4
DOMAINS = ("day", "dusk", "fog", "night", "rain")

# Base colours (RGB in [0, 1]); road and sidewalk are close on purpose.
_BASE_COLOURS = {
  "road": (0.42, 0.42, 0.44),
  "sidewalk": (0.50, 0.49, 0.48),
  "building": (0.60, 0.45, 0.38),
  "sky": (0.45, 0.65, 0.92),
  "vegetation": (0.22, 0.50, 0.20),
  "person": (0.80, 0.55, 0.45),
  "bicycle": (0.15, 0.15, 0.18),
}
_VEHICLE_COLOURS = np.array(
  [
    (0.75, 0.10, 0.10),
    (0.10, 0.25, 0.70),
    (0.85, 0.85, 0.85),
    (0.12, 0.12, 0.12),
    (0.85, 0.70, 0.15),
    (0.30, 0.55, 0.35),
  ],
  np.float32,
)


@dataclasses.dataclass(frozen=True)
class Domain:
  """Appearance of one visual domain.

  Attributes:
    tint: RGB multiplier applied to the whole scene.
    brightness: global multiplier after tinting.
    contrast: contrast around the image mean (1 keeps it).
    fog: blend weight towards `fog_colour` at the horizon (falls off towards the bottom).
    fog_colour: RGB colour of the fog.
    noise: standard deviation of additive Gaussian pixel noise.
    texture: amplitude of the per-class texture.
    streaks: density of rain streaks (0 for none).
  """

  tint: tuple[float, float, float]
  brightness: float
  contrast: float
  fog: float
  fog_colour: tuple[float, float, float]
  noise: float
  texture: float
  streaks: float = 0.0


DOMAIN_STYLES = {
  "day": Domain((1.0, 1.0, 1.0), 1.0, 1.0, 0.0, (0.8, 0.8, 0.8), 0.02, 0.06),
  "dusk": Domain((1.15, 0.85, 0.65), 0.8, 0.9, 0.1, (0.9, 0.6, 0.4), 0.03, 0.05),
  "fog": Domain((0.95, 0.97, 1.0), 0.95, 0.6, 0.55, (0.78, 0.80, 0.82), 0.02, 0.04),
  "night": Domain((0.7, 0.8, 1.2), 0.35, 1.1, 0.0, (0.1, 0.1, 0.2), 0.06, 0.05),
  "rain": Domain((0.85, 0.9, 1.0), 0.75, 0.8, 0.2, (0.6, 0.65, 0.7), 0.04, 0.07, 0.03),
}


def panoptic_category(panoptic: np.ndarray) -> np.ndarray:
  """Class index of each panoptic segment id (-1 for void).

  Args:
    panoptic: int array of segment ids in the `(class + 1) * 1000 + instance` encoding.

  Returns:
    int array of the same shape with the class index, -1 where the id is 0 (void).
  """
  return panoptic // PANOPTIC_DIVISOR - 1


def _texture(rng: np.random.Generator, size: int, scale: int) -> np.ndarray:
  """Smooth noise texture [size, size] in [-1, 1] made by upsampling coarse noise."""
  coarse = rng.uniform(-1.0, 1.0, (size // scale + 2, size // scale + 2))
  fine = np.kron(coarse, np.ones((scale, scale)))[:size, :size]
  return fine


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  ys, xs = np.mgrid[0:size, 0:size]
  return ys.astype(np.float32), xs.astype(np.float32)


class _Canvas:
  """Mutable scene being painted: colour, semantic labels and instance ids."""

  def __init__(self, size: int):
    self.size = size
    self.rgb = np.zeros((size, size, 3), np.float32)
    self.semantic = np.zeros((size, size), np.uint8)
    self.instance = np.zeros((size, size), np.int32)
    self.ys, self.xs = _grid(size)

  def paint(self, mask: np.ndarray, colour: np.ndarray, cls: int, instance: int = 0) -> None:
    self.rgb[mask] = colour if colour.ndim == 1 else colour[mask]
    self.semantic[mask] = cls
    self.instance[mask] = instance


def _paint_background(canvas: _Canvas, rng: np.random.Generator, texture: float) -> dict:
  """Sky, buildings, vegetation, road and sidewalks; returns the scene geometry."""
  s = canvas.size
  ys, xs = canvas.ys, canvas.xs
  horizon = int(s * rng.uniform(0.35, 0.5))
  # Sky: vertical gradient.
  sky = np.array(_BASE_COLOURS["sky"], np.float32)
  grad = (1.0 - 0.3 * ys / s)[..., None]
  canvas.paint(ys < horizon, np.clip(sky * grad, 0, 1), CLASS_NAMES.index("sky"))
  # Buildings: a row of blocks with windows standing on the horizon.
  x = -rng.integers(0, s // 4)
  while x < s:
    width = int(rng.integers(s // 8, s // 3))
    height = int(rng.integers(s // 8, horizon))
    block = (xs >= x) & (xs < x + width) & (ys >= horizon - height) & (ys < horizon + 2)
    shade = rng.uniform(0.75, 1.15)
    colour = np.clip(np.array(_BASE_COLOURS["building"]) * shade, 0, 1).astype(np.float32)
    windows = ((xs.astype(int) % 4 == 1) & (ys.astype(int) % 5 == 2)).astype(np.float32)
    col = colour * (1.0 - 0.35 * windows[..., None])
    canvas.paint(block, col, CLASS_NAMES.index("building"))
    x += width + int(rng.integers(0, s // 10))
  # Vegetation: a few tree crowns in front of the buildings.
  tex = _texture(rng, s, 2)
  for _ in range(int(rng.integers(1, 4))):
    cx, cy = rng.uniform(0, s), horizon - rng.uniform(0, s * 0.15)
    rx, ry = rng.uniform(s * 0.06, s * 0.16), rng.uniform(s * 0.08, s * 0.2)
    crown = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 < 1.0
    colour = np.array(_BASE_COLOURS["vegetation"], np.float32) * (1 + 2 * texture * tex)[..., None]
    canvas.paint(crown, np.clip(colour, 0, 1), CLASS_NAMES.index("vegetation"))
  # Ground: road as a perspective trapezoid, sidewalks on both sides.
  centre = s * rng.uniform(0.35, 0.65)
  half_far = s * rng.uniform(0.03, 0.08)
  half_near = s * rng.uniform(0.3, 0.5)
  depth = np.clip((ys - horizon) / max(s - horizon, 1), 0.0, 1.0)
  half = half_far + (half_near - half_far) * depth
  ground = ys >= horizon
  road = ground & (np.abs(xs - centre) <= half)
  walk_width = s * rng.uniform(0.05, 0.2) * (0.3 + depth)
  sidewalk = ground & ~road & (np.abs(xs - centre) <= half + walk_width)
  fine = _texture(rng, s, 1)
  road_col = np.array(_BASE_COLOURS["road"], np.float32) * (1 + texture * fine)[..., None]
  lane = (np.abs(xs - centre) < 0.5 + depth) & ((ys.astype(int) // 3) % 2 == 0)
  road_col = np.where(lane[..., None], 0.85, road_col)
  tiles = ((xs.astype(int) % 4 == 0) | (ys.astype(int) % 4 == 0)).astype(np.float32)
  walk_col = (
    np.array(_BASE_COLOURS["sidewalk"], np.float32) * (1 + texture * fine - 0.05 * tiles)[..., None]
  )
  canvas.paint(road, np.clip(road_col, 0, 1), CLASS_NAMES.index("road"))
  canvas.paint(sidewalk, np.clip(walk_col, 0, 1), CLASS_NAMES.index("sidewalk"))
  # Beyond the sidewalks: vegetation verges.
  verge = ground & ~road & ~sidewalk
  verge_col = np.array(_BASE_COLOURS["vegetation"], np.float32) * (1 + texture * fine)[..., None]
  canvas.paint(verge, np.clip(verge_col, 0, 1), CLASS_NAMES.index("vegetation"))
  return {"horizon": horizon, "centre": centre, "half_far": half_far, "half_near": half_near}


def _vehicle_mask(canvas: _Canvas, x: float, y: float, w: float, h: float, truck: bool):
  """Silhouette of a car (body + narrower cabin) or truck (tall box + low cab) at bottom y."""
  xs, ys = canvas.xs, canvas.ys
  if truck:
    cargo = (xs >= x) & (xs < x + 0.7 * w) & (ys >= y - h) & (ys < y)
    cab = (xs >= x + 0.7 * w) & (xs < x + w) & (ys >= y - 0.6 * h) & (ys < y)
    return cargo | cab
  body = (xs >= x) & (xs < x + w) & (ys >= y - 0.55 * h) & (ys < y)
  cabin = (xs >= x + 0.2 * w) & (xs < x + 0.8 * w) & (ys >= y - h) & (ys < y - 0.5 * h)
  return body | cabin


def _person_mask(canvas: _Canvas, x: float, y: float, h: float):
  xs, ys = canvas.xs, canvas.ys
  w = max(h * 0.3, 1.0)
  body = (np.abs(xs - x) <= w / 2) & (ys >= y - 0.8 * h) & (ys < y)
  head = (xs - x) ** 2 + (ys - (y - 0.88 * h)) ** 2 <= (0.13 * h + 0.5) ** 2
  return body | head


def _bicycle_mask(canvas: _Canvas, x: float, y: float, h: float):
  xs, ys = canvas.xs, canvas.ys
  r = max(0.3 * h, 1.0)
  wheel1 = np.abs(np.hypot(xs - (x - r), ys - (y - r)) - r) <= 0.6
  wheel2 = np.abs(np.hypot(xs - (x + r), ys - (y - r)) - r) <= 0.6
  frame = (np.abs(ys - (y - 1.4 * r)) <= 0.6) & (np.abs(xs - x) <= r)
  return wheel1 | wheel2 | frame


def _paint_things(canvas: _Canvas, rng: np.random.Generator, geometry: dict, max_things: int):
  """Places vehicles on the road and people/bicycles on the sidewalk, far to near."""
  s = canvas.size
  horizon = geometry["horizon"]
  n = int(rng.integers(2, max_things + 1))
  things = []
  for _ in range(n):
    depth = rng.uniform(0.1, 1.0)
    y = horizon + depth * (s - horizon)
    scale = 0.25 + 0.9 * depth
    cls = rng.choice(THING_CLASSES, p=(0.4, 0.25, 0.2, 0.15))
    things.append((y, int(cls), scale))
  things.sort(key=lambda t: t[0])  # far (small y) first, so near things occlude them.
  half = geometry["half_far"] + (geometry["half_near"] - geometry["half_far"]) * (
    np.array([t[0] for t in things]) - horizon
  ) / max(s - horizon, 1)
  for inst, ((y, cls, scale), road_half) in enumerate(zip(things, half), start=1):
    name = CLASS_NAMES[cls]
    if name in ("car", "truck"):
      truck = name == "truck"
      w = s * scale * (0.32 if truck else 0.26)
      h = s * scale * (0.24 if truck else 0.15)
      x = geometry["centre"] + rng.uniform(-road_half, road_half - w / 2) - w / 2
      mask = _vehicle_mask(canvas, x, y, w, h, truck)
      colour = _VEHICLE_COLOURS[rng.integers(len(_VEHICLE_COLOURS))] * rng.uniform(0.85, 1.1)
      glass = (canvas.ys < y - 0.55 * h) & mask
      col = np.broadcast_to(np.clip(colour, 0, 1), canvas.rgb.shape).copy()
      col[glass] = 0.25
    else:
      side = rng.choice((-1.0, 1.0))
      x = geometry["centre"] + side * (road_half + rng.uniform(0.0, s * 0.08))
      h = s * scale * 0.22
      mask = _person_mask(canvas, x, y, h) if name == "person" else _bicycle_mask(canvas, x, y, h)
      shade = rng.uniform(0.7, 1.2)
      col = np.clip(np.array(_BASE_COLOURS[name], np.float32) * shade, 0, 1)
    canvas.paint(mask, np.asarray(col, np.float32), cls, instance=inst)


def _apply_domain(
  rgb: np.ndarray, rng: np.random.Generator, domain: Domain, horizon: int
) -> np.ndarray:
  """Applies tint, light, fog, contrast, rain and sensor noise of one domain."""
  s = rgb.shape[0]
  out = rgb * np.array(domain.tint, np.float32) * domain.brightness
  ys = np.arange(s, dtype=np.float32)[:, None, None]
  fog = domain.fog * np.clip(1.2 - np.abs(ys - horizon) / s * 2.0, 0.0, 1.0)
  out = (1 - fog) * out + fog * np.array(domain.fog_colour, np.float32)
  mean = out.mean()
  out = (out - mean) * domain.contrast + mean
  if domain.streaks > 0:
    streak = rng.uniform(size=(s, s)) < domain.streaks
    streak = streak | np.roll(streak, 1, axis=0) | np.roll(streak, 2, axis=0)
    out = np.where(streak[..., None], out * 0.6 + 0.35, out)
  out = out + rng.normal(0.0, domain.noise, out.shape)
  return np.clip(out, 0.0, 1.0)


def _boxes(semantic: np.ndarray, instance: np.ndarray):
  """Visible-part boxes of every thing instance, padded to `MAX_BOXES` (nearest kept)."""
  boxes = np.zeros((MAX_BOXES, 4), np.float32)
  classes = np.zeros((MAX_BOXES,), np.int32)
  valid = np.zeros((MAX_BOXES,), bool)
  ids = [i for i in np.unique(instance) if i > 0]
  found = []
  for i in ids:
    ys, xs = np.nonzero(instance == i)
    if len(ys) < MIN_VISIBLE_PIXELS:
      continue
    cls = int(semantic[ys[0], xs[0]])
    found.append((i, (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), cls))
  for slot, (_, box, cls) in enumerate(sorted(found, key=lambda t: -t[0])[:MAX_BOXES]):
    boxes[slot] = box
    classes[slot] = cls
    valid[slot] = True
  return boxes, classes, valid


def generate_scene(seed: int, domain: str, image_size: int = 64, max_things: int = 8) -> dict:
  """Generates one street scene.

  Args:
    seed: integer seed; the same (seed, domain, image_size) gives the same scene.
    domain: one of `DOMAINS`.
    image_size: side length S of the square image.
    max_things: most thing instances placed (some may end up fully occluded).

  Returns:
    dict with `image` [S, S, 3] uint8, `semantic` [S, S] uint8, `panoptic` [S, S] int32,
    `boxes` [MAX_BOXES, 4] float32, `box_classes` [MAX_BOXES] int32, `box_valid`
    [MAX_BOXES] bool.

  Raises:
    ValueError: for an unknown domain or an image size below 16.
  """
  if domain not in DOMAIN_STYLES:
    raise ValueError(f"domain={domain!r} is not known: allowed domains are {DOMAINS}")
  if image_size < 16:
    raise ValueError(f"image_size={image_size} is too small: it must be >= 16")
  style = DOMAIN_STYLES[domain]
  rng = np.random.default_rng([seed, DOMAINS.index(domain), image_size])
  canvas = _Canvas(image_size)
  geometry = _paint_background(canvas, rng, style.texture)
  _paint_things(canvas, rng, geometry, max_things)
  rgb = _apply_domain(canvas.rgb, rng, style, geometry["horizon"])
  boxes, box_classes, box_valid = _boxes(canvas.semantic, canvas.instance)
  panoptic = (canvas.semantic.astype(np.int32) + 1) * PANOPTIC_DIVISOR + canvas.instance
  return {
    "image": np.round(rgb * 255).astype(np.uint8),
    "semantic": canvas.semantic,
    "panoptic": panoptic.astype(np.int32),
    "boxes": boxes,
    "box_classes": box_classes,
    "box_valid": box_valid,
  }


def generate_split(
  domain: str, num_images: int, seed: int, image_size: int = 64
) -> dict[str, np.ndarray]:
  """Generates `num_images` scenes of one domain stacked into arrays (keys of generate_scene)."""
  scenes = [generate_scene(seed * 1_000_003 + i, domain, image_size) for i in range(num_images)]
  return {k: np.stack([s[k] for s in scenes]) for k in scenes[0]}
