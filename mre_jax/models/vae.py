"""The Stable Diffusion VAE (diffusers' `AutoencoderKL`), NHWC, with diffusers' parameter names.

Encoder: conv_in, one level per `block_out_channels` entry (`layers_per_block` resnets, then a
stride-2 convolution except at the last level), mid block (resnet, single-head self-attention,
resnet), GroupNorm, SiLU, conv_out to 2 x latent channels (mean and log-variance), `quant_conv`
(1x1). Decoder: `post_quant_conv` (1x1), conv_in, mid block, levels in reverse with one more
resnet each and 2x upsampling except at the last, GroupNorm, SiLU, conv_out. Every GroupNorm
has `norm_num_groups` groups and eps 1e-6. Images are [B, H, W, 3] in [-1, 1]; latents
[B, H/2^(levels-1), W/2^(levels-1), latent channels] (SD: H/8), unscaled.

`image_condition_width` > 0 (our extension; diffusers has no such field) makes the decoder an
editor's decoder: it also sees the input image, as the asymmetric VQGAN's decoder sees the
unmasked image (Zhu et al. 2023, "Designing a Better Asymmetric VQGAN for StableDiffusion"), so that
what an edit keeps, and the edges it recolours in place, are drawn from the photo, not only from
the latents. The image's features at each decoder resolution (`cond_in`, `cond_0`, then stride-2
convolutions `cond_1`...) are added through 1x1 convolutions (`cond_proj_*`) before each level
and before the head; with those at zero (as `vae_train.add_image_condition` starts them) it is
SD's decoder.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mre_jax import ops
from mre_jax.models.layers import Conv, Dense, GroupNorm, conv1x1
from mre_jax.models.unet_blocks import Downsample, ResnetBlock, Upsample
from mre_jax.ops import attention as attention_ops

_EPS = 1e-6
# diffusers AutoencoderKL config fields we support only at their default value.
_FIXED_FIELDS = {"act_fn": "silu", "shift_factor": None, "latents_mean": None, "latents_std": None,
                 "mid_block_add_attention": True}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The VAE's architecture; field names and meanings are diffusers' `config.json` ones."""

  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  image_condition_width: int = 0  # > 0: the decoder also sees the input image (module docstring)

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any], source: str = "vae config") -> "VAEConfig":
    """Reads a diffusers `AutoencoderKL` config dict; rejects features we do not build."""
    for key, default in _FIXED_FIELDS.items():
      if config.get(key, default) != default:
        raise ValueError(f"{source}: field {key!r} = {config[key]!r} is not supported (only {default!r})")
    blocks = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}
    for key, kind in blocks.items():
      if any(k != kind for k in config.get(key, [kind])):
        raise ValueError(f"{source}: field {key!r} = {config[key]!r} is not supported (only {kind!r} blocks)")
    kwargs = {f.name: config[f.name] for f in dataclasses.fields(cls) if config.get(f.name) is not None}
    if "block_out_channels" in kwargs:
      kwargs["block_out_channels"] = tuple(kwargs["block_out_channels"])
    return cls(**kwargs)


class _Attention(nn.Module):
  """x + proj_attn(single-head self-attention(GroupNorm(x))) over the H*W tokens: [B, H, W, C] -> same.

  Names `group_norm`, `query`, `key`, `value`, `proj_attn` (projections with bias).
  """

  groups: int
  dtype: Any = jnp.float32
  kernels: ops.Kernels = ops.Kernels()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    y = GroupNorm(self.groups, _EPS, implementation=self.kernels.norm, name="group_norm")(x).reshape(b, h * w, c)
    project = lambda name, y: Dense(c, dtype=self.dtype, name=name)(y)
    y = attention_ops.multi_head_attention(project("query", y), project("key", y), project("value", y), 1,
                                           self.kernels.attention)
    return x + project("proj_attn", y).reshape(b, h, w, c)


class _MidBlock(nn.Module):
  """resnet, attention, resnet at the lowest resolution: [B, h, w, C] -> same."""

  channels: int
  groups: int
  dtype: Any = jnp.float32
  kernels: ops.Kernels = ops.Kernels()

  def setup(self):
    self.resnets = [ResnetBlock(self.channels, self.groups, _EPS, dtype=self.dtype, kernels=self.kernels)
                    for _ in range(2)]
    self.attentions = [_Attention(self.groups, self.dtype, self.kernels)]

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class _Level(nn.Module):
  """`num_layers` resnets to `channels`, then a stride-2 conv (encoder) or 2x upsampling (decoder), if any."""

  channels: int
  num_layers: int
  groups: int
  resample: str | None  # "down", "up" or None
  dtype: Any = jnp.float32
  kernels: ops.Kernels = ops.Kernels()

  def setup(self):
    self.resnets = [ResnetBlock(self.channels, self.groups, _EPS, dtype=self.dtype, kernels=self.kernels)
                    for _ in range(self.num_layers)]
    if self.resample == "down":  # padding after only, as diffusers' VAE
      self.downsamplers = [Downsample(self.channels, ((0, 1), (0, 1)), self.dtype, self.kernels)]
    elif self.resample == "up":
      self.upsamplers = [Upsample(self.channels, self.dtype, self.kernels)]

  def __call__(self, x: jax.Array) -> jax.Array:
    for resnet in self.resnets:
      x = resnet(x)
    if self.resample == "down":
      x = self.downsamplers[0](x)
    elif self.resample == "up":
      x = self.upsamplers[0](x)
    return x


def _conv3x3(features: int, dtype: Any, kernels: ops.Kernels, name: str | None = None) -> Conv:
  return Conv(features, dtype=dtype, implementation=kernels.conv, name=name)


def _head(x: jax.Array, groups: int, features: int, dtype: Any, kernels: ops.Kernels) -> jax.Array:
  """conv_out(SiLU(conv_norm_out(x))); called inside a compact __call__."""
  x = nn.silu(GroupNorm(groups, _EPS, implementation=kernels.norm, name="conv_norm_out")(x))
  return _conv3x3(features, dtype, kernels, name="conv_out")(x)


class Encoder(nn.Module):
  """images [B, H, W, in_channels] -> moments [B, H/f, W/f, 2 x latent channels] (before quant_conv)."""

  config: VAEConfig
  dtype: Any = jnp.float32
  kernels: ops.Kernels = ops.Kernels()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg, channels = self.config, self.config.block_out_channels
    x = _conv3x3(channels[0], self.dtype, self.kernels, name="conv_in")(x)
    for i, width in enumerate(channels):
      resample = "down" if i < len(channels) - 1 else None
      x = _Level(width, cfg.layers_per_block, cfg.norm_num_groups, resample, self.dtype, self.kernels,
                 name=f"down_blocks_{i}")(x)
    x = _MidBlock(channels[-1], cfg.norm_num_groups, self.dtype, self.kernels, name="mid_block")(x)
    return _head(x, cfg.norm_num_groups, 2 * cfg.latent_channels, self.dtype, self.kernels)


class Decoder(nn.Module):
  """latents [B, h, w, latent channels] (after post_quant_conv), and with `image_condition_width` > 0
  the input images [B, h*f, w*f, 3] in [-1, 1] -> images [B, h*f, w*f, out_channels]."""

  config: VAEConfig
  dtype: Any = jnp.float32
  kernels: ops.Kernels = ops.Kernels()

  @nn.compact
  def __call__(self, z: jax.Array, images: jax.Array | None = None) -> jax.Array:
    cfg, channels = self.config, self.config.block_out_channels[::-1]
    features = self._image_features(images) if cfg.image_condition_width else [None] * (len(channels) + 1)
    x = _conv3x3(channels[0], self.dtype, self.kernels, name="conv_in")(z)
    x = _MidBlock(channels[0], cfg.norm_num_groups, self.dtype, self.kernels, name="mid_block")(x)
    for i, width in enumerate(channels):
      x = self._add(x, features[i], f"cond_proj_{i}")
      resample = "up" if i < len(channels) - 1 else None
      x = _Level(width, cfg.layers_per_block + 1, cfg.norm_num_groups, resample, self.dtype, self.kernels,
                 name=f"up_blocks_{i}")(x)
    x = self._add(x, features[-1], "cond_proj_out")
    return _head(x, cfg.norm_num_groups, cfg.out_channels, self.dtype, self.kernels)

  @nn.nowrap
  def _image_features(self, images):
    """[features at the decoder's lowest resolution, ..., at full resolution, at full resolution]."""
    if images is None:
      raise ValueError("this VAE's decoder is image-conditioned (image_condition_width="
                       f"{self.config.image_condition_width}): decode(latents, images) needs the input images")
    levels, width = len(self.config.block_out_channels), self.config.image_condition_width
    conv = lambda x, name, stride=1: nn.silu(Conv(width, strides=(stride, stride), dtype=self.dtype,
                                                   implementation=self.kernels.conv, name=name)(x))
    features = [conv(conv(images.astype(self.dtype), "cond_in"), "cond_0")]
    for j in range(1, levels):
      features.append(conv(features[-1], f"cond_{j}", stride=2))
    return features[::-1] + features[:1]

  @nn.nowrap
  def _add(self, x, features, name):
    if features is None:
      return x
    return x + conv1x1(x.shape[-1], self.dtype, self.kernels.conv, name=name)(features)


class AutoencoderKL(nn.Module):
  """The VAE. `encode(images) -> (mean, logvar)`, `decode(latents) -> images`; `__call__` does both (for init).

  Attributes:
    config: the architecture (`config.scaling_factor` is the latent scale SD uses, 0.18215).
    dtype: compute dtype; parameters stay float32.
    kernels: the kernel family of attention, convolution and GroupNorm layers (see `ops`).
  """

  config: VAEConfig
  dtype: Any = jnp.float32
  kernels: ops.Kernels = ops.Kernels()

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg, self.dtype, self.kernels)
    self.decoder = Decoder(cfg, self.dtype, self.kernels)
    if cfg.use_quant_conv:
      self.quant_conv = conv1x1(2 * cfg.latent_channels, self.dtype, self.kernels.conv)
    if cfg.use_post_quant_conv:
      self.post_quant_conv = conv1x1(cfg.latent_channels, self.dtype, self.kernels.conv)

  def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """images [B, H, W, 3] in [-1, 1] -> posterior (mean, logvar), each [B, H/f, W/f, C], logvar clipped to [-30, 20]."""
    moments = self.encoder(images.astype(self.dtype))
    if self.config.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, latents: jax.Array, images: jax.Array | None = None) -> jax.Array:
    """latents [B, h, w, C] (unscaled) -> images [B, h*f, w*f, 3], nominally in [-1, 1].

    `images` (the input images [B, h*f, w*f, 3] in [-1, 1]) are needed by an image-conditioned
    decoder (`config.image_condition_width` > 0) and ignored by SD's.
    """
    z = latents.astype(self.dtype)
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z, images if self.config.image_condition_width else None)

  def __call__(self, images: jax.Array) -> jax.Array:
    return self.decode(self.encode(images)[0], images)
