"""The `vae` job: trains a small AutoencoderKL on a data/ builder's images (synthetic_edit).

python main.py --config=configs/vae.py --workdir=W

The model, loss and measures are mre_jax.train.vae_train's. The VAE is written in the
diffusers AutoencoderKL format, so the loading code that reads SD's VAE reads it too:

  W/vae/config.json, W/vae/diffusion_pytorch_model.safetensors   (PyTorch layout)
  W/vae_eval.json    PSNR (dB) of encode -> mode -> decode on the test split, per image kind
  W/metrics.jsonl    loss, reconstruction error and KL every `log_every` steps

Both W/vae and W/vae_eval.json are rewritten (atomically) at every evaluation, every
`eval_every` steps and at the end.
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mre_jax import models
from mre_jax.data import input_pipeline
from mre_jax.errors import ConfigError, require_workdir
from mre_jax.io import checkpointing, export, files, pretrained, weights
from mre_jax.models import tiny
from mre_jax.train import vae_train


def check_config(config: ml_collections.ConfigDict) -> None:
  """The architecture, crop and schedule fields (ConfigError naming field and value)."""
  v = config.vae
  if any(c % v.norm_num_groups for c in v.block_out_channels):
    raise ConfigError(f"config.vae.block_out_channels={tuple(v.block_out_channels)}: each must be divisible by "
                      f"config.vae.norm_num_groups={v.norm_num_groups}")
  factor = 2 ** (len(v.block_out_channels) - 1)
  if config.crop_size % factor or config.crop_size > config.image_size:
    raise ConfigError(f"config.crop_size={config.crop_size}: must be a multiple of the VAE's factor {factor} and "
                      f"at most config.image_size={config.image_size}")
  if not config.init and not config.train_encoder:
    raise ConfigError("config.train_encoder=False needs config.init (a trained VAE whose encoder to keep)")
  if config.scale_weight < 0:
    raise ConfigError(f"config.scale_weight={config.scale_weight}: must be >= 0 (0: no scale-equivariance term)")
  if config.scale_weight > 0 and (not config.train_encoder or config.crop_size % (2 * factor)):
    raise ConfigError(f"config.scale_weight={config.scale_weight} shapes the latents: it needs config.train_encoder=True "
                      f"and config.crop_size (={config.crop_size}) a multiple of twice the VAE's factor {factor}")
  if config.vae.image_condition_width < 0:
    raise ConfigError(f"config.vae.image_condition_width={config.vae.image_condition_width}: must be >= 0 "
                      "(0: SD's decoder)")
  if config.latent_noise < 0:
    raise ConfigError(f"config.latent_noise={config.latent_noise}: must be >= 0 (0: decode the latents as they are)")
  if config.adv_weight < 0:
    raise ConfigError(f"config.adv_weight={config.adv_weight}: must be >= 0 (0: no discriminator)")
  if config.num_steps < 1 or config.batch_size < 1:
    raise ConfigError(f"config.num_steps={config.num_steps}, config.batch_size={config.batch_size}: must be >= 1")


def train_vae(config: ml_collections.ConfigDict, workdir: str | os.PathLike | None) -> Path:
  """Job: trains the VAE and writes `<workdir>/vae` (diffusers format) and `vae_eval.json`."""
  workdir = require_workdir(workdir, "the VAE and its evaluation are written there")
  check_config(config)
  workdir.mkdir(parents=True, exist_ok=True)
  images = _load_data(config, workdir)
  vae, vae_cfg, params = _init_vae(config)
  # A frozen encoder makes the init's latents: keep its scaling too (caches stay valid bit for bit).
  scaling = None if config.train_encoder else float(vae_cfg["scaling_factor"])
  _train(config, workdir, vae, vae_cfg, params, images, scaling)
  return workdir / "vae"


def _load_data(config: ml_collections.ConfigDict, workdir: Path) -> tuple[np.ndarray, np.ndarray]:
  """(train, test) uint8 images of config.data's builder (built in <workdir>/tfds unless data_dir is set)."""
  data_dir = config.data.data_dir or str(workdir / "tfds")
  builder = input_pipeline.build_dataset(config.data.name, data_dir, None, config=config.data.builder_config)
  train_images = vae_train.load_images(builder, "train", config.data.num_train)
  test_images = vae_train.load_images(builder, "test", config.data.num_test)
  if train_images.shape[1] != config.image_size:
    raise ConfigError(f"config.image_size={config.image_size} but {config.data.name}:{config.data.builder_config} "
                      f"has {train_images.shape[1]} px images")
  return train_images, test_images


def _init_vae(config: ml_collections.ConfigDict) -> tuple[models.AutoencoderKL, dict, Any]:
  """(module, diffusers config, params): config.init's trained VAE, else a fresh one of config.vae."""
  width = config.vae.image_condition_width
  if config.init:
    folder = tiny.vae_folder(config.init)
    vae, params = pretrained.load_vae(folder)
    keys = {*vae_train.vae_config(config), "image_condition_width"}
    vae_cfg = {k: v for k, v in pretrained.read_config(folder / "vae").items() if k in keys}
    if vae_cfg["sample_size"] != config.image_size:
      raise ConfigError(f"config.init={config.init!r} was trained at {vae_cfg['sample_size']} px but "
                        f"config.image_size={config.image_size}")
    if width and vae_cfg.get("image_condition_width", 0) not in (0, width):
      raise ConfigError(f"config.vae.image_condition_width={width} but config.init={config.init!r} has an "
                        f"image-conditioned decoder of width {vae_cfg['image_condition_width']}")
    if width and not vae_cfg.get("image_condition_width"):
      vae, params = vae_train.add_image_condition(vae, params, width, config.seed)
      vae_cfg["image_condition_width"] = width
    return vae, vae_cfg, params
  vae_cfg = vae_train.vae_config(config)
  vae = pretrained.make_vae(vae_cfg)
  return vae, vae_cfg, weights.init_like_torch(pretrained.vae_param_shapes(vae), config.seed)


def _train(config: ml_collections.ConfigDict, workdir: Path, vae: models.AutoencoderKL, vae_cfg: dict, params: Any,
           images: tuple[np.ndarray, np.ndarray], scaling: float | None) -> None:
  """The optimiser loop: metrics to <workdir>/metrics.jsonl, an evaluation (`_finish`) every eval_every steps."""
  train_images, test_images = images
  params = jax.device_put(params)
  tx = vae_train.optimizer(config)
  opt_state = tx.init(params)
  step_fn = jax.jit(functools.partial(vae_train.train_step, vae=vae, tx=tx, kl_weight=config.kl_weight,
                                      edge_weight=config.edge_weight, scale_weight=config.scale_weight,
                                      latent_noise=config.latent_noise), donate_argnums=(0, 1))
  if config.adv_weight > 0:  # step_fn keeps the discriminator's params and Adam state in `disc_state`
    disc, disc_tx = vae_train.Discriminator(), vae_train.optimizer(config)
    disc_params = disc.init(jax.random.PRNGKey(config.seed + 1),
                            jnp.zeros((1, config.crop_size, config.crop_size, 3)))["params"]
    adv_fn = jax.jit(functools.partial(vae_train.adversarial_step, vae=vae, tx=tx, disc=disc, disc_tx=disc_tx,
                                       kl_weight=config.kl_weight, edge_weight=config.edge_weight,
                                       adv_weight=config.adv_weight, scale_weight=config.scale_weight,
                                       latent_noise=config.latent_noise),
                     donate_argnums=(0, 1, 2, 3))
    disc_state = [disc_params, disc_tx.init(disc_params)]

    def step_fn(params, opt_state, x, rng, originals):
      params, opt_state, disc_state[0], disc_state[1], metrics = adv_fn(params, opt_state, *disc_state, x, rng,
                                                                        originals=originals)
      return params, opt_state, metrics
  rng, key = np.random.default_rng(config.seed), jax.random.PRNGKey(config.seed)
  t0 = time.time()
  with open(workdir / "metrics.jsonl", "a") as log:
    for step in range(1, config.num_steps + 1):
      x, originals = vae_train.random_crops(train_images, rng, config.batch_size, config.crop_size)
      params, opt_state, metrics = step_fn(params, opt_state, x, jax.random.fold_in(key, step), originals=originals)
      if step % config.log_every == 0 or step == config.num_steps:
        scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
        log.write(json.dumps({"step": step, **scalars, "seconds": time.time() - t0}) + "\n")
        log.flush()
        print(f"vae step {step}/{config.num_steps}: loss {scalars['loss']:.4f} ({time.time() - t0:.0f} s)", flush=True)
      if (config.eval_every and step % config.eval_every == 0) or step == config.num_steps:
        _finish(config, workdir, vae, vae_cfg, jax.device_get(params), train_images, test_images, step,
                time.time() - t0, scaling)


def _finish(config: ml_collections.ConfigDict, workdir: Path, vae: models.AutoencoderKL, vae_cfg: dict, params: Any,
            train_images: np.ndarray, test_images: np.ndarray, step: int, seconds: float,
            scaling: float | None = None) -> None:
  """Scaling factor (measured unless given), test PSNR, and the diffusers folder of the params at
  `step`, written atomically."""
  recon = vae_train.reconstruct_fn(vae)
  if scaling is None:
    _, means = vae_train.evaluate(recon, params, train_images[:3 * 500])
    scaling = float(1.0 / np.std(means))
  scores, _ = vae_train.evaluate(recon, params, test_images)
  report = {"step": step, "psnr_db": vae_train.psnr_by_kind(scores), "scaling_factor": scaling,
            "train_seconds": seconds, "test_images": int(len(test_images)), "config": config.to_dict()}
  tmp = checkpointing.staging_dir(workdir / "vae")
  export.write_component(tmp, {**vae_cfg, "scaling_factor": scaling}, pretrained.vae_state_dict(params),
                         export.UNET_WEIGHTS)
  checkpointing.publish(tmp, workdir / "vae")
  files.write_json(workdir / "vae_eval.json", report, indent=2)
  print(f"vae step {step} test PSNR (dB): " + ", ".join(f"{k} {v:.2f}" for k, v in report["psnr_db"].items())
        + f"; scaling_factor {scaling:.4f}; wrote {workdir / 'vae'}", flush=True)
