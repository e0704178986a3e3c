"""Before the loop: config checks, the workdir's frozen parts and model spec, processes, and the
data (TFDS builder -> grain iterator, or the latent cache)."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grain
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from mre_jax import models, ops
from mre_jax.data import input_pipeline, latent_cache, tokens
from mre_jax.errors import ConfigError
from mre_jax.io import checkpointing, export
from mre_jax.models import tiny
from mre_jax.train.trainer import Frozen, lr_schedule

if TYPE_CHECKING:
  import tensorflow_datasets as tfds


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Fails on bad values before anything is compiled, naming the field."""
  if config.optim.lr <= 0:
    raise ConfigError(f"config.optim.lr={config.optim.lr}: must be > 0")
  if config.num_steps < 1:
    raise ConfigError(f"config.num_steps={config.num_steps}: must be >= 1")
  lr_schedule(config.optim, config.num_steps)  # an unknown schedule, or cosine without room, is a ConfigError
  if config.stage not in (1, 2):
    raise ConfigError(f"config.stage={config.stage!r}: expected 1 (InstructPix2Pix) or 2 (MRE)")
  models.parse_dtype(config.model.dtype, "config.model.dtype")
  ops.Kernels.from_config(config.model, "config.model")  # a bad kernel name is a ConfigError
  if config.model.init not in ("tiny", "pretrained"):
    raise ConfigError(f"config.model.init={config.model.init!r}: expected 'tiny' or 'pretrained'")
  if config.model.init == "pretrained" and not Path(config.model.pretrained or "/nonexistent").is_dir():
    raise ConfigError(f"config.model.pretrained={config.model.pretrained!r}: not a folder (a diffusers-format "
                      "model folder or a project checkpoint)")
  micro = config.batch_size // max(config.grad_accum_steps, 1)
  if config.grad_accum_steps < 1 or config.batch_size % config.grad_accum_steps:
    raise ConfigError(f"config.batch_size={config.batch_size} is not divisible by "
                      f"config.grad_accum_steps={config.grad_accum_steps}")
  if micro % num_devices:
    raise ConfigError(f"config.batch_size={config.batch_size} / grad_accum_steps={config.grad_accum_steps} = "
                      f"{micro} is not divisible by the {num_devices} devices of the mesh")
  if config.noise_offset < 0:
    raise ConfigError(f"config.noise_offset={config.noise_offset}: must be >= 0")
  if not 0 <= config.noise_pyramid < 1:
    raise ConfigError(f"config.noise_pyramid={config.noise_pyramid}: must be in [0, 1)")
  if config.snr_gamma < 0:
    raise ConfigError(f"config.snr_gamma={config.snr_gamma}: must be >= 0 (0: plain MSE)")
  if not 0 <= config.cond_dropout < 1 / 3:
    raise ConfigError(f"config.cond_dropout={config.cond_dropout}: must be in [0, 1/3)")


def prepare_workdir(config: ml_collections.ConfigDict, workdir: Path) -> tuple[checkpointing.ModelSpec, Any]:
  """Writes the frozen parts into a new workdir; reads the spec of an old one.

  Returns (spec, U-Net params when they had to be loaded to learn the spec, else None).
  """
  if checkpointing.is_checkpoint(workdir):
    return checkpointing.read_spec(workdir), None
  reward = config.stage == 2 and config.model.reward
  if config.model.init == "tiny":
    unet_cfg = dataclasses.replace(tiny.UNET, **config.model.get("unet", {}))
    spec, params = checkpointing.ModelSpec(unet_cfg, reward, source="random tiny"), None
  elif checkpointing.is_checkpoint(config.model.pretrained):
    source = checkpointing.read_spec(config.model.pretrained)
    spec, params = dataclasses.replace(source, reward=reward), None
  else:
    spec, params = export.unet_from_diffusers(config.model.pretrained, reward=reward, seed=config.seed)
  if jax.process_index() == 0:
    tmp = checkpointing.staging_dir(workdir / checkpointing.FROZEN_DIR)
    if config.model.init == "tiny":
      tiny.write_frozen_parts(tmp, seed=config.seed, vae=config.model.get("vae", ""),
                              scheduler=dict(config.model.get("scheduler", {})),
                              text_encoder=config.model.get("text_encoder", ""))
    else:
      source = config.model.pretrained
      source = checkpointing.frozen_dir(source) if checkpointing.is_checkpoint(source) else source
      tmp.rmdir()
      export.copy_frozen_parts(source, tmp)
    checkpointing.publish(tmp, workdir / checkpointing.FROZEN_DIR)
  sync("frozen parts written")
  return spec, params


def sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
  d = config.distributed
  if not d.initialize:
    return
  kwargs = {}  # fields left unset come from the environment (SLURM, Cloud TPU, ...)
  if d.coordinator_address:
    kwargs["coordinator_address"] = d.coordinator_address
  if d.num_processes > 0:
    kwargs["num_processes"] = d.num_processes
  if d.process_id >= 0:
    kwargs["process_id"] = d.process_id
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU-only runs need it; GPUs ignore it
  jax.distributed.initialize(**kwargs)


def build_data(config: ml_collections.ConfigDict, workdir: Path) -> tfds.core.DatasetBuilder:
  """The prepared TFDS builder of `config.data` (process 0 builds it on first use)."""
  data = config.data
  data_dir = data.data_dir or str(workdir / "tfds")
  kwargs = {"config": data.builder_config} if data.builder_config else {}
  if jax.process_index() == 0:  # one process builds; the others read what it wrote
    input_pipeline.build_dataset(data.name, data_dir, data.manual_dir or None, **kwargs)
  sync("dataset built")
  return input_pipeline.build_dataset(data.name, data_dir, data.manual_dir or None, **kwargs)


def cache_path(config: ml_collections.ConfigDict, workdir: Path) -> str:
  """The latent cache to train from: "" (none), `<workdir>/latents` for "auto", else the field."""
  cache = config.data.latent_cache
  return str(workdir / "latents") if cache == "auto" else cache


def make_data_iterator(config: ml_collections.ConfigDict, frozen: Frozen, workdir: Path,
                       builder: tfds.core.DatasetBuilder | None
                       ) -> tuple[grain.DatasetIterator, dict[str, np.ndarray] | None]:
  """(checkpointable iterator of this process's batches, sample-grid batch)."""
  data = config.data
  tokenize_fn = tokens.tokenize_fn(frozen.tokenizer)
  cache = cache_path(config, workdir)
  if cache:  # precomputed encoder outputs
    ds = input_pipeline.create_dataset(
        latent_cache.CacheSource(cache), global_batch_size=config.batch_size, seed=config.seed,
        prepare_fn=functools.partial(latent_cache.prepare, flip=data.flip))
    data_iter = input_pipeline.create_iterator(ds, worker_count=data.worker_count, prefetch_buffer_size=data.prefetch)
  else:
    data_iter = input_pipeline.create_input_iterator(
        builder, data.split, global_batch_size=config.batch_size, crop_size=data.crop_size, tokenize_fn=tokenize_fn,
        seed=config.seed, resize=data.resize, flip=data.flip, worker_count=data.worker_count,
        prefetch_buffer_size=data.prefetch)
  if builder is None or not config.sample.every:
    return data_iter, None
  # The same first examples on every process, unshuffled and unflipped: the sample grid's inputs
  # (held out from training where the builder has the sample split).
  split = config.sample.split if config.sample.split in builder.info.splits else data.split
  sample_ds = input_pipeline.create_dataset(
      input_pipeline.data_source(builder, split), global_batch_size=config.sample.count,
      crop_size=data.crop_size, tokenize_fn=tokenize_fn, seed=config.seed, resize=data.resize, flip=False,
      shuffle=False, process_index=0, process_count=1, keep_truth="truth" in builder.info.features)
  return data_iter, sample_ds[0]
