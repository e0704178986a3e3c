"""Fixtures in the real formats, written on the fly: tests, benchmarks and offline demos use them
(no download, no API).

- `write_tiny_model_folder`: a random diffusers-format InstructPix2Pix folder (tiny U-Net).
- `write_synthetic_real_edit`: a Real-Edit-format folder from the synthetic world, with exact truth.
- `write_synthetic_ip2p`: an InsPix2Pix-format folder from the synthetic world, with exact truth.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from mre_jax import models
from mre_jax.data import records, synthetic
from mre_jax.eval import synthetic_judge
from mre_jax.io import export, files
from mre_jax.models import tiny


def write_tiny_model_folder(folder: str | os.PathLike, seed: int = 0, unet: models.UNetConfig = tiny.UNET,
                            reward: bool = True) -> Path:
  """A random diffusers-format InstructPix2Pix folder with the tiny architecture."""
  folder = tiny.write_frozen_parts(folder, seed)
  unet_params = models.init_unet_params(models.RewardUNet(unet, reward=reward), seed)
  export.write_component(folder / "unet", unet.to_diffusers(), export.unet_state_dict(unet_params),
                         export.UNET_WEIGHTS)
  (folder / "model_index.json").write_text(json.dumps(export.MODEL_INDEX))
  return folder


def _scene_with_all_edits(rng, size):
  """A test-split scene and one visible exact edit per category."""
  for _ in range(1000):
    scene = synthetic.sample_scene(rng)
    if synthetic.scene_split(scene) != "test":
      continue
    original = synthetic.to_uint8(synthetic.render_float(scene, size))
    edits = [synthetic.sample_edit(rng, scene, c, size) for c in records.CATEGORIES]
    if all(e is not None and np.sum(np.any(synthetic.to_uint8(e["truth"]) != original, -1)) >= 16
           for e in edits):
      return original, edits
  raise RuntimeError("could not sample a scene that takes all seven edits")


def write_synthetic_real_edit(root: str | os.PathLike, num_photos: int, seed: int = 0, size: int = 64) -> dict:
  """A Real-Edit-format folder from the synthetic world, with exact ground truth.

  Writes <root>/real_edit.json, <root>/photo_<k>.png and, for the synthetic judge backend,
  <root>/truth/<k>_<i>.png and <root>/truth/index.json. Returns {"json", "truth" (paths, str),
  "truths": {item key: truth uint8 [S, S, 3]}}.
  """
  root = Path(root)
  rng = np.random.default_rng([seed, 7])
  listing, entries, truths = {}, [], {}
  (root / "truth").mkdir(parents=True, exist_ok=True)
  for k in range(num_photos):
    original, edits = _scene_with_all_edits(rng, size)
    name = f"photo_{k:03d}.png"
    Image.fromarray(original).save(root / name)
    listing[name] = []
    for i, (category, edit) in enumerate(zip(records.CATEGORIES, edits)):
      instruction = edit["instructions"][int(rng.integers(len(edit["instructions"])))]
      listing[name].append(f"{category}. Synthetic {category.lower()} edit: {instruction}")
      truth = synthetic.to_uint8(edit["truth"])
      Image.fromarray(truth).save(root / "truth" / f"{k:03d}_{i}.png")
      entries.append((original, instruction, f"{k:03d}_{i}.png", edit["failures"]))
      truths[f"{name}#{i}"] = truth
  files.write_json(root / "real_edit.json", listing, indent=1)
  synthetic_judge.write_truth_index(root / "truth" / "index.json", entries)
  return {"json": str(root / "real_edit.json"), "truth": str(root / "truth" / "index.json"), "truths": truths}


def write_synthetic_ip2p(root: str | os.PathLike, num: int, seed: int = 0, size: int = 64) -> dict:
  """An InsPix2Pix-format folder of synthetic examples (PNG, lossless), with ground truth.

  Writes <root>/seeds.json, <root>/synth_<k>/prompt.json, <k>_0.png, <k>_1.png and, for the
  synthetic judge backend, <root>/truth/<k>.png and <root>/truth/index.json. Returns
  {"truth": index path (str), "examples": {name: synthetic.make_example(...)}}.
  """
  root = Path(root)
  (root / "truth").mkdir(parents=True, exist_ok=True)
  seeds, entries, examples = [], [], {}
  for k in range(num):
    ex = synthetic.make_example(k, "train", seed=seed, size=size)
    name = f"synth_{k:05d}"
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate((ex["original"], ex["edited"])):
      Image.fromarray(np.asarray(img)).save(folder / f"{k}_{i}.png")
    files.write_json(folder / "prompt.json", {"edit": ex["instruction"]})
    Image.fromarray(ex["truth"]).save(root / "truth" / f"{k}.png")
    entries.append((ex["original"], ex["instruction"], f"{k}.png", None))
    seeds.append([name, [k]])
    examples[name] = ex
  files.write_json(root / "seeds.json", seeds)
  synthetic_judge.write_truth_index(root / "truth" / "index.json", entries)
  return {"truth": str(root / "truth" / "index.json"), "examples": examples}
