"""TFDS builders for the real formats, on small fixtures written on the fly."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import data_fixtures as fx
import numpy as np
import pytest

from mre_jax.data import input_pipeline as ip
from mre_jax.data import records

MIN_SIDE = 64


def _config(name, **kw):
  module = sys.modules[ip.builder_class(name).__module__]
  cls = {"reward_edit": "RewardEditConfig", "instruct_pix2pix": "InstructPix2PixConfig",
         "real_edit": "RealEditConfig"}[name]
  return getattr(module, cls)(name=kw.pop("config_name", "test"), **kw)


def _build(name, tmp_path, manual_dir, **config):
  config.setdefault("min_side", MIN_SIDE)
  return ip.build_dataset(name, str(tmp_path / "tfds"), manual_dir=str(manual_dir),
                          config=_config(name, **config))


def _pair(folder, seed, rng, mode=None, fmt="JPEG", size=(40, 56)):
  ext = "jpg" if fmt == "JPEG" else "png"
  for side in (0, 1):
    fx.write_image(os.path.join(folder, f"{seed}_{side}.{ext}"), fx.random_image(rng, *size), fmt, mode)


def _prompt(folder, edit="make it winter"):
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "prompt.json"), "w") as f:
    json.dump({"input": "a photo", "edit": edit, "output": "a winter photo"}, f)


def _entries(scores=(4, 5, 2), texts=("None", "None", "the image is blurry")):
  return [{"Score": s, "Negative Prompt": t} for s, t in zip(scores, texts)]


# --------------------------------------------------------------------- reward_edit

def _reward_edit_source(root):
  """6 good records (4 image modes, a named seed, seeds.json) and one of every bad kind."""
  rng = np.random.default_rng(0)
  train = os.path.join(root, "pix2pix-clip-filtered-hf", "train")
  rewards = {}
  good = {"g_rgb": (None, "JPEG"), "g_gray": ("L", "PNG"), "g_rgba": ("RGBA", "PNG"),
          "g_palette": ("P", "PNG"), "g_cmyk": ("CMYK", "JPEG")}
  for name, (mode, fmt) in good.items():
    _prompt(os.path.join(train, name), edit=["make it snowy", "add snow"])
    _pair(os.path.join(train, name), 11, rng, mode, fmt)
    rewards[name] = _entries()
  _prompt(os.path.join(train, "g_named"))
  for seed in (221, 222, 1000):
    _pair(os.path.join(train, "g_named"), seed, rng)
  rewards["g_named"] = [{**e, "seed": 222} for e in _entries()]
  _prompt(os.path.join(train, "g_seedsjson"))
  for seed in (5, 6):
    _pair(os.path.join(train, "g_seedsjson"), seed, rng)
  with open(os.path.join(train, "g_seedsjson", "seeds.json"), "w") as f:
    json.dump(["g_seedsjson", [6]], f)
  rewards["g_seedsjson"] = _entries()
  # 16-bit grayscale.
  _prompt(os.path.join(train, "g_16bit"))
  for side in (0, 1):
    from PIL import Image
    Image.fromarray((rng.integers(0, 65535, (40, 56))).astype(np.uint16)).save(
        os.path.join(train, "g_16bit", f"3_{side}.png"))
  rewards["g_16bit"] = _entries()

  def bad(name, reason, entries=None, make=True):
    if make:
      _prompt(os.path.join(train, name))
      _pair(os.path.join(train, name), 1, rng)
    rewards[name] = _entries() if entries is None else entries
    return name, reason

  expected = dict([
      bad("b_ambiguous", "ambiguous_pair"),
      bad("b_missing_folder", "missing_file", make=False),
      bad("b_nan", "bad_score", _entries(scores=(float("nan"), 5, 5))),
      bad("b_range", "bad_score", _entries(scores=(4, 7, 5))),
      bad("b_string", "bad_score", _entries(scores=("4", 5, 5))),
      bad("b_no_score", "bad_score", [{"Negative Prompt": "None"}] * 3),
      bad("b_count", "wrong_reward_count", _entries()[:2]),
      bad("b_text", "bad_reward_text", [{"Score": 5}] * 3),
      bad("b_empty_edit", "empty_instruction"),
      bad("b_bad_prompt", "bad_json"),
      bad("b_truncated", "bad_image"),
      bad("b_corrupt", "bad_image"),
      bad("b_missing_image", "missing_file"),
      bad("../escape", "unsafe_path", make=False),
      bad("/abs/folder", "unsafe_path", make=False),
  ])
  _pair(os.path.join(train, "b_ambiguous"), 2, rng)
  _prompt(os.path.join(train, "b_empty_edit"), edit=" ")
  with open(os.path.join(train, "b_bad_prompt", "prompt.json"), "w") as f:
    f.write("{not json")
  path = os.path.join(train, "b_truncated", "1_1.jpg")
  data = open(path, "rb").read()
  open(path, "wb").write(data[:len(data) // 2])
  open(os.path.join(train, "b_corrupt", "1_0.jpg"), "wb").write(b"\x89PNG not an image")
  os.remove(os.path.join(train, "b_missing_image", "1_1.jpg"))
  with open(os.path.join(root, "RewardEdit_20K.json"), "w") as f:
    json.dump(rewards, f)
  return expected


def test_reward_edit_builds_and_skips_each_bad_kind(tmp_path):
  expected = _reward_edit_source(tmp_path / "src")
  builder = _build("reward_edit", tmp_path, tmp_path / "src", max_bad_fraction=0.8)
  source = ip.data_source(builder, "train")
  assert len(source) == 8
  examples = {source[i]["name"].decode(): source[i] for i in range(len(source))}
  assert set(examples) == {"g_rgb", "g_gray", "g_rgba", "g_palette", "g_cmyk", "g_named",
                           "g_seedsjson", "g_16bit"}
  for ex in examples.values():
    assert ex["original"].dtype == np.uint8 and ex["original"].shape[2] == 3
    assert min(ex["original"].shape[:2]) == MIN_SIDE  # 40 x 56 was upscaled.
    assert ex["original"].shape == ex["edited"].shape
    np.testing.assert_array_equal(ex["scores"], np.array([4, 5, 2], np.float32))
    assert [t.decode() for t in ex["reward_texts"]] == ["None", "None", "the image is blurry"]
  assert examples["g_named"]["seed"] == b"222" and examples["g_seedsjson"]["seed"] == b"6"
  assert [t.decode() for t in examples["g_rgb"]["instructions"]] == ["make it snowy", "add snow"]
  gray = examples["g_gray"]["original"].astype(int)
  assert (gray[..., 0] == gray[..., 1]).all()
  summary = builder.info.metadata["skipped/train"]
  counts = {}
  for reason in expected.values():
    counts[reason] = counts.get(reason, 0) + 1
  assert summary["skipped"] == counts and summary["kept"] == 8
  assert any("escape" in e for e in summary["examples"]["unsafe_path"])
  reloaded = ip.build_dataset("reward_edit", str(tmp_path / "tfds"),
                              config=_config("reward_edit", max_bad_fraction=0.8, min_side=MIN_SIDE))
  assert reloaded.info.metadata["skipped/train"]["skipped"] == counts  # Stored with the data.


def test_reward_edit_fails_when_too_many_records_are_bad(tmp_path):
  _reward_edit_source(tmp_path / "src")
  with pytest.raises(ValueError, match=r"15 of 23 records are bad.*\"bad_score\": 4"):
    _build("reward_edit", tmp_path, tmp_path / "src")
  assert not list((tmp_path / "tfds" / "reward_edit").rglob("dataset_info.json"))  # no version was published


def test_reward_edit_missing_source_names_the_expected_path(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  (src / "README").write_text("wrong folder")
  with pytest.raises(FileNotFoundError, match=r"RewardEdit_20K\.json.*Score"):
    _build("reward_edit", tmp_path, src)
  (src / "RewardEdit_20K.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match=r"pix2pix-clip-filtered-hf/train"):
    _build("reward_edit", tmp_path, src)


# ---------------------------------------------------------------- instruct_pix2pix

def test_instruct_pix2pix_folder_layout(tmp_path):
  rng = np.random.default_rng(1)
  src = tmp_path / "src"
  for name, seeds in (("a", (1, 2)), ("b", (3,))):
    _prompt(str(src / name), edit="make it red" if name == "a" else ["turn it blue", "blue"])
    for seed in seeds:
      _pair(str(src / name), seed, rng, size=(80, 96))
  _prompt(str(src / "c"))
  listing = [["a", [1, 2]], ["b", [3]], ["../a", [1]], ["c", [9]], "garbage"]
  (src / "seeds.json").write_text(json.dumps(listing))
  builder = _build("instruct_pix2pix", tmp_path, src, max_bad_fraction=0.5)
  source = ip.data_source(builder, "train")
  assert sorted(source[i]["name"].decode() for i in range(len(source))) == ["a/1", "a/2", "b/3"]
  ex = next(source[i] for i in range(3) if source[i]["name"] == b"b/3")
  assert ex["instruction"] == b"turn it blue" and len(ex["instructions"]) == 2
  assert ex["original"].shape == (80, 96, 3)  # Large enough: kept as is.
  assert builder.info.metadata["skipped/train"]["skipped"] == {
      "bad_entry": 1, "missing_file": 1, "unsafe_path": 1}


def test_instruct_pix2pix_parquet_layout(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  rng = np.random.default_rng(2)
  src = tmp_path / "src" / "data"
  src.mkdir(parents=True)
  good = lambda: fx.image_bytes(fx.random_image(rng, 64, 64))
  rows = [dict(original_prompt="a cat", original_image={"bytes": good(), "path": None},
               edit_prompt="make it a dog", edited_prompt="a dog",
               edited_image={"bytes": good(), "path": None}),
          dict(original_prompt="a car", original_image={"bytes": b"junk", "path": None},
               edit_prompt="paint it red", edited_prompt="a red car",
               edited_image={"bytes": good(), "path": None}),
          dict(original_prompt="a tree", original_image={"bytes": good(), "path": None},
               edit_prompt="", edited_prompt="a tree",
               edited_image={"bytes": good(), "path": None})]
  pq.write_table(pa.Table.from_pylist(rows), src / "train-00000-of-00002.parquet")
  raw = [dict(original_prompt="a boat", original_image=fx.image_bytes(fx.random_image(rng, 64, 64), "PNG", "L"),
              edit_prompt="add a sail", edited_prompt="a sailing boat", edited_image=good())] * 3
  pq.write_table(pa.Table.from_pylist(raw), src / "train-00001-of-00002.parquet")
  builder = _build("instruct_pix2pix", tmp_path, tmp_path / "src", max_bad_fraction=0.4)
  source = ip.data_source(builder, "train")
  assert len(source) == 4
  names = sorted(source[i]["name"].decode() for i in range(4))
  assert names[0] == "data/train-00000-of-00002.parquet:0"
  ex = next(source[i] for i in range(4) if source[i]["instruction"] == b"make it a dog")
  assert ex["input_caption"] == b"a cat" and ex["output_caption"] == b"a dog"
  assert builder.info.metadata["skipped/train"]["skipped"] == {"bad_image": 1, "empty_instruction": 1}
  # Stage-1 data has no reward: the pipeline gives it the best one.
  batch = next(ip.create_iterator(ip.create_dataset(
      source, global_batch_size=2, crop_size=32, tokenize_fn=fx.hash_tokenize, seed=0,
      process_index=0, process_count=1)))
  np.testing.assert_array_equal(batch["scores"], np.full((2, 3), 5.0, np.float32))


def test_instruct_pix2pix_missing_source(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  (src / "notes.txt").write_text("nothing here")
  with pytest.raises(FileNotFoundError, match=r"seeds\.json.*parquet"):
    _build("instruct_pix2pix", tmp_path, src)


# ---------------------------------------------------------------------- real_edit

def test_real_edit(tmp_path):
  rng = np.random.default_rng(3)
  src = tmp_path / "src"
  fx.write_image(str(src / "p1.jpg"), fx.random_image(rng, 48, 64))
  fx.write_image(str(src / "images" / "p2.png"), fx.random_image(rng, 40, 40), "PNG", "RGBA")
  fx.write_image(str(src / "p4.jpg"), fx.random_image(rng, 40, 40))
  strings = [f"{c}. Some words: do {c.lower()} thing" for c in
             ("Local", "Remove", "Add", "Texture", "Background", "Global", "Style")]
  listing = {"p1.jpg": strings, "p2.png": strings[:6] + ["Style no colon here"],
             "p3.jpg": strings, "../p1.jpg": strings[:1], "p4.jpg": ["Colour. x: make it red"]}
  (src / "real_edit.json").write_text(json.dumps(listing))
  builder = _build("real_edit", tmp_path, src, max_bad_fraction=0.5, min_side=0)
  source = ip.data_source(builder, "test")
  assert len(source) == 13
  cats = builder.info.features["category"].names
  ex = next(source[i] for i in range(13) if source[i]["image_name"] == b"p1.jpg" and source[i]["index"] == 4)
  assert cats[ex["category"]] == "Background" and ex["instruction"] == b"do background thing"
  assert ex["original"].shape == (48, 64, 3)
  assert builder.info.metadata["skipped/test"]["skipped"] == {
      "bad_category": 1, "bad_instruction_format": 1, "missing_file": 7, "unsafe_path": 1}


def test_real_edit_parse_instruction():
  reb = sys.modules[ip.builder_class("real_edit").__module__]  # puts data/ on the path (alone under -k, too)
  assert reb.parse_instruction("Global. Tone: warm: make it warmer") == ("Global", "make it warmer")
  for text, reason in (("Local make it red", "bad_instruction_format"),
                       ("Local. make it red", "bad_instruction_format"),
                       (None, "bad_instruction_format"), ("Colour. x: y", "bad_category"),
                       ("Local. x:  ", "empty_instruction")):
    with pytest.raises(records.BadRecord) as e:
      reb.parse_instruction(text)
    assert e.value.reason == reason, text


# ------------------------------------------------------------------- records module

def test_safe_join_refuses_paths_that_leave_the_root(tmp_path):
  assert records.safe_join(str(tmp_path), "a/b") == os.path.realpath(tmp_path / "a" / "b")
  for rel in ("../x", "a/../../x", "/etc", "", "a/../b"):
    with pytest.raises(records.BadRecord, match="unsafe_path"):
      records.safe_join(str(tmp_path), rel)
  os.symlink("/", tmp_path / "link")
  with pytest.raises(records.BadRecord, match="outside"):
    records.safe_join(str(tmp_path), "link/etc")


def test_load_rgb_converts_modes_and_upscales(tmp_path):
  rng = np.random.default_rng(4)
  img = fx.random_image(rng, 20, 30)
  for mode, fmt in (("L", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"), ("LA", "PNG")):
    out = records.load_rgb(fx.image_bytes(img, fmt, mode), min_side=0)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
  big = records.load_rgb(fx.image_bytes(img, "PNG"), min_side=40)
  assert big.shape == (40, 60, 3)
  with pytest.raises(records.BadRecord, match="bad_image"):
    records.load_rgb(fx.image_bytes(img)[:200])
  with pytest.raises(records.BadRecord, match="missing_file"):
    records.load_rgb(str(tmp_path / "none.jpg"))


@pytest.mark.parametrize("name", ["synthetic_edit", "instruct_pix2pix", "reward_edit", "real_edit"])
def test_tfds_build_cli_finds_the_builder(name):
  """`tfds build data/<name>` loads the same Builder class that build_dataset uses."""
  build = pytest.importorskip("tensorflow_datasets.scripts.cli.build")
  if not hasattr(build, "_get_builder_cls_and_kwargs"):
    pytest.skip("this TFDS version loads builders differently")
  cls, _ = build._get_builder_cls_and_kwargs(os.path.join(ip.DATA_ROOT, name), has_imports=False)
  assert cls is ip.builder_class(name) and cls.name == name


def test_rgb_jpegs_are_stored_without_a_second_compression():
  rng = np.random.default_rng(5)
  data = fx.image_bytes(fx.random_image(rng, 70, 80))
  assert records.load_for_storage(data, min_side=64) == data
  small = records.load_for_storage(data, min_side=100)
  assert isinstance(small, np.ndarray) and small.shape == (100, 114, 3)
  gray = records.load_for_storage(fx.image_bytes(fx.random_image(rng, 70, 80), mode="L"))
  assert isinstance(gray, np.ndarray) and gray.shape == (70, 80, 3)


def _tfds_build(args, cwd, data_dir):
  """Runs the installed `tfds build` CLI with no PYTHONPATH: the builders must import `mre_jax` through
  the install (pip install -e .), not through a path the caller set."""
  tfds_cli = shutil.which("tfds", path=str(Path(sys.executable).parent))
  assert tfds_cli, f"no `tfds` command next to {sys.executable}: install the [tfds-cli] extra"
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  out = subprocess.run([tfds_cli, "build", *args, f"--data_dir={data_dir}"], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]


def test_the_tfds_build_command_builds_readable_datasets(tmp_path):
  """The standard command, as a user runs it (needs the [tfds-cli] extra): synthetic_edit from the
  repo root as README writes it, and real_edit from another folder (so the current directory cannot
  be what makes `mre_jax` importable) with a manual dir. Both outputs open with
  builder_from_directory and hold the expected examples."""
  pytest.importorskip("apache_beam")
  pytest.importorskip("mlcroissant")
  tfds = pytest.importorskip("tensorflow_datasets")
  root = Path(ip.DATA_ROOT).parent
  out = tmp_path / "out"
  _tfds_build(["data/synthetic_edit", "--config=tiny"], root, out)
  synth = tfds.builder_from_directory(str(out / "synthetic_edit" / "tiny" / "1.0.0"))
  assert {k: v.num_examples for k, v in synth.info.splits.items()} == {"train": 64, "test": 16}
  train = synth.as_data_source("train")
  assert len(train) == 64 and train[0]["original"].shape == (32, 32, 3)

  rng = np.random.default_rng(5)
  src = tmp_path / "src"
  fx.write_image(str(src / "p1.jpg"), fx.random_image(rng, 48, 64))
  categories = ("Local", "Remove", "Add", "Texture", "Background", "Global", "Style")
  strings = [f"{c}. Some words: do {c.lower()} thing" for c in categories]
  (src / "real_edit.json").write_text(json.dumps({"p1.jpg": strings}))
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  _tfds_build([str(root / "data" / "real_edit"), f"--manual_dir={src}"], elsewhere, out)
  real = tfds.builder_from_directory(str(out / "real_edit" / "default" / "1.0.1"))
  test = real.as_data_source("test")
  assert len(test) == 7 and real.info.splits["test"].num_examples == 7
  instructions = sorted(test[i]["instruction"].decode() for i in range(7))
  assert instructions == sorted(f"do {c.lower()} thing" for c in categories)
  assert test[0]["original"].shape == (48, 64, 3)
