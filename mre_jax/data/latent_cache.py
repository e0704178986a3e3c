"""Precomputed outputs of the frozen encoders, read by the input pipeline instead of images.

With the VAE and the text encoder frozen, their outputs can be computed once
(`train.precompute_latents`) and training then runs only the U-Net. A cache folder holds

  index.json                       {"count": N, "shards": ["part-0-of-1", ...]}
  part-<p>-of-<n>.<field>.npy      one array per field and process, N_p rows each

per example (h = w = crop_size / 8, D = text width):
  latent_mean, latent_logvar  float32 [h, w, 4]  VAE posterior of the edited image (unscaled)
  cond                        float32 [h, w, 4]  VAE mode of the original image (unscaled)
  context                     float32 [77, D]    CLIP last hidden states of the instruction
  reward_embeds               float32 [D]        CLIP pooled output of the joined reward text
  scores                      float32 [3]

index.json also records what made the cache (`source`: the data's name, builder config, split,
crop size and resize mode, and a SHA-256 of the VAE encoder's and of the text encoder's
parameters); training from it checks that record against its own config and frozen encoders
(`check_source`), so a cache is never silently reused for other data or other encoders. A VAE
whose decoder alone differs (synthetic_64px_sharp) reads the same cache.

Images are encoded without random crop or flip, and with one instruction wording per example
(drawn with the seed); `prepare` flips latents and cond together, the usual approximation of an
image flip in latent space. Training from a cache is therefore close to, not identical with,
training from images.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from mre_jax.io import files

FIELDS = ("latent_mean", "latent_logvar", "cond", "context", "reward_embeds", "scores")
_SPATIAL = ("latent_mean", "latent_logvar", "cond")
INDEX = "index.json"


class CacheSource:
  """Random-access source over a cache folder (memory-mapped; grain reads it like TFDS)."""

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    index_file = self.path / INDEX
    if not index_file.is_file():
      raise FileNotFoundError(f"{index_file}: missing; make a latent cache with the precompute job "
                              "(python main.py --config=configs/train.py --config.job=precompute ...)")
    index = json.loads(index_file.read_text())
    self._shards = [{f: np.load(self.path / f"{shard}.{f}.npy", mmap_mode="r") for f in FIELDS}
                    for shard in index["shards"]]
    self._starts = np.cumsum([0] + [len(s["scores"]) for s in self._shards])

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    shard = int(np.searchsorted(self._starts, i, side="right") - 1)
    row = i - self._starts[shard]
    return {f: np.array(self._shards[shard][f][row]) for f in FIELDS}


def prepare(example: dict[str, np.ndarray], rng: np.random.Generator, *, flip: bool) -> dict[str, np.ndarray]:
  """Random horizontal flip of the spatial fields, the same for all of them."""
  if flip and rng.random() < 0.5:
    example = {k: v[:, ::-1].copy() if k in _SPATIAL else v for k, v in example.items()}
  return example


def write_shard(path: Path, name: str, arrays: dict[str, np.ndarray]) -> None:
  """Writes one process's rows, each file through a temporary name."""
  for field in FIELDS:
    array = np.ascontiguousarray(arrays[field], np.float32)
    files.write_atomic(path / f"{name}.{field}.npy", lambda f: np.save(f, array))


def write_index(path: Path, shards: list[str], source: dict[str, Any] | None = None) -> None:
  """Written last (by process 0): a cache without its index is never read. `source`: see
  `describe_source`."""
  count = sum(len(np.load(path / f"{s}.scores.npy", mmap_mode="r")) for s in shards)
  files.write_json(path / INDEX, {"count": count, "shards": shards, "source": source})


def params_digest(params: Any) -> str:
  """SHA-256 of a parameter tree: every leaf's path, shape and float32 bytes, in path order."""
  h = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(params), key=lambda kv: jax.tree_util.keystr(kv[0])):
    a = np.ascontiguousarray(np.asarray(leaf, np.float32))
    h.update(f"{jax.tree_util.keystr(path)}{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()


# The VAE's parameters that make the posterior (its decoder does not change the cache).
_VAE_ENCODER = ("encoder", "quant_conv")


def describe_source(data: Any, vae_params: dict, text_params: Any) -> dict[str, Any]:
  """What a cache's rows depend on: `data` (config.data) fields and the frozen encoders' digests."""
  missing = [k for k in _VAE_ENCODER if k not in vae_params]
  if missing:
    raise ValueError(f"latent cache: VAE params lack {missing} (have {sorted(vae_params)})")
  return {"data": {k: data[k] for k in ("name", "builder_config", "split", "crop_size", "resize")},
          "vae_encoder": params_digest({k: vae_params[k] for k in _VAE_ENCODER}),
          "text_encoder": params_digest(text_params)}


def check_source(path: str | os.PathLike, expected: dict[str, Any]) -> bool:
  """Raises ValueError naming the first difference between the cache's recorded source and
  `expected` (`describe_source` of this run). False, after a warning, for a cache that records
  none (written before the record existed): it cannot be checked. True when it matches."""
  index_file = Path(path) / INDEX
  recorded = json.loads(index_file.read_text()).get("source")
  if recorded is None:
    print(f"warning: {index_file} does not record which data and encoders made it; it is used unchecked")
    return False
  have_data = recorded.get("data") or {}
  diff = [f"config.data.{k}={v!r} (the cache: {have_data.get(k)!r})"
          for k, v in expected["data"].items() if have_data.get(k) != v]
  if diff:
    raise ValueError(f"{index_file}: this latent cache was made from other data: {'; '.join(diff)}. "
                     "Point config.data.latent_cache elsewhere (or 'auto' in a new workdir)")
  for key in ("vae_encoder", "text_encoder"):
    if recorded.get(key) != expected[key]:
      raise ValueError(f"{index_file}: this latent cache was made by another {key.replace('_', ' ')} "
                       f"(SHA-256 {str(recorded.get(key))[:12]}..., this run's {expected[key][:12]}...). Point "
                       "config.data.latent_cache elsewhere (or 'auto' in a new workdir)")
  return True
