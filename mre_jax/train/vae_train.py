"""A small AutoencoderKL trained on a data/ builder's images (synthetic_edit): model, loss, measures.

The frozen VAE of the embedded demo must reconstruct its world: SD 1.5's VAE does that for
photos, a random one for nothing. The `vae` job (mre_jax/jobs/vae.py) trains one from scratch
on the images of a TFDS builder (originals, exact edits and corrupted edits) with these pieces
and writes it in the diffusers AutoencoderKL format.

Loss: L1 + L2 reconstruction of the decoded posterior sample, plus `kl_weight` times the KL
to a unit Gaussian (as SD's VAE, without the perceptual and adversarial terms), plus
`edge_weight` times the L1 error of the 1-pixel differences (an edge term: L1/L2 alone settle
for soft edges where the latent is ambiguous), plus `scale_weight` times `scale_error` (scale
equivariance: latents whose spectrum is an image's). `adv_weight` > 0 adds SD's adversarial
term: a small PatchGAN `Discriminator` (hinge loss) and the decoder's generator loss, weighted
adaptively as in taming-transformers (adv_weight x the ratio of the reconstruction's to the adversarial term's
gradient norm at the decoder's last layer). L1/L2 and the edge term leave the decoder's edges soft;
the adversarial term sharpens them (docs/experiments.md, "A sharper decoder"). `init` starts from a trained VAE (a shipped
name or a folder) and `train_encoder=False` trains only the decoder (post_quant_conv and
decoder), as SD's ft-MSE VAE: the latents, so every latent cache and U-Net trained on them,
stay valid. An image-conditioned decoder (`config.vae.image_condition_width`, models/vae.py;
`add_image_condition` extends an init's) sees each image's example original, in training and
evaluation; `latent_noise` > 0 decodes latents with noise (`perturb_latents`), as a U-Net's
latents are a little off. Training uses random crops (the VAE is convolutional); evaluation runs on whole
images. After training, `scaling_factor` (1 / the std of the posterior means over training
images, SD's convention, 0.18215 for SD 1.5) is written into the config, so that scaled
latents have unit variance.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn

from mre_jax import models
from mre_jax.data import input_pipeline
from mre_jax.io import pretrained, weights

if TYPE_CHECKING:
  import tensorflow_datasets as tfds

IMAGE_KINDS = ("original", "truth", "edited")  # the images of a synthetic_edit example
# (params, images [B, H, W, 3] in [-1, 1], their originals) -> (decoded posterior mode, latent means)
ReconstructFn = Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def vae_config(config: ml_collections.ConfigDict) -> dict:
  """The diffusers AutoencoderKL config.json for `config.vae` (one down block per width)."""
  v = config.vae
  n = len(v.block_out_channels)
  conditioned = {"image_condition_width": v.image_condition_width} if v.image_condition_width else {}
  return {
      "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": v.latent_channels,
      "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
      "block_out_channels": list(v.block_out_channels), "layers_per_block": v.layers_per_block,
      "norm_num_groups": v.norm_num_groups, "act_fn": "silu", "sample_size": config.image_size,
      "scaling_factor": 1.0, **conditioned,
  }


def load_images(builder: tfds.core.DatasetBuilder, split: str, limit: int = 0) -> np.ndarray:
  """uint8 [N, S, S, 3]: every image of `IMAGE_KINDS` in the first `limit` (0: all) examples."""
  source = input_pipeline.data_source(builder, split)
  count = len(source) if limit <= 0 else min(limit, len(source))
  images = [source[i][kind] for i in range(count) for kind in IMAGE_KINDS]
  return np.stack(images).astype(np.uint8)


def _posterior(vae, params, x):
  """[B, H, W, 3] in [-1, 1] -> (mean, logvar) of the latent posterior."""
  return pretrained.vae_encode(vae, params, x)


def perturb_latents(rng: jax.Array, mean: jax.Array, strength: float) -> jax.Array:
  """Gaussian noise for latents `mean` [B, h, w, C]: per image, of std u x strength x the batch's latent
  std, u ~ U(0, 1). A decoder trained on it decodes a diffusion model's slightly-off latents (an
  image-conditioned one learns to take their edges from the input image)."""
  amount, noise = jax.random.split(rng)
  scale = jax.random.uniform(amount, (mean.shape[0],) + (1,) * (mean.ndim - 1)) * strength
  return scale * jax.lax.stop_gradient(jnp.std(mean)) * jax.random.normal(noise, mean.shape)


def _reconstruct(vae, params, x, rng, originals=None, latent_noise=0.0):
  """(decoded posterior sample (plus `perturb_latents` noise of `latent_noise`), mean, logvar) for images
  x [B, H, W, 3] in [-1, 1] (an image-conditioned decoder sees `originals`, the inputs of the edits x
  come from)."""
  mean, logvar = _posterior(vae, params, x)
  z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
  if latent_noise > 0:
    z = z + perturb_latents(jax.random.fold_in(rng, 1), mean, latent_noise)
  return pretrained.vae_decode(vae, params, z, originals), mean, logvar


def _loss_terms(x, y, mean, logvar, kl_weight, edge_weight):
  """(loss, (reconstruction error, KL per latent pixel, edge error)) of decoded y for images x."""
  rec = jnp.mean(jnp.abs(y - x)) + jnp.mean((y - x) ** 2)
  kl = 0.5 * jnp.mean(jnp.sum(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar, axis=-1))
  edge = sum(jnp.mean(jnp.abs(jnp.diff(y, axis=a) - jnp.diff(x, axis=a))) for a in (1, 2))
  return rec + kl_weight * kl + edge_weight * edge, (rec, kl, edge)


def scale_error(vae: models.AutoencoderKL, params: Any, x: jax.Array, mean: jax.Array,
                originals: jax.Array | None = None) -> jax.Array:
  """Scale equivariance (Skorokhodov et al. 2025, "Improving the Diffusability of Autoencoders"):
  L1 + L2 error of the decoded 2x-downsampled latent means against the 2x-downsampled images.
  It trains the encoder to keep the latents' high frequencies low, as an image's are, so that a
  diffusion model's coarse-to-fine sampling suits them."""
  half = lambda a: nn.avg_pool(a, (2, 2), strides=(2, 2))
  err = pretrained.vae_decode(vae, params, half(mean), None if originals is None else half(originals)) - half(x)
  return jnp.mean(jnp.abs(err)) + jnp.mean(err ** 2)


def _objective(vae, params, x, rng, kl_weight, edge_weight, scale_weight, originals=None, latent_noise=0.0):
  """(loss, (reconstruction, KL, edge, scale errors), decoded images)."""
  y, mean, logvar = _reconstruct(vae, params, x, rng, originals, latent_noise)
  loss, (rec, kl, edge) = _loss_terms(x, y, mean, logvar, kl_weight, edge_weight)
  scale = scale_error(vae, params, x, mean, originals) if scale_weight > 0 else jnp.zeros(())
  return loss + scale_weight * scale, (rec, kl, edge, scale), y


def loss_fn(params: Any, x: jax.Array, rng: jax.Array, *, vae: models.AutoencoderKL, kl_weight: float,
            edge_weight: float = 0.0, scale_weight: float = 0.0, originals: jax.Array | None = None,
            latent_noise: float = 0.0) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array, jax.Array]]:
  """(loss, (reconstruction, KL per latent pixel, edge, scale errors)) for images x [B, H, W, 3] in [-1, 1];
  `originals` (the same shape) are what an image-conditioned decoder sees; `latent_noise`: see
  `perturb_latents`."""
  loss, aux, _ = _objective(vae, params, x, rng, kl_weight, edge_weight, scale_weight, originals, latent_noise)
  return loss, aux


def train_step(params: Any, opt_state: optax.OptState, x: jax.Array, rng: jax.Array, *, vae: models.AutoencoderKL,
               tx: optax.GradientTransformation, kl_weight: float, edge_weight: float = 0.0, scale_weight: float = 0.0,
               originals: jax.Array | None = None, latent_noise: float = 0.0
               ) -> tuple[Any, optax.OptState, dict[str, jax.Array]]:
  (loss, (rec, kl, edge, scale)), grads = jax.value_and_grad(
      functools.partial(loss_fn, vae=vae, kl_weight=kl_weight, edge_weight=edge_weight, scale_weight=scale_weight,
                        originals=originals, latent_noise=latent_noise), has_aux=True)(params, x, rng)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, {"loss": loss, "reconstruction": rec, "kl": kl,
                                                           "edge": edge, "scale": scale}


class Discriminator(nn.Module):
  """A small PatchGAN (Isola et al. 2017; SD's VAE uses a larger one): images [B, H, W, 3] in [-1, 1]
  -> real/fake logits [B, H/4, W/4, 1], one per overlapping patch."""
  width: int = 32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.leaky_relu(nn.Conv(self.width, (4, 4), (2, 2), padding=1)(x), 0.2)
    x = nn.leaky_relu(nn.GroupNorm(8)(nn.Conv(2 * self.width, (4, 4), (2, 2), padding=1)(x)), 0.2)
    x = nn.leaky_relu(nn.GroupNorm(8)(nn.Conv(2 * self.width, (3, 3), padding=1)(x)), 0.2)
    return nn.Conv(1, (3, 3), padding=1)(x)


def adaptive_weight(rec_grads: Any, adv_grads: Any, adv_weight: float) -> jax.Array:
  """taming-transformers' weight of the adversarial term: adv_weight x |grad rec| / |grad adv| at the
  decoder's last layer (conv_out's kernel), clipped to [0, 1e4]."""
  last = lambda g: g["decoder"]["conv_out"]["kernel"]
  ratio = jnp.linalg.norm(last(rec_grads)) / (jnp.linalg.norm(last(adv_grads)) + 1e-4)
  return jnp.clip(ratio, 0.0, 1e4) * adv_weight


def adversarial_step(params: Any, opt_state: optax.OptState, disc_params: Any, disc_state: optax.OptState,
                     x: jax.Array, rng: jax.Array, *, vae: models.AutoencoderKL, tx: optax.GradientTransformation,
                     disc: Discriminator, disc_tx: optax.GradientTransformation, kl_weight: float,
                     edge_weight: float, adv_weight: float, scale_weight: float = 0.0,
                     originals: jax.Array | None = None, latent_noise: float = 0.0
                     ) -> tuple[Any, optax.OptState, Any, optax.OptState, dict]:
  """One step of the VAE (reconstruction + adaptively weighted generator loss -mean D(decoded)) and
  one of the discriminator (hinge loss, real x against the decoded images)."""
  def losses(p):  # one forward for both terms; their gradients are two pullbacks of it
    loss, aux, y = _objective(vae, p, x, rng, kl_weight, edge_weight, scale_weight, originals, latent_noise)
    return (loss, -jnp.mean(disc.apply({"params": disc_params}, y))), (aux, y)

  (loss, gen), pullback, ((rec, kl, edge, scale), y) = jax.vjp(losses, params, has_aux=True)
  one, zero = jnp.ones_like(loss), jnp.zeros_like(loss)
  (rec_grads,), (adv_grads,) = pullback((one, zero)), pullback((zero, one))
  lam = adaptive_weight(rec_grads, adv_grads, adv_weight)
  grads = jax.tree.map(lambda a, b: a + lam * b, rec_grads, adv_grads)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)

  def disc_loss(d):
    real, fake = disc.apply({"params": d}, x), disc.apply({"params": d}, jax.lax.stop_gradient(y))
    return jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake))

  dloss, dgrads = jax.value_and_grad(disc_loss)(disc_params)
  dupdates, disc_state = disc_tx.update(dgrads, disc_state, disc_params)
  return params, opt_state, optax.apply_updates(disc_params, dupdates), disc_state, {
      "loss": loss + lam * gen, "reconstruction": rec, "kl": kl, "edge": edge, "scale": scale, "generator": gen,
      "adv_lambda": lam, "discriminator": dloss}


ENCODER = ("encoder", "quant_conv")  # the parameters that make the latents


def add_image_condition(vae: models.AutoencoderKL, params: Any, width: int, seed: int = 0
                        ) -> tuple[models.AutoencoderKL, Any]:
  """`vae` with an image-conditioned decoder of `width` (models.vae's docstring): `params` plus fresh
  conditioning layers whose output projections are zero, so that it decodes as `vae` did until trained."""
  conditioned = models.AutoencoderKL(dataclasses.replace(vae.config, image_condition_width=width), vae.dtype,
                                     vae.kernels)
  fresh = weights.init_like_torch(pretrained.vae_param_shapes(conditioned), seed)
  decoder = {k: (jax.tree.map(np.zeros_like, v) if k.startswith("cond_proj") else v)
             for k, v in fresh["decoder"].items() if k.startswith("cond")}
  return conditioned, {**params, "decoder": {**params["decoder"], **decoder}}


def optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam on a cosine schedule with global-norm clipping; the encoder is frozen (no update, no
  Adam state) when `config.train_encoder` is False."""
  schedule = optax.cosine_decay_schedule(config.lr, config.num_steps, alpha=0.05)
  # With a discriminator: taming-transformers' Adam betas (0.5, 0.9), for generator and discriminator.
  betas = (0.5, 0.9) if config.adv_weight > 0 else (0.9, 0.999)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule, b1=betas[0], b2=betas[1]))
  if config.train_encoder:
    return tx
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                               lambda params: {k: "frozen" if k in ENCODER else "train" for k in params})


def random_crops(images: np.ndarray, rng: np.random.Generator, batch: int, crop: int) -> tuple[np.ndarray, np.ndarray]:
  """(x, originals), each float32 [batch, crop, crop, 3] in [-1, 1]: random images of `load_images`'
  kind-interleaved array, one random crop and flip per batch, and the same crops of their examples'
  originals (what an image-conditioned decoder sees)."""
  index = rng.integers(0, len(images), batch)
  top, left = rng.integers(0, images.shape[1] - crop + 1, 2)
  flip = rng.random() < 0.5
  def cut(x):
    x = x[:, top:top + crop, left:left + crop]
    return (x[:, :, ::-1] if flip else x).astype(np.float32) / 127.5 - 1.0
  return cut(images[index]), cut(images[index - index % len(IMAGE_KINDS)])


def reconstruct_fn(vae: models.AutoencoderKL) -> ReconstructFn:
  """Jitted (params, images [B, H, W, 3] in [-1, 1], their originals (seen by an image-conditioned
  decoder)) -> (decoded posterior mode, latent means)."""
  def fn(params, x, originals):
    mean, _ = _posterior(vae, params, x)
    return pretrained.vae_decode(vae, params, mean, originals), mean
  return jax.jit(fn)


def psnr(reference: np.ndarray, decoded: np.ndarray) -> np.ndarray:
  """Per-image PSNR (dB) of uint8 `reference` [N, H, W, 3] against decoded [-1, 1] images."""
  out = np.clip(np.round((np.asarray(decoded, np.float64) + 1.0) * 127.5), 0, 255)
  mse = np.mean((out - reference.astype(np.float64)) ** 2, axis=(1, 2, 3))
  return 10.0 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))


def evaluate(recon: ReconstructFn, params: Any, images: np.ndarray, batch: int = 96) -> tuple[np.ndarray, np.ndarray]:
  """(per-image PSNR [N], latent means [N, h, w, C]) of encode -> mode -> decode of `load_images`'
  kind-interleaved images (an image-conditioned decoder sees each example's original)."""
  kinds = len(IMAGE_KINDS)
  batch -= batch % kinds
  scores, means = [], []
  for i in range(0, len(images), batch):
    x = images[i:i + batch].astype(np.float32) / 127.5 - 1.0
    decoded, mean = recon(params, x, np.repeat(x[::kinds], kinds, axis=0))
    scores.append(psnr(images[i:i + batch], decoded))
    means.append(np.asarray(mean))
  return np.concatenate(scores), np.concatenate(means)


def psnr_by_kind(scores: np.ndarray) -> dict[str, float]:
  """Mean PSNR per image kind (images are stored kind-interleaved, see `load_images`)."""
  per = scores.reshape(-1, len(IMAGE_KINDS))
  out = {kind: float(per[:, i].mean()) for i, kind in enumerate(IMAGE_KINDS)}
  out["clean"] = float(per[:, :2].mean())  # originals and exact edits: what the editor must reproduce
  return out
