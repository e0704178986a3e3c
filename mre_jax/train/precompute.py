"""The precompute job: the frozen encoders' outputs for the training data, written once as a
latent cache (mre_jax.data.latent_cache) so that training runs only the U-Net."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from mre_jax import ops
from mre_jax.data import input_pipeline, latent_cache, tokens
from mre_jax.errors import ConfigError, require_workdir
from mre_jax.train import sharding
from mre_jax.train.setup import build_data, initialize_distributed, prepare_workdir, sync
from mre_jax.train.trainer import BATCH_KEYS, Frozen, encode_batch, load_frozen

if TYPE_CHECKING:
  import tensorflow_datasets as tfds


def precompute_latents(config: ml_collections.ConfigDict, workdir: str | os.PathLike | None) -> Path:
  """Job (configs/train.py with --config.job=precompute): encodes the training data once.

  Writes `config.data.latent_cache` (see latent_cache); training with that field set then runs
  only the U-Net. Images are encoded uncropped-at-random and unflipped; each process encodes
  its slice, split over all of its devices.
  """
  workdir = require_workdir(workdir, "the frozen encoders are read from (or written to) it")
  if not config.data.latent_cache or config.data.latent_cache == "auto":
    raise ConfigError("config.data.latent_cache is required (job 'precompute'): the folder to write")
  cache = Path(config.data.latent_cache).absolute()
  if (cache / latent_cache.INDEX).exists():
    raise FileExistsError(f"config.data.latent_cache={cache}: already holds a cache")
  initialize_distributed(config)
  workdir.mkdir(parents=True, exist_ok=True)
  prepare_workdir(config, workdir)
  frozen, fparams = load_frozen(workdir, jnp.float32, ops.Kernels.from_config(config.model, "config.model"))
  return write_latent_cache(config, build_data(config, workdir), frozen, fparams, cache)


def write_latent_cache(config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder, frozen: Frozen,
                       fparams: Any, cache: str | os.PathLike, mesh: Mesh | None = None) -> Path:
  """Encodes `config.data.split` of `builder` with the frozen encoders into `cache`.

  Data parallel over `mesh` (default: this process's devices, `sharding.local_mesh`): the encoders'
  params are replicated, each batch is padded to a multiple of the device count and split over them.
  """
  cache, data = Path(cache), config.data
  ds = input_pipeline.create_dataset(
      input_pipeline.data_source(builder, data.split), global_batch_size=config.batch_size,
      crop_size=data.crop_size, tokenize_fn=tokens.tokenize_fn(frozen.tokenizer), seed=config.seed,
      resize=data.resize, flip=False, shuffle=False, num_epochs=1)
  mesh = sharding.local_mesh() if mesh is None else mesh
  split, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  encode = jax.jit(functools.partial(encode_batch, frozen), in_shardings=(replicated, split), out_shardings=split)
  fparams = jax.device_put(fparams, replicated)
  rows = {f: [] for f in latent_cache.FIELDS}
  for batch in ds:
    padded, size = sharding.pad_batch({k: batch[k] for k in BATCH_KEYS}, mesh.size)
    out = jax.device_get(encode(fparams, padded))
    for f in latent_cache.FIELDS:
      rows[f].append(np.asarray(out[f][:size], np.float32))
  index, count = jax.process_index(), jax.process_count()
  shards = [f"part-{i}-of-{count}" for i in range(count)]
  latent_cache.write_shard(cache, shards[index], {f: np.concatenate(v) for f, v in rows.items()})
  sync("latent cache written")
  if index == 0:
    latent_cache.write_index(cache, shards, latent_cache.describe_source(config.data, fparams["vae"], fparams["text"]))
    print(f"wrote latent cache {cache}: {sum(len(v) for v in rows['scores'])} examples per process")
  sync("latent cache indexed")
  return cache
