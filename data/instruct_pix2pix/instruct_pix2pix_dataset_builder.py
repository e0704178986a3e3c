"""instruct_pix2pix: InstructPix2Pix clip-filtered triplets (original, edited, instruction).

Reads a manual directory in either of the two public layouts (see README.md):
  - folders: <manual_dir>/seeds.json, <manual_dir>/<name>/prompt.json, <seed>_0.jpg, <seed>_1.jpg
  - parquet: <manual_dir>/**/*.parquet with columns original_prompt, original_image,
    edit_prompt, edited_prompt, edited_image (image bytes)
Bad records are skipped with a reason (counts in info.metadata["skipped/train"]).
"""
import dataclasses
import glob
from pathlib import Path

import tensorflow_datasets as tfds

from mre_jax.data import records

NAME = "instruct_pix2pix"
PARQUET_COLUMNS = ("original_prompt", "original_image", "edit_prompt", "edited_prompt", "edited_image")


@dataclasses.dataclass
class InstructPix2PixConfig(tfds.core.BuilderConfig):
  """min_side: images with a shorter side are upscaled to it (pixels); max_bad_fraction:
  share of bad records above which the build fails."""
  min_side: int = 256
  max_bad_fraction: float = 0.05


class Builder(tfds.core.GeneratorBasedBuilder):
  """DatasetBuilder for instruct_pix2pix."""

  VERSION = tfds.core.Version("1.0.1")
  RELEASE_NOTES = {"1.0.0": "Initial release.",
                   "1.0.1": "Transparent images are composited over white (mre_jax.data.images.to_rgb, the "
                            "editor's conversion); 1.0.0 dropped alpha."}
  BUILDER_CONFIGS = [InstructPix2PixConfig(name="default")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put the InstructPix2Pix clip-filtered data in the manual dir, either as the original
  folders (seeds.json, <name>/prompt.json, <name>/<seed>_0.jpg, <name>/<seed>_1.jpg) or as
  the parquet shards of timbrooks/instructpix2pix-clip-filtered (any depth, *.parquet).
  """

  def __init__(self, *, file_format=None, **kwargs):
    super().__init__(file_format=file_format or "array_record", **kwargs)

  def _info(self):
    image = lambda: tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg")
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "original": image(), "edited": image(),
            "instruction": tfds.features.Text(),
            "instructions": tfds.features.Sequence(tfds.features.Text()),
            "input_caption": tfds.features.Text(), "output_caption": tfds.features.Text(),
            "name": tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(),
        homepage="https://www.timothybrooks.com/instruct-pix2pix",
    )

  def _split_generators(self, dl_manager):
    root = str(dl_manager.manual_dir)
    seeds = Path(root, "seeds.json")
    shards = sorted(glob.glob(str(Path(root, "**", "*.parquet")), recursive=True))
    if seeds.is_file():
      found = _folder_records(root, seeds)
      make = lambda r: _folder_example(r, self.builder_config.min_side)
    elif shards:
      found = _parquet_records(root, shards)
      make = lambda r: _parquet_example(r, self.builder_config.min_side)
    else:
      raise FileNotFoundError(
          f"{NAME}: no source in {root}: expected {seeds} (a list of [name, [seed, ...]] with "
          f"{root}/<name>/prompt.json and <seed>_0.jpg, <seed>_1.jpg) or *.parquet shards with "
          f"columns {', '.join(PARQUET_COLUMNS)} (see data/{NAME}/README.md)")
    return {"train": self._generate_examples(
        found, make, builder=NAME, split="train",
        max_bad_fraction=self.builder_config.max_bad_fraction, metadata=self.info.metadata)}


  def _generate_examples(self, found, make_fn, *, builder, split, max_bad_fraction, metadata):
    """Good records as (key, example); bad ones skipped and counted (records.checked_examples)."""
    yield from records.checked_examples(found, make_fn, builder=builder, split=split,
                                        max_bad_fraction=max_bad_fraction, metadata=metadata)

def _folder_records(root, seeds_path):
  """(key, record) for every (name, seed) of seeds.json; broken entries are BadRecords."""
  listing = records.load_source_json(seeds_path, NAME, "a list of [name, [seed, ...]]")
  if not isinstance(listing, list):
    raise ValueError(f"{NAME}: {seeds_path} must hold a list of [name, [seed, ...]], "
                     f"got {type(listing).__name__}")
  for i, entry in enumerate(listing):
    if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
            and isinstance(entry[1], list)):
      yield f"seeds.json[{i}]", records.BadRecord("bad_entry", f"seeds.json[{i}] = {entry!r}")
      continue
    name, seeds = entry
    for seed in seeds:
      yield f"{name}/{seed}", {"root": root, "name": name, "seed": seed}


def _folder_example(record, min_side):
  folder = records.safe_join(record["root"], record["name"], "seeds.json name")
  prompt = records.read_json(Path(folder, "prompt.json"), "prompt.json")
  if not isinstance(prompt, dict):
    raise records.BadRecord("bad_json", f"{folder}/prompt.json is not an object")
  seed = str(record["seed"])
  if not seed.isdigit():
    raise records.BadRecord("bad_entry", f"seed {seed!r} of {record['name']} is not a number")
  images = []
  for suffix in ("_0", "_1"):
    path = records.find_image(folder, seed + suffix)
    if path is None:
      raise records.BadRecord("missing_file", f"{folder}/{seed}{suffix}.jpg does not exist")
    images.append(records.load_for_storage(path, min_side))
  return _example(images, prompt.get("edit"), prompt.get("input"), prompt.get("output"),
                  f"{record['name']}/{seed}")


def _example(images, edit, input_caption, output_caption, name):
  instructions = records.parse_instructions(edit, f"{name}: edit")
  return {"original": images[0], "edited": images[1], "instruction": instructions[0],
          "instructions": instructions, "input_caption": _str(input_caption),
          "output_caption": _str(output_caption), "name": name}


def _str(value):
  return value if isinstance(value, str) else ""


def _parquet_records(root, shards):
  """(key, row dict) for every row of every shard, in file-name then row order."""
  import pyarrow.parquet as pq  # Only this layout needs it.
  for path in shards:
    table = pq.ParquetFile(path)
    missing = [c for c in PARQUET_COLUMNS if c not in table.schema_arrow.names]
    if missing:
      raise ValueError(f"{NAME}: {path} lacks the columns {missing} (has {table.schema_arrow.names})")
    rel, row = str(Path(path).relative_to(root)), 0
    for batch in table.iter_batches(batch_size=64, columns=list(PARQUET_COLUMNS)):
      for values in batch.to_pylist():
        yield f"{rel}:{row}", {"key": f"{rel}:{row}", **values}
        row += 1


def _image_bytes(value):
  """A parquet image cell: raw bytes or the HF Image struct {"bytes", "path"}."""
  return value.get("bytes") if isinstance(value, dict) else value


def _parquet_example(row, min_side):
  images = [records.load_for_storage(_image_bytes(row[c]), min_side, f"{row['key']} {c}")
            for c in ("original_image", "edited_image")]
  return _example(images, row["edit_prompt"], row["original_prompt"], row["edited_prompt"],
                  row["key"])
