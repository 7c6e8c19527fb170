import numpy as np
import pytest

from research.data import street_scenes as ss


@pytest.fixture(scope="module")
def scenes():
  return {d: ss.generate_split(d, 6, seed=3, image_size=48) for d in ss.DOMAINS}


def test_same_seed_same_scene_and_domains_differ():
  a = ss.generate_scene(5, "day", 32)
  b = ss.generate_scene(5, "day", 32)
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(a["panoptic"], b["panoptic"])
  night = ss.generate_scene(5, "night", 32)
  assert np.abs(a["image"].astype(int) - night["image"].astype(int)).mean() > 10


def test_boxes_are_the_tight_boxes_of_every_visible_instance(scenes):
  # The box labels follow from the panoptic labels: one box per thing instance with at least
  # MIN_VISIBLE_PIXELS visible pixels, tight around them, with the instance's class.
  for s in scenes.values():
    assert s["image"].dtype == np.uint8 and s["boxes"].shape[1:] == (ss.MAX_BOXES, 4)
    for i in range(len(s["image"])):
      panoptic = s["panoptic"][i]
      expected = set()
      for segment in np.unique(panoptic[panoptic % ss.PANOPTIC_DIVISOR > 0]):
        ys, xs = np.nonzero(panoptic == segment)
        if len(ys) >= ss.MIN_VISIBLE_PIXELS:
          box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
          expected.add((box, int(ss.panoptic_category(segment))))
      valid = s["box_valid"][i]
      got = {
        (tuple(int(v) for v in box), int(cls))
        for box, cls in zip(s["boxes"][i][valid], s["box_classes"][i][valid])
      }
      assert len(expected) <= ss.MAX_BOXES and got == expected
      assert not s["boxes"][i][~valid].any()


def test_panoptic_ids_agree_with_semantic_and_things(scenes):
  for s in scenes.values():
    category = ss.panoptic_category(s["panoptic"])
    np.testing.assert_array_equal(category, s["semantic"])
    instance = s["panoptic"] % ss.PANOPTIC_DIVISOR
    is_thing = np.isin(s["semantic"], ss.THING_CLASSES)
    assert np.all(instance[~is_thing] == 0)
    assert np.all(instance[is_thing] > 0)


def test_boxes_enclose_their_instance_pixels(scenes):
  s = scenes["dusk"]
  for i in range(len(s["image"])):
    for box, cls, valid in zip(s["boxes"][i], s["box_classes"][i], s["box_valid"][i]):
      if not valid:
        continue
      x0, y0, x1, y1 = box.astype(int)
      inside = s["semantic"][i, y0:y1, x0:x1]
      assert cls in ss.THING_CLASSES
      assert (inside == cls).sum() >= ss.MIN_VISIBLE_PIXELS


def test_confusable_pairs_and_all_classes_occur():
  s = ss.generate_split("day", 40, seed=0, image_size=64)
  counts = np.bincount(s["semantic"].ravel(), minlength=ss.NUM_CLASSES)
  assert np.all(counts > 0)
  road = s["image"][s["semantic"] == 0].mean(0)
  walk = s["image"][s["semantic"] == 1].mean(0)
  sky = s["image"][s["semantic"] == 3].mean(0)
  assert np.abs(road - walk).max() < np.abs(road - sky).max() / 2  # road/sidewalk look alike


def test_bad_domain_and_size():
  with pytest.raises(ValueError, match="domain='snow'"):
    ss.generate_scene(0, "snow")
  with pytest.raises(ValueError, match="image_size=8"):
    ss.generate_scene(0, "day", image_size=8)
