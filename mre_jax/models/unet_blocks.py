"""The Stable Diffusion 1.5 U-Net blocks, NHWC, with diffusers' parameter names.

A U-Net level is a `DownBlock` (resnets, each followed by a spatial transformer in the
cross-attention levels, then a stride-2 convolution) and, on the way up, an `UpBlock` (the same
with one more resnet, each taking a skip connection, then a 2x nearest upsampling). `MidBlock`
joins them: resnet, transformer, resnet. Parameter names are those of diffusers'
`UNet2DConditionModel` (`resnets_0/norm1`, `attentions_0/transformer_blocks_0/attn1/to_q`, ...)
so that `weights.torch_to_flax` maps its checkpoints without a name table, and the trees are
exactly those of the Flax classes this project used before (tests/test_reference.py).

Numerics follow the PyTorch modules: GroupNorm eps 1e-5 in resnets and 1e-6 in transformers,
exact (erf) GELU in the GEGLU feed-forward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mre_jax import ops
from mre_jax.models.layers import Conv, Dense, GroupNorm, conv1x1, gelu, layer_norm
from mre_jax.ops import attention as attention_ops

if TYPE_CHECKING:
  from mre_jax.models.unet import UNetConfig  # unet imports this module

# ----------------------------------------------------------------------------- resnet, samplers


class ResnetBlock(nn.Module):
  """x + conv(SiLU(norm(conv(SiLU(norm(x))) + time embedding))); x through a 1x1 conv if the width changes.

  x [B, H, W, C] -> [B, H, W, out_channels]; temb [B, D] or None (the VAE's resnets have none).
  """

  out_channels: int
  groups: int = 32
  epsilon: float = 1e-5
  dropout: float = 0.0
  dtype: Any = jnp.float32
  kernels: ops.Kernels = ops.Kernels()

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    norm = lambda name: GroupNorm(self.groups, self.epsilon, implementation=self.kernels.norm, name=name)
    conv3x3 = lambda name: Conv(self.out_channels, dtype=self.dtype, implementation=self.kernels.conv, name=name)
    h = conv3x3("conv1")(nn.silu(norm("norm1")(x)))
    if temb is not None:
      h = h + Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))[:, None, None, :]
    h = nn.Dropout(self.dropout)(nn.silu(norm("norm2")(h)), deterministic=deterministic)
    h = conv3x3("conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = conv1x1(self.out_channels, self.dtype, self.kernels.conv, name="conv_shortcut")(x)
    return x + h


class Downsample(nn.Module):
  """3x3 convolution with stride 2 (`conv`): [B, H, W, C] -> [B, H/2, W/2, C].

  padding: the U-Net pads 1 on each side; the VAE pads 1 after only (bottom and right).
  """

  channels: int
  padding: Any = ((1, 1), (1, 1))
  dtype: Any = jnp.float32
  kernels: ops.Kernels = ops.Kernels()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return Conv(self.channels, strides=(2, 2), padding=self.padding, dtype=self.dtype,
                implementation=self.kernels.conv, name="conv")(x)


class Upsample(nn.Module):
  """2x nearest-neighbour upsampling, then a 3x3 convolution (`conv`): [B, H, W, C] -> [B, 2H, 2W, C]."""

  channels: int
  dtype: Any = jnp.float32
  kernels: ops.Kernels = ops.Kernels()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return Conv(self.channels, dtype=self.dtype, implementation=self.kernels.conv, name="conv")(x)


# ----------------------------------------------------------------------------- transformer


class Attention(nn.Module):
  """Multi-head attention of x [B, T, C] over context [B, S, D] (x itself if None) -> [B, T, C].

  Projections `to_q`, `to_k`, `to_v` (no bias) and `to_out_0`; heads of C / heads channels.
  """

  heads: int
  dtype: Any = jnp.float32
  kernels: ops.Kernels = ops.Kernels()

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    context = x if context is None else context
    width = x.shape[-1]
    project = lambda name, y: Dense(width, use_bias=False, dtype=self.dtype, name=name)(y)
    out = attention_ops.multi_head_attention(project("to_q", x), project("to_k", context), project("to_v", context),
                                             self.heads, self.kernels.attention)
    return Dense(width, dtype=self.dtype, name="to_out_0")(out)


class GEGLU(nn.Module):
  """Linear to 2 x 4C (`proj`), one half gating the other through exact GELU: [..., C] -> [..., 4C]."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h, gate = jnp.split(Dense(8 * x.shape[-1], dtype=self.dtype, name="proj")(x), 2, axis=-1)
    return h * gelu(gate)


class FeedForward(nn.Module):
  """GEGLU (`net_0`) then a linear back to C (`net_2`): [..., C] -> [..., C]."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return Dense(x.shape[-1], dtype=self.dtype, name="net_2")(GEGLU(self.dtype, name="net_0")(x))


class TransformerBlock(nn.Module):
  """Pre-LayerNorm self-attention (`attn1`), cross-attention (`attn2`), feed-forward (`ff`), each residual.

  only_cross_attention: `attn1` attends to the context too.
  """

  heads: int
  only_cross_attention: bool = False
  dtype: Any = jnp.float32
  kernels: ops.Kernels = ops.Kernels()

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    norm = lambda name: layer_norm(1e-5, self.dtype, name=name)
    attention = lambda name: Attention(self.heads, self.dtype, self.kernels, name=name)
    x = x + attention("attn1")(norm("norm1")(x), context if self.only_cross_attention else None)
    x = x + attention("attn2")(norm("norm2")(x), context)
    return x + FeedForward(self.dtype, name="ff")(norm("norm3")(x))


class SpatialTransformer(nn.Module):
  """x + proj_out(transformer blocks(proj_in(GroupNorm(x)) as tokens)): [B, H, W, C] -> [B, H, W, C].

  diffusers' `Transformer2DModel`. The projections are 1x1 convolutions, or dense layers with
  `linear_projection` (applied to the tokens, as diffusers does; same function, other layout).
  """

  heads: int
  depth: int = 1
  linear_projection: bool = False
  only_cross_attention: bool = False
  groups: int = 32
  dtype: Any = jnp.float32
  kernels: ops.Kernels = ops.Kernels()

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    project = ((lambda name: Dense(c, dtype=self.dtype, name=name)) if self.linear_projection
               else (lambda name: conv1x1(c, self.dtype, self.kernels.conv, name=name)))
    y = GroupNorm(self.groups, 1e-6, implementation=self.kernels.norm, name="norm")(x)
    y = project("proj_in")(y.reshape(b, h * w, c) if self.linear_projection else y).reshape(b, h * w, c)
    for i in range(self.depth):
      y = TransformerBlock(self.heads, self.only_cross_attention, self.dtype, self.kernels,
                           name=f"transformer_blocks_{i}")(y, context)
    y = project("proj_out")(y if self.linear_projection else y.reshape(b, h, w, c))
    return x + y.reshape(b, h, w, c)


# ----------------------------------------------------------------------------- U-Net levels


class DownBlock(nn.Module):
  """One level down: `num_layers` resnets (each then a transformer if `cross_attention`), a stride-2 conv.

  __call__(h [B, H, W, C], temb [B, D], context [B, S, D'], deterministic) ->
  (h [B, H/2, W/2, out_channels] (H, W without the downsampler), the skips: every output on the way).
  """

  out_channels: int
  num_layers: int
  add_downsample: bool
  cross_attention: bool
  heads: int = 8
  depth: int = 1
  linear_projection: bool = False
  only_cross_attention: bool = False
  groups: int = 32
  dtype: Any = jnp.float32
  kernels: ops.Kernels = ops.Kernels()

  def setup(self):
    self.resnets = [ResnetBlock(self.out_channels, self.groups, dtype=self.dtype, kernels=self.kernels)
                    for _ in range(self.num_layers)]
    if self.cross_attention:
      self.attentions = [_transformer(self, self.only_cross_attention) for _ in range(self.num_layers)]
    if self.add_downsample:
      self.downsamplers = [Downsample(self.out_channels, dtype=self.dtype, kernels=self.kernels)]

  def __call__(self, h, temb, context, deterministic=True):
    skips = ()
    for i, resnet in enumerate(self.resnets):
      h = resnet(h, temb, deterministic)
      if self.cross_attention:
        h = self.attentions[i](h, context)
      skips += (h,)
    if self.add_downsample:
      h = self.downsamplers[0](h)
      skips += (h,)
    return h, skips


class UpBlock(nn.Module):
  """One level up: `num_layers` resnets over [h, skip] (each then a transformer), 2x upsampling.

  __call__(h [B, H, W, C], skips (the last `num_layers` skips of the way down, used last first),
  temb, context, deterministic) -> [B, 2H, 2W, out_channels] (H, W without the upsampler).
  """

  out_channels: int
  num_layers: int
  add_upsample: bool
  cross_attention: bool
  heads: int = 8
  depth: int = 1
  linear_projection: bool = False
  only_cross_attention: bool = False
  groups: int = 32
  dtype: Any = jnp.float32
  kernels: ops.Kernels = ops.Kernels()

  def setup(self):
    self.resnets = [ResnetBlock(self.out_channels, self.groups, dtype=self.dtype, kernels=self.kernels)
                    for _ in range(self.num_layers)]
    if self.cross_attention:
      self.attentions = [_transformer(self, self.only_cross_attention) for _ in range(self.num_layers)]
    if self.add_upsample:
      self.upsamplers = [Upsample(self.out_channels, dtype=self.dtype, kernels=self.kernels)]

  def __call__(self, h, skips, temb, context, deterministic=True):
    for i, resnet in enumerate(self.resnets):
      h = resnet(jnp.concatenate([h, skips[-1 - i]], axis=-1), temb, deterministic)
      if self.cross_attention:
        h = self.attentions[i](h, context)
    return self.upsamplers[0](h) if self.add_upsample else h


class MidBlock(nn.Module):
  """resnet, then (transformer, resnet) `num_layers` times: [B, H, W, C] -> [B, H, W, C]."""

  channels: int
  heads: int = 8
  depth: int = 1
  linear_projection: bool = False
  num_layers: int = 1
  groups: int = 32
  dtype: Any = jnp.float32
  kernels: ops.Kernels = ops.Kernels()

  def setup(self):
    self.resnets = [ResnetBlock(self.channels, self.groups, dtype=self.dtype, kernels=self.kernels)
                    for _ in range(self.num_layers + 1)]
    self.attentions = [_transformer(self, only_cross_attention=False) for _ in range(self.num_layers)]

  def __call__(self, h, temb, context, deterministic=True):
    h = self.resnets[0](h, temb, deterministic)
    for attention, resnet in zip(self.attentions, self.resnets[1:]):
      h = resnet(attention(h, context), temb, deterministic)
    return h


def _transformer(block, only_cross_attention: bool) -> SpatialTransformer:
  """The spatial transformer of a level, from the level's fields."""
  return SpatialTransformer(block.heads, block.depth, block.linear_projection, only_cross_attention, block.groups,
                            block.dtype, block.kernels)


def make_unet_blocks(cfg: UNetConfig, *, dtype: Any, remat: bool,
                     kernels: ops.Kernels) -> tuple[list[DownBlock], MidBlock, list[UpBlock]]:
  """The down blocks, mid block and up blocks of the U-Net `cfg`.

  With `remat`, each block is recomputed in the backward pass; `deterministic` (the last
  positional argument of every block) is static.
  """
  wrap = (lambda cls, det: nn.remat(cls, static_argnums=(det,))) if remat else (lambda cls, det: cls)
  channels, n = cfg.block_out_channels, len(cfg.block_out_channels)
  heads = cfg.attention_head_dim
  heads = tuple(heads) if isinstance(heads, (list, tuple)) else (heads,) * n
  common = dict(depth=cfg.transformer_layers_per_block, linear_projection=cfg.use_linear_projection,
                only_cross_attention=cfg.only_cross_attention, groups=cfg.norm_num_groups, dtype=dtype,
                kernels=kernels)
  down = []
  for i, kind in enumerate(cfg.down_block_types):
    if kind not in ("CrossAttnDownBlock2D", "DownBlock2D"):
      raise ValueError(f"unet config: down_block_types has unsupported {kind!r}")
    down.append(wrap(DownBlock, 4)(channels[i], cfg.layers_per_block, i < n - 1, kind.startswith("CrossAttn"),
                                   heads[i], **common))
  # diffusers' mid block never has its first attention attend to the context only
  mid = wrap(MidBlock, 4)(channels[-1], heads[-1], **{k: v for k, v in common.items() if k != "only_cross_attention"})
  up = []
  for i, kind in enumerate(cfg.up_block_types):
    if kind not in ("CrossAttnUpBlock2D", "UpBlock2D"):
      raise ValueError(f"unet config: up_block_types has unsupported {kind!r}")
    up.append(wrap(UpBlock, 5)(channels[n - 1 - i], cfg.layers_per_block + 1, i < n - 1, kind.startswith("CrossAttn"),
                               heads[n - 1 - i], **common))
  return down, mid, up
