"""reward_edit: RewardEdit-20K, InsPix2Pix triplets with 3 scores and 3 failure texts.

Manual directory layout (see README.md):
  <manual_dir>/RewardEdit_20K.json                      {<name>: [entry, entry, entry]}
  <manual_dir>/pix2pix-clip-filtered-hf/train/<name>/   prompt.json, <seed>_0.jpg, <seed>_1.jpg
Each entry is {"Score": number in [0, 5], "Negative Prompt": str}, in the order instruction
following, detail preserving, generation quality. Bad records are skipped with a reason
(counts in info.metadata["skipped/train"]).
"""
import dataclasses
import re
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from mre_jax.data import records

NAME = "reward_edit"
JSON_NAME = "RewardEdit_20K.json"
IMAGES = Path("pix2pix-clip-filtered-hf", "train")
_PAIR = re.compile(r"^(\d+)_([01])\.(jpg|jpeg|png|webp)$", re.IGNORECASE)


@dataclasses.dataclass
class RewardEditConfig(tfds.core.BuilderConfig):
  """min_side: images with a shorter side are upscaled to it (pixels); max_bad_fraction:
  share of bad records above which the build fails."""
  min_side: int = 256
  max_bad_fraction: float = 0.05


class Builder(tfds.core.GeneratorBasedBuilder):
  """DatasetBuilder for reward_edit."""

  VERSION = tfds.core.Version("1.0.1")
  RELEASE_NOTES = {"1.0.0": "Initial release.",
                   "1.0.1": "Transparent images are composited over white (mre_jax.data.images.to_rgb, the "
                            "editor's conversion); 1.0.0 dropped alpha."}
  BUILDER_CONFIGS = [RewardEditConfig(name="default")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Put {JSON_NAME} and the InstructPix2Pix folders it names in the manual dir:
  <manual_dir>/{JSON_NAME} and <manual_dir>/{IMAGES}/<name>/ (prompt.json, <seed>_0.jpg,
  <seed>_1.jpg; seeds.json optional).
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
            "scores": tfds.features.Tensor(shape=(3,), dtype=np.float32),
            "reward_texts": tfds.features.Sequence(tfds.features.Text(), length=3),
            "name": tfds.features.Text(),
            "seed": tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(),
        homepage="https://github.com/bytedance/Multi-Reward-Editing",
    )

  def _split_generators(self, dl_manager):
    root = str(dl_manager.manual_dir)
    rewards = records.load_source_json(
        Path(root, JSON_NAME), NAME,
        "the RewardEdit-20K JSON {<name>: [{Score, Negative Prompt} x 3]}")
    if not isinstance(rewards, dict):
      raise ValueError(f"{NAME}: {Path(root, JSON_NAME)} must hold an object "
                       f"{{<name>: [entry x 3]}}, got {type(rewards).__name__}")
    images = records.require_path(Path(root, IMAGES), NAME,
                                  "one InstructPix2Pix folder per name", is_dir=True)
    found = ((name, (images, name, rewards[name])) for name in sorted(rewards))
    min_side = self.builder_config.min_side
    return {"train": self._generate_examples(
        found, lambda r: _example(*r, min_side), builder=NAME, split="train",
        max_bad_fraction=self.builder_config.max_bad_fraction, metadata=self.info.metadata)}


  def _generate_examples(self, found, make_fn, *, builder, split, max_bad_fraction, metadata):
    """Good records as (key, example); bad ones skipped and counted (records.checked_examples)."""
    yield from records.checked_examples(found, make_fn, builder=builder, split=split,
                                        max_bad_fraction=max_bad_fraction, metadata=metadata)

def _example(images_root, name, entries, min_side):
  scores, texts = records.parse_rewards(entries, f"{JSON_NAME}[{name!r}]")
  folder = records.safe_join(images_root, name, f"{JSON_NAME} key")
  if not Path(folder).is_dir():
    raise records.BadRecord("missing_file", f"folder {folder} does not exist")
  prompt = records.read_json(Path(folder, "prompt.json"), "prompt.json")
  if not isinstance(prompt, dict):
    raise records.BadRecord("bad_json", f"{folder}/prompt.json is not an object")
  instructions = records.parse_instructions(prompt.get("edit"), f"{name}/prompt.json: edit")
  seed = _rated_seed(folder, entries)
  original, edited = (records.load_for_storage(records.find_image(folder, f"{seed}_{i}"), min_side)
                      for i in (0, 1))
  return {"original": original, "edited": edited, "instruction": instructions[0],
          "instructions": instructions, "scores": scores, "reward_texts": texts,
          "name": name, "seed": seed}


def _named_seed(folder, entries):
  """The seed an entry names ("seed"/"Seed"), else the only seed of the folder's seeds.json."""
  named = {str(e[k]) for e in entries for k in ("seed", "Seed") if isinstance(e, dict) and k in e}
  if len(named) > 1:
    raise records.BadRecord("ambiguous_pair", f"{folder}: entries name several seeds {sorted(named)}")
  if named:
    return named.pop()
  path = Path(folder, "seeds.json")
  if path.is_file():
    listed = records.read_json(path, "seeds.json")
    if isinstance(listed, list) and len(listed) == 2 and isinstance(listed[1], list):
      listed = listed[1]  # The [name, [seed, ...]] form.
    if isinstance(listed, list) and len(listed) == 1:
      return str(listed[0])
  return None


def _rated_seed(folder, entries):
  """The seed of the rated pair: the named one, or the folder's only complete pair."""
  found = {}
  for file in (p.name for p in Path(folder).iterdir()):
    match = _PAIR.match(file)
    if match:
      found.setdefault(match.group(1), set()).add(match.group(2))
  pairs = sorted(s for s, sides in found.items() if sides == {"0", "1"})
  named = _named_seed(folder, entries)
  if named is not None:
    if named not in pairs:
      raise records.BadRecord("missing_file", f"{folder}: no {named}_0/{named}_1 image pair")
    return named
  if not pairs:
    raise records.BadRecord("missing_file", f"{folder}: no <seed>_0/<seed>_1 image pair")
  if len(pairs) > 1:
    raise records.BadRecord("ambiguous_pair", f"{folder}: {len(pairs)} image pairs {pairs[:5]} "
                            "and no seed named by the entry or seeds.json")
  return pairs[0]
