"""Input pipeline: joint augmentation, per-process shards, resumable iteration, tokens."""
import data_fixtures
import numpy as np
import pytest

from mre_jax.data import input_pipeline as ip
from mre_jax.data import tokens


def _coord_image(height, width):
  """uint8 [H, W, 3]: red = column, green = row, blue = 7 (positions are readable)."""
  rows, cols = np.mgrid[0:height, 0:width]
  return np.stack([cols, rows, np.full_like(rows, 7)], -1).astype(np.uint8)


def _source(n, height=32, width=40, seed=0):
  """n examples; scores[0] carries the record id so batches can be traced back."""
  rng = np.random.default_rng(seed)
  return [{"original": data_fixtures.random_image(rng, height, width),
           "edited": data_fixtures.random_image(rng, height, width),
           "instructions": [f"edit {i} a".encode(), f"edit {i} b".encode(), f"edit {i} c".encode()],
           "scores": np.array([i, 1.5, 2.5], np.float32),
           "reward_texts": [b"the square is still blue", b"None", b"the image is noisy"]}
          for i in range(n)]


def _dataset(source, **kw):
  args = dict(global_batch_size=4, crop_size=24, tokenize_fn=data_fixtures.hash_tokenize, seed=3,
              process_index=0, process_count=1)
  args.update(kw)
  return ip.create_dataset(source, **args)


def _ids(batch):
  return batch["scores"][:, 0].astype(int).tolist()


def test_batch_keys_dtypes_and_ranges():
  batch = next(ip.create_iterator(_dataset(_source(8))))
  assert set(batch) == {"original", "edited", "instruction_ids", "reward_ids", "scores"}
  for key in ("original", "edited"):
    assert batch[key].shape == (4, 24, 24, 3) and batch[key].dtype == np.float32
    assert -1.0 <= batch[key].min() and batch[key].max() <= 1.0 and batch[key].min() < -0.9
  for key in ("instruction_ids", "reward_ids"):
    assert batch[key].shape == (4, 77) and batch[key].dtype == np.int32
  assert batch["scores"].dtype == np.float32
  np.testing.assert_array_equal(batch["scores"][:, 1:], np.tile([1.5, 2.5], (4, 1)))
  expected = data_fixtures.hash_tokenize(["the square is still blue; None; the image is noisy"])
  np.testing.assert_array_equal(batch["reward_ids"], np.repeat(expected, 4, 0))


def test_same_crop_and_flip_on_both_images():
  img = _coord_image(32, 48)
  source = [{"original": img, "edited": img.copy(), "truth": 255 - img, "instruction": b"x"}] * 16
  seen_left, seen_flip = set(), set()
  for seed in range(6):
    ds = _dataset(source, crop_size=32, seed=seed, keep_truth=True, shuffle=False)
    for batch in (ds[0], ds[1]):
      np.testing.assert_array_equal(batch["original"], batch["edited"])
      np.testing.assert_allclose(batch["truth"], -batch["original"], atol=1e-6)
      pix = np.round((batch["original"] + 1) * 127.5).astype(int)
      for ex in pix:
        cols, rows = ex[..., 0], ex[..., 1]
        np.testing.assert_array_equal(rows, np.arange(32)[:, None] * np.ones((1, 32), int))
        step = cols[0, 1] - cols[0, 0]
        assert step in (1, -1) and (np.diff(cols, axis=1) == step).all()
        seen_left.add(int(cols.min()))
        seen_flip.add(int(step))
  assert seen_flip == {1, -1} and len(seen_left) > 4  # Random offsets over [0, 16].


def test_short_side_resize_keeps_aspect_and_square_does_not():
  assert ip.resized_shape(100, 200, 64) == (64, 128)
  assert ip.resized_shape(300, 200, 64, resize_size=80) == (120, 80)
  assert ip.resized_shape(100, 200, 64, "square") == (64, 64)
  img = _coord_image(16, 64)  # Tiny images are upscaled.
  out, = ip.augment_images([img], np.random.default_rng(0), crop_size=32, flip=False)
  assert out.shape == (32, 32, 3)
  sq, = ip.augment_images([img], np.random.default_rng(0), crop_size=32, resize="square", flip=False)
  cols = np.round((sq[..., 0] + 1) * 127.5)
  assert cols[:, 0].max() < 3 and cols[:, -1].min() > 60  # The whole width is kept.
  with pytest.raises(ValueError, match="resize"):
    ip.resized_shape(10, 10, 8, "crop")


def test_process_shards_are_disjoint_and_cover_the_epoch():
  source = _source(24)
  single = [_ids(b) for b in _dataset(source, global_batch_size=4, num_epochs=1)]
  shards = [[_ids(b) for b in _dataset(source, global_batch_size=4, num_epochs=1,
                                       process_index=p, process_count=2)] for p in range(2)]
  assert all(len(b) == 2 for s in shards for b in s) and len(shards[0]) == len(shards[1]) == 6
  first, second = (sum(s, []) for s in shards)
  assert not set(first) & set(second)
  assert sorted(first + second) == list(range(24))
  for step, ids in enumerate(single):  # Every process count sees the same global batches.
    assert sorted(shards[0][step] + shards[1][step]) == sorted(ids)
  assert sum(single, []) != list(range(24))  # Shuffled.


def test_epochs_reshuffle_and_drop_the_partial_global_batch():
  ds = _dataset(_source(10), num_epochs=2)
  ids = [_ids(b) for b in ds]
  assert len(ids) == 5  # 20 records // 4.
  flat = sum(ids, [])
  assert sorted(flat[:10]) == list(range(10)) and flat[:10] != flat[10:20]


def test_resume_from_saved_state_reproduces_the_next_batches():
  ds = _dataset(_source(10))
  it = ip.create_iterator(ds)
  for _ in range(4):  # Past the first epoch.
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  resumed = ip.create_iterator(_dataset(_source(10)))
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_instruction_is_sampled_from_the_list_deterministically():
  ds = _dataset(_source(4), global_batch_size=1, num_epochs=30, shuffle=False)
  picks = [tuple(b["instruction_ids"][0, :8]) for b in ds]
  again = [tuple(b["instruction_ids"][0, :8]) for b in _dataset(_source(4), global_batch_size=1,
                                                                  num_epochs=30, shuffle=False)]
  assert picks == again
  assert len(set(picks[0::4])) == 3  # Record 0 got all three of its instructions.


def test_layout_and_tokenizer_errors():
  with pytest.raises(ValueError, match="not divisible"):
    _dataset(_source(8), global_batch_size=5, process_count=2)
  bad = _dataset(_source(8), tokenize_fn=lambda texts: np.zeros((len(texts), 10), np.int32))
  with pytest.raises(ValueError, match="tokenize_fn returned shape"):
    next(ip.create_iterator(bad))


@pytest.fixture(scope="module")
def synthetic_builder(tmp_path_factory):
  return ip.build_dataset("synthetic_edit", str(tmp_path_factory.mktemp("tfds")), config="tiny")


def test_synthetic_builder_end_to_end(synthetic_builder, tmp_path):
  info = synthetic_builder.info
  assert info.splits["train"].num_examples == 64 and info.splits["test"].num_examples == 16
  source = ip.data_source(synthetic_builder, "train")
  ex = source[0]
  assert ex["original"].shape == (32, 32, 3) and ex["scores"].dtype == np.float32
  again = ip.build_dataset("synthetic_edit", synthetic_builder.data_dir.split("/synthetic_edit")[0],
                           config="tiny")  # Already prepared: reads, does not rebuild.
  assert again.info.splits["train"].num_examples == 64
  tok = tokens.tokenize_fn(data_fixtures.make_tokenizer(tmp_path / "tok"))
  it = ip.create_input_iterator(synthetic_builder, "train", global_batch_size=8, crop_size=32,
                                tokenize_fn=tok, seed=0, process_index=1, process_count=2)
  batch = next(it)
  assert batch["original"].shape == (4, 32, 32, 3) and batch["instruction_ids"].shape == (4, 77)
  assert ((0 <= batch["scores"]) & (batch["scores"] <= 5)).all()


def test_synthetic_builder_stores_the_world_exactly(synthetic_builder):
  from mre_jax.data import synthetic
  source = ip.data_source(synthetic_builder, "test")
  stored = {source[i]["scene_key"].decode(): source[i] for i in range(len(source))}
  for index in range(16):
    want = synthetic.make_example(index, "test", seed=0, size=32)
    got = stored[want["scene_key"]]
    for key in ("original", "truth", "edited", "scores"):
      np.testing.assert_array_equal(got[key], want[key])
    assert [t.decode() for t in got["reward_texts"]] == want["reward_texts"]
    assert got["category"].decode() == want["category"]


def test_process_layout_defaults_to_jax():
  ds = _dataset(_source(8), process_index=None, process_count=None)
  assert next(ip.create_iterator(ds))["original"].shape[0] == 4  # One process on CPU.


def test_worker_processes_give_the_same_batches(synthetic_builder):
  ds = _dataset(ip.data_source(synthetic_builder, "test"), crop_size=32)
  want = [next(it) for it in [ip.create_iterator(ds)] for _ in range(2)]
  it = ip.create_iterator(ds, worker_count=1)
  got = [next(it) for _ in range(2)]
  state = it.get_state()
  for w, g in zip(want, got):
    np.testing.assert_array_equal(w["edited"], g["edited"])
  resumed = ip.create_iterator(ds, worker_count=1)
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["scores"], next(it)["scores"])


def test_unknown_dataset_names_the_expected_path(tmp_path):
  with pytest.raises(ValueError, match="nope_dataset_builder.py"):
    ip.build_dataset("nope", str(tmp_path))
