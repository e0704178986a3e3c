"""The synthetic edit world: determinism, disjoint splits, and a judge that measures."""
import numpy as np
import pytest

from mre_jax import synthetic as syn

SIZE = 48


def _edit(category, seed=0):
  rng = np.random.default_rng(seed)
  scene, edit = syn._sample_scene_and_edit(rng, "train", category, SIZE)
  return syn.render_float(scene, SIZE), edit


def _spec(**kw):
  spec = {"strength": 1.0, "unrelated": None, "blur": 0.0, "blocking": 0.0, "noise": 0.0,
          "noise_seed": 7}
  spec.update(kw)
  return spec


def _judge(original, edit, **kw):
  edited = syn.to_uint8(syn.corrupt(original, edit["truth"], _spec(**kw)))
  m = syn.judge(syn.to_uint8(original), syn.to_uint8(edit["truth"]), edited)
  texts = syn.failure_texts(m, edit["failures"], edit["truth_scene"], edit["target"], SIZE)
  return m["scores"], texts


def test_examples_are_deterministic_and_seeded():
  a, b = syn.make_example(5, "train", seed=1, size=32), syn.make_example(5, "train", seed=1, size=32)
  for key in ("original", "truth", "edited", "scores"):
    np.testing.assert_array_equal(a[key], b[key])
  assert a["instruction"] == b["instruction"] and a["reward_texts"] == b["reward_texts"]
  c = syn.make_example(5, "train", seed=2, size=32)
  assert not np.array_equal(a["original"], c["original"])


def test_example_fields_and_ranges():
  cats = set()
  for i in range(21):
    ex = syn.make_example(i, "test", seed=0, size=SIZE)
    for key in ("original", "truth", "edited"):
      assert ex[key].shape == (SIZE, SIZE, 3) and ex[key].dtype == np.uint8
    assert ex["scores"].dtype == np.float32 and ex["scores"].shape == (3,)
    assert 0 <= ex["scores"].min() and ex["scores"].max() <= 5
    assert len(ex["reward_texts"]) == 3 and ex["instruction"] in ex["instructions"]
    for score, text in zip(ex["scores"], ex["reward_texts"]):
      assert (score == 5.0) == (text == "None"), (ex["scores"], ex["reward_texts"])
    assert not np.array_equal(ex["original"], ex["truth"])
    cats.add(ex["category"])
  assert cats == set(syn.CATEGORIES)


def test_splits_hold_disjoint_scenes():
  train = {syn.make_example(i, "train", size=32)["scene_key"] for i in range(60)}
  test = {syn.make_example(i, "test", size=32)["scene_key"] for i in range(30)}
  assert not train & test
  assert len(test) > 20  # Scenes vary.


def test_clean_edit_scores_perfect():
  ex = syn.make_example(3, "train", size=32, clean_prob=1.0)
  np.testing.assert_array_equal(ex["edited"], ex["truth"])
  np.testing.assert_array_equal(ex["scores"], [5, 5, 5])
  assert ex["reward_texts"] == ["None", "None", "None"]


@pytest.mark.parametrize("category", syn.CATEGORIES)
def test_following_falls_with_the_share_applied(category):
  original, edit = _edit(category)
  scores = [_judge(original, edit, strength=s)[0] for s in (1.0, 0.7, 0.4, 0.0)]
  follow = [s[0] for s in scores]
  assert follow[0] == 5.0 and follow[-1] == 0.0
  assert all(a > b for a, b in zip(follow, follow[1:])), follow
  assert all(s[1] == 5.0 and s[2] == 5.0 for s in scores), scores  # Nothing else changed.
  assert _judge(original, edit, strength=0.0)[1][0] == edit["failures"][0]
  assert _judge(original, edit, strength=0.6)[1][0] == edit["failures"][1]


@pytest.mark.parametrize("artifact,amounts,words", [
    ("noise", (0.0, 0.03, 0.07, 0.12), "noisy"),
    ("blur", (0.0, 0.5, 0.8, 1.2), "blurry"),
    ("blocking", (0.0, 0.4, 0.7, 0.95), "block"),
])
def test_quality_falls_with_artifacts(artifact, amounts, words):
  original, edit = _edit("Local", seed=3)
  results = [_judge(original, edit, **{artifact: a}) for a in amounts]
  quality = [s[2] for s, _ in results]
  assert quality[0] == 5.0 and all(a > b for a, b in zip(quality, quality[1:])), quality
  assert all(s[1] == 5.0 for s, _ in results)  # Artifacts are not unrelated changes.
  assert words in results[-1][1][2] and results[0][1][2] == "None"


def test_preserving_falls_with_the_changed_area():
  original, edit = _edit("Global", seed=4)
  preserve = []
  for width in (0.0, 0.3, 0.45, 0.6):
    blob = None if width == 0 else {"kind": "blob", "cx": 0.5, "cy": 0.5, "w": width, "h": width,
                                     "colour": "black" if original.mean() > 0.3 else "white"}
    scores, texts = _judge(original, edit, unrelated=blob)
    preserve.append(scores[1])
    assert scores[0] >= 4.0 and scores[2] == 5.0
  assert preserve[0] == 5.0 and all(a > b for a, b in zip(preserve, preserve[1:])), preserve
  assert "changed" in texts[1]


def test_unrelated_object_change_is_named():
  rng = np.random.default_rng(11)
  for _ in range(200):
    scene = syn.sample_scene(rng)
    if len(scene["objects"]) >= 2:
      break
  target, other = scene["objects"][:2]
  edit = syn.sample_edit(rng, {**scene, "objects": [target]}, "Local", SIZE)  # Edit `target` only.
  full = {**scene, "objects": [o for o in scene["objects"]]}
  original = syn.render_float(full, SIZE)
  truth_scene = {**edit["truth_scene"], "objects": edit["truth_scene"]["objects"] + scene["objects"][1:]}
  edit = {**edit, "truth": syn.render_float(truth_scene, SIZE), "truth_scene": truth_scene}
  colour = syn._far_colour(np.random.default_rng(0), other["colour"])
  scores, texts = _judge(original, edit, unrelated={"kind": "object", "object": other, "colour": colour})
  assert scores[1] < 5.0 and texts[1] == f"the {other['colour']} {other['shape']} changed"


def test_judge_works_on_any_edit():
  original, edit = _edit("Remove", seed=2)
  o, t = syn.to_uint8(original), syn.to_uint8(edit["truth"])
  assert syn.judge(o, t, o)["scores"][0] == 0.0
  painted = t.copy()
  painted[:24, :24] = 255 - painted[:24, :24]
  assert syn.judge(o, t, painted)["scores"][1] < 3.0
  with pytest.raises(ValueError, match="shapes differ"):
    syn.judge(o, t, t[:32])


def test_size_is_checked():
  with pytest.raises(ValueError, match="multiple of 8"):
    syn.make_example(0, size=36)
  with pytest.raises(ValueError, match="split"):
    syn.make_example(0, split="valid")


def test_failure_texts_without_a_scene_are_generic():
  original, edit = _edit("Texture", seed=5)
  o, t = syn.to_uint8(original), syn.to_uint8(edit["truth"])
  painted = o.copy()
  painted[8:40, 8:40] = 255 - painted[8:40, 8:40]
  texts = syn.failure_texts(syn.judge(o, t, painted))
  assert texts[0] == "the edit is not applied" and texts[1].startswith("the image changed at the")
  assert syn.failure_texts(syn.judge(o, t, t)) == ["None", "None", "None"]
