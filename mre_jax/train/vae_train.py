"""The `vae` job: trains a small AutoencoderKL on a data/ builder's images (synthetic_edit).

python main.py --config=configs/vae.py --workdir=W

The frozen VAE of the embedded demo must reconstruct its world: SD 1.5's VAE does that for
photos, a random one for nothing. This job trains one from scratch on the images of a TFDS
builder (originals, exact edits and corrupted edits) and writes it in the diffusers
AutoencoderKL format, so the loading code that reads SD's VAE reads it too:

  W/vae/config.json, W/vae/diffusion_pytorch_model.safetensors   (PyTorch layout)
  W/vae_eval.json    PSNR (dB) of encode -> mode -> decode on the test split, per image kind
  W/metrics.jsonl    loss, reconstruction error and KL every `log_every` steps

Loss: L1 + L2 reconstruction of the decoded posterior sample, plus `kl_weight` times the KL
to a unit Gaussian (as SD's VAE, without the perceptual and adversarial terms), plus
`edge_weight` times the L1 error of the 1-pixel differences (an edge term: L1/L2 alone settle
for soft edges where the latent is ambiguous). `init` starts from a trained VAE (a shipped
name or a folder) and `train_encoder=False` trains only the decoder (post_quant_conv and
decoder), as SD's ft-MSE VAE: the latents, so every latent cache and U-Net trained on them,
stay valid. Training uses
random crops (the VAE is convolutional); evaluation runs on whole images. After training,
`scaling_factor` (1 / the std of the posterior means over training images, SD's convention,
0.18215 for SD 1.5) is written into the config, so that scaled latents have unit variance.
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
import numpy as np
import optax

from mre_jax.data import input_pipeline
from mre_jax.errors import ConfigError
from mre_jax.io import checkpointing, export, files, pretrained, weights
from mre_jax.models import tiny

IMAGE_KINDS = ("original", "truth", "edited")  # the images of a synthetic_edit example


def vae_config(config) -> dict:
  """The diffusers AutoencoderKL config.json for `config.vae` (one down block per width)."""
  v = config.vae
  n = len(v.block_out_channels)
  return {
      "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": v.latent_channels,
      "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
      "block_out_channels": list(v.block_out_channels), "layers_per_block": v.layers_per_block,
      "norm_num_groups": v.norm_num_groups, "act_fn": "silu", "sample_size": config.image_size,
      "scaling_factor": 1.0,
  }


def validate(config) -> None:
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
  if config.num_steps < 1 or config.batch_size < 1:
    raise ConfigError(f"config.num_steps={config.num_steps}, config.batch_size={config.batch_size}: must be >= 1")


def load_images(builder, split: str, limit: int = 0) -> np.ndarray:
  """uint8 [N, S, S, 3]: every image of `IMAGE_KINDS` in the first `limit` (0: all) examples."""
  source = input_pipeline.data_source(builder, split)
  count = len(source) if limit <= 0 else min(limit, len(source))
  images = [source[i][kind] for i in range(count) for kind in IMAGE_KINDS]
  return np.stack(images).astype(np.uint8)


def _posterior(vae, params, x):
  """[B, H, W, 3] in [-1, 1] -> (mean, logvar) of the latent posterior."""
  return pretrained.vae_encode(vae, params, x)


def loss_fn(params, x, rng, *, vae, kl_weight: float, edge_weight: float = 0.0):
  """(loss, (reconstruction error, KL per latent pixel, edge error)) for images x [B, H, W, 3] in [-1, 1]."""
  mean, logvar = _posterior(vae, params, x)
  z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
  y = pretrained.vae_decode(vae, params, z)
  rec = jnp.mean(jnp.abs(y - x)) + jnp.mean((y - x) ** 2)
  kl = 0.5 * jnp.mean(jnp.sum(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar, axis=-1))
  edge = sum(jnp.mean(jnp.abs(jnp.diff(y, axis=a) - jnp.diff(x, axis=a))) for a in (1, 2))
  return rec + kl_weight * kl + edge_weight * edge, (rec, kl, edge)


def train_step(params, opt_state, x, rng, *, vae, tx, kl_weight: float, edge_weight: float = 0.0):
  (loss, (rec, kl, edge)), grads = jax.value_and_grad(
      functools.partial(loss_fn, vae=vae, kl_weight=kl_weight, edge_weight=edge_weight), has_aux=True)(params, x, rng)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, {"loss": loss, "reconstruction": rec, "kl": kl,
                                                           "edge": edge}


ENCODER = ("encoder", "quant_conv")  # the parameters that make the latents


def optimizer(config):
  """Adam on a cosine schedule with global-norm clipping; the encoder is frozen (no update, no
  Adam state) when `config.train_encoder` is False."""
  schedule = optax.cosine_decay_schedule(config.lr, config.num_steps, alpha=0.05)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
  if config.train_encoder:
    return tx
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                               lambda params: {k: "frozen" if k in ENCODER else "train" for k in params})


def _random_crops(images: np.ndarray, rng: np.random.Generator, batch: int, crop: int) -> np.ndarray:
  """float32 [batch, crop, crop, 3] in [-1, 1]: random images, one random crop and flip per batch."""
  x = images[rng.integers(0, len(images), batch)]
  top, left = rng.integers(0, images.shape[1] - crop + 1, 2)
  x = x[:, top:top + crop, left:left + crop]
  if rng.random() < 0.5:
    x = x[:, :, ::-1]
  return x.astype(np.float32) / 127.5 - 1.0


def reconstruct_fn(vae):
  """Jitted (params, images [B, H, W, 3] in [-1, 1]) -> (decoded posterior mode, latent means)."""
  def fn(params, x):
    mean, _ = _posterior(vae, params, x)
    return pretrained.vae_decode(vae, params, mean), mean
  return jax.jit(fn)


def psnr(reference: np.ndarray, decoded: np.ndarray) -> np.ndarray:
  """Per-image PSNR (dB) of uint8 `reference` [N, H, W, 3] against decoded [-1, 1] images."""
  out = np.clip(np.round((np.asarray(decoded, np.float64) + 1.0) * 127.5), 0, 255)
  mse = np.mean((out - reference.astype(np.float64)) ** 2, axis=(1, 2, 3))
  return 10.0 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))


def evaluate(recon, params, images: np.ndarray, batch: int = 96) -> tuple[np.ndarray, np.ndarray]:
  """(per-image PSNR [N], latent means [N, h, w, C]) of encode -> mode -> decode."""
  scores, means = [], []
  for i in range(0, len(images), batch):
    decoded, mean = recon(params, images[i:i + batch].astype(np.float32) / 127.5 - 1.0)
    scores.append(psnr(images[i:i + batch], decoded))
    means.append(np.asarray(mean))
  return np.concatenate(scores), np.concatenate(means)


def psnr_by_kind(scores: np.ndarray) -> dict[str, float]:
  """Mean PSNR per image kind (images are stored kind-interleaved, see `load_images`)."""
  per = scores.reshape(-1, len(IMAGE_KINDS))
  out = {kind: float(per[:, i].mean()) for i, kind in enumerate(IMAGE_KINDS)}
  out["clean"] = float(per[:, :2].mean())  # originals and exact edits: what the editor must reproduce
  return out


def train_vae(config, workdir: str | os.PathLike | None) -> Path:
  """Job: trains the VAE and writes `<workdir>/vae` (diffusers format) and `vae_eval.json`."""
  if not workdir:
    raise ConfigError("--workdir is required: the VAE and its evaluation are written there")
  validate(config)
  workdir = Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  data_dir = config.data.data_dir or str(workdir / "tfds")
  builder = input_pipeline.build_dataset(config.data.name, data_dir, None, config=config.data.builder_config)
  train_images = load_images(builder, "train", config.data.num_train)
  test_images = load_images(builder, "test", config.data.num_test)
  if train_images.shape[1] != config.image_size:
    raise ConfigError(f"config.image_size={config.image_size} but {config.data.name}:{config.data.builder_config} "
                      f"has {train_images.shape[1]} px images")
  if config.init:
    folder = tiny.vae_folder(config.init)
    vae, params = pretrained.load_vae(folder)
    vae_cfg = {k: v for k, v in pretrained.read_config(folder / "vae").items() if k in vae_config(config)}
    if vae_cfg["sample_size"] != config.image_size:
      raise ConfigError(f"config.init={config.init!r} was trained at {vae_cfg['sample_size']} px but "
                        f"config.image_size={config.image_size}")
  else:
    vae_cfg = vae_config(config)
    vae = pretrained.make_vae(vae_cfg)
    params = weights.init_like_torch(pretrained.vae_param_shapes(vae), config.seed)
  # A frozen encoder makes the init's latents: keep its scaling too (caches stay valid bit for bit).
  scaling = None if config.train_encoder else float(vae_cfg["scaling_factor"])
  params = jax.device_put(params)
  tx = optimizer(config)
  opt_state = tx.init(params)
  step_fn = jax.jit(functools.partial(train_step, vae=vae, tx=tx, kl_weight=config.kl_weight,
                                      edge_weight=config.edge_weight), donate_argnums=(0, 1))
  rng, key = np.random.default_rng(config.seed), jax.random.PRNGKey(config.seed)
  log = open(workdir / "metrics.jsonl", "a")
  t0 = time.time()
  for step in range(1, config.num_steps + 1):
    x = _random_crops(train_images, rng, config.batch_size, config.crop_size)
    params, opt_state, metrics = step_fn(params, opt_state, x, jax.random.fold_in(key, step))
    if step % config.log_every == 0 or step == config.num_steps:
      scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
      log.write(json.dumps({"step": step, **scalars, "seconds": time.time() - t0}) + "\n")
      log.flush()
      print(f"vae step {step}/{config.num_steps}: loss {scalars['loss']:.4f} ({time.time() - t0:.0f} s)", flush=True)
    if (config.eval_every and step % config.eval_every == 0) or step == config.num_steps:
      _finish(config, workdir, vae, vae_cfg, jax.device_get(params), train_images, test_images, step, time.time() - t0,
              scaling)
  log.close()
  return workdir / "vae"


def _finish(config, workdir: Path, vae, vae_cfg: dict, params: Any, train_images, test_images, step: int,
            seconds: float, scaling: float | None = None) -> None:
  """Scaling factor (measured unless given), test PSNR, and the diffusers folder of the params at
  `step`, written atomically."""
  recon = reconstruct_fn(vae)
  if scaling is None:
    _, means = evaluate(recon, params, train_images[:3 * 500])
    scaling = float(1.0 / np.std(means))
  scores, _ = evaluate(recon, params, test_images)
  report = {"step": step, "psnr_db": psnr_by_kind(scores), "scaling_factor": scaling, "train_seconds": seconds,
            "test_images": int(len(test_images)), "config": config.to_dict()}
  tmp = checkpointing.staging_dir(workdir / "vae")
  export.write_component(tmp, {**vae_cfg, "scaling_factor": scaling}, pretrained.vae_state_dict(params),
                         export.UNET_WEIGHTS)
  checkpointing.publish(tmp, workdir / "vae")
  files.write_json(workdir / "vae_eval.json", report, indent=2)
  print(f"vae step {step} test PSNR (dB): " + ", ".join(f"{k} {v:.2f}" for k, v in report["psnr_db"].items())
        + f"; scaling_factor {scaling:.4f}; wrote {workdir / 'vae'}", flush=True)
