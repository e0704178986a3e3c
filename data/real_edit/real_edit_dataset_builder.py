"""real_edit: the Real-Edit evaluation set, 80 photos x 7 instructions (one per category).

Manual directory: one JSON {<image file>: [string x 7]} and the photos it names, next to it
or under images/. Each string reads "<Category>. ...: <instruction>"; the category is the
text before the first ".", the instruction the text after the last ": ".
"""
import dataclasses
import glob
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from mre_jax.data import records

NAME = "real_edit"


@dataclasses.dataclass
class RealEditConfig(tfds.core.BuilderConfig):
  """json_name: the JSON file in the manual dir (default: its only *.json); min_side:
  upscale smaller photos to this short side (0: never); max_bad_fraction: share of bad
  records above which the build fails."""
  json_name: str = ""
  min_side: int = 0
  max_bad_fraction: float = 0.05


class Builder(tfds.core.GeneratorBasedBuilder):
  """DatasetBuilder for real_edit."""

  VERSION = tfds.core.Version("1.0.1")
  RELEASE_NOTES = {"1.0.0": "Initial release.",
                   "1.0.1": "Transparent images are composited over white (mre_jax.data.images.to_rgb, the "
                            "editor's conversion); 1.0.0 dropped alpha."}
  BUILDER_CONFIGS = [RealEditConfig(name="default")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put the Real-Edit JSON ({<image file>: ["<Category>. ...: <instruction>", ...]}) and its
  photos (next to it or in images/) in the manual dir.
  """

  def __init__(self, *, file_format=None, **kwargs):
    super().__init__(file_format=file_format or "array_record", **kwargs)

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "original": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "instruction": tfds.features.Text(),
            "category": tfds.features.ClassLabel(names=records.CATEGORIES),
            "image_name": tfds.features.Text(),
            "index": tfds.features.Scalar(dtype=np.int32),
        }),
        metadata=tfds.core.MetadataDict(),
        homepage="https://github.com/bytedance/Multi-Reward-Editing",
    )

  def _split_generators(self, dl_manager):
    root = str(dl_manager.manual_dir)
    path = _json_path(root, self.builder_config.json_name)
    listing = records.load_source_json(path, NAME, "{<image file>: [instruction string, ...]}")
    if not isinstance(listing, dict):
      raise ValueError(f"{NAME}: {path} must hold an object {{<image file>: [string, ...]}}, "
                       f"got {type(listing).__name__}")
    return {"test": self._generate_examples(
        _records(root, listing, self.builder_config.min_side), _example, builder=NAME,
        split="test", max_bad_fraction=self.builder_config.max_bad_fraction,
        metadata=self.info.metadata)}


  def _generate_examples(self, found, make_fn, *, builder, split, max_bad_fraction, metadata):
    """Good records as (key, example); bad ones skipped and counted (records.checked_examples)."""
    yield from records.checked_examples(found, make_fn, builder=builder, split=split,
                                        max_bad_fraction=max_bad_fraction, metadata=metadata)

def _json_path(root, json_name):
  if json_name:
    return records.require_path(Path(root, json_name), NAME, "the Real-Edit JSON")
  found = sorted(glob.glob(str(Path(root, "*.json"))))  # glob: hidden files stay out
  if len(found) != 1:
    raise FileNotFoundError(f"{NAME}: expected exactly one *.json in {root} (the Real-Edit "
                            f"{{<image file>: [string, ...]}}), found {found}; or set json_name")
  return found[0]


def parse_instruction(text):
  """"<Category>. ...: <instruction>" -> (category, instruction); BadRecord if malformed."""
  if not isinstance(text, str) or "." not in text or ": " not in text:
    raise records.BadRecord("bad_instruction_format",
                            f"{text!r} is not '<Category>. ...: <instruction>'")
  category = text.split(".", 1)[0].strip()
  instruction = text.rsplit(": ", 1)[1].strip()
  if category not in records.CATEGORIES:
    raise records.BadRecord("bad_category", f"category {category!r} of {text!r} is not one of {records.CATEGORIES}")
  if not instruction:
    raise records.BadRecord("empty_instruction", f"{text!r} has an empty instruction")
  return category, instruction


def _records(root, listing, min_side):
  """(key, record) per (photo, instruction); the photo is decoded once for its strings."""
  for image_name in sorted(listing):
    texts = listing[image_name]
    try:
      if not isinstance(texts, list):
        raise records.BadRecord("bad_entry", f"{image_name}: expected a list of strings, got {texts!r}")
      image = records.load_rgb(_photo_path(root, image_name), min_side)
    except records.BadRecord as e:
      for i in range(len(texts) if isinstance(texts, list) else 1):
        yield f"{image_name}#{i}", e
      continue
    for i, text in enumerate(texts):
      yield f"{image_name}#{i}", {"image": image, "image_name": image_name, "index": i, "text": text}


def _photo_path(root, image_name):
  direct = records.safe_join(root, image_name, "JSON key")
  nested = records.safe_join(Path(root, "images"), image_name, "JSON key")
  return direct if Path(direct).is_file() or not Path(nested).is_file() else nested


def _example(record):
  category, instruction = parse_instruction(record["text"])
  return {"original": record["image"], "instruction": instruction, "category": category,
          "image_name": record["image_name"], "index": record["index"]}
