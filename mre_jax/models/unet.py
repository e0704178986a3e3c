"""The reward-conditioned InstructPix2Pix U-Net (SPEC section 2), in Flax linen.

Layout is NHWC throughout. The SD 1.5 blocks are in unet_blocks.py; this file holds the time
and score embeddings, the reward modules (MRC block) and the U-Net that strings them together.
Parameter names follow the release's PyTorch attribute names (`add_embedding`, `add_embedding2`,
`text_linear`, `text_linear2`, `proj_deal`, `ca`) under the diffusers Flax naming convention
(`down_blocks_0`, ...), so `weights.torch_to_flax` maps a release checkpoint onto this module
without a name table.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mre_jax import ops
from mre_jax.io import weights
from mre_jax.models import unet_blocks
from mre_jax.models.layers import Conv, Dense, GroupNorm, conv1x1, gelu

SCORE_EMBED_DIM = 256  # width of each score's sinusoidal embedding (release: 256)
REWARD_HEADS = 8  # heads of the MRC cross-attention (release: 8)
NUM_SCORES = 3  # following, preserving, quality
# Top-level parameter names of the reward modules (the release's attribute names).
REWARD_MODULES = ("add_embedding", "add_embedding2", "text_linear", "text_linear2", "proj_deal", "ca")

_SD15_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
_SD15_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3

# diffusers UNet2DConditionModel config fields we support only at their default value.
_FIXED_FIELDS = {
    "act_fn": "silu", "norm_eps": 1e-5, "center_input_sample": False,
    "class_embed_type": None, "addition_embed_type": None, "encoder_hid_dim": None,
    "time_embedding_type": "positional", "time_cond_proj_dim": None, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "mid_block_type": "UNetMidBlock2DCrossAttn", "num_attention_heads": None,
    "dual_cross_attention": False, "resnet_time_scale_shift": "default", "upcast_attention": False,
    "num_class_embeds": None, "mid_block_only_cross_attention": None, "attention_type": "default",
}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """The U-Net's architecture; field names and meanings are diffusers' `config.json` ones."""

  in_channels: int = 8
  out_channels: int = 4
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int = 2
  attention_head_dim: int | tuple[int, ...] = 8  # diffusers' name; it is the number of heads
  cross_attention_dim: int = 768
  down_block_types: tuple[str, ...] = _SD15_DOWN
  up_block_types: tuple[str, ...] = _SD15_UP
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  use_linear_projection: bool = False
  only_cross_attention: bool = False
  transformer_layers_per_block: int = 1
  sample_size: int = 64
  # GroupNorm groups of every resnet, transformer, the MRC's proj_deal and conv_norm_out (SD, the
  # release: 32). A small U-Net needs several channels per group: with one (32 groups of 32
  # channels, an instance norm) conv_norm_out removes every channel's mean from what conv_out
  # sees, so the output cannot carry an image's colours (docs/experiments.md, "GroupNorm groups").
  norm_num_groups: int = 32

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any], source: str = "unet config") -> "UNetConfig":
    """Reads a diffusers `UNet2DConditionModel` config dict; rejects features we do not build."""
    for key, default in _FIXED_FIELDS.items():
      value = config.get(key, default)
      if isinstance(value, list):
        value = tuple(value)
      if value != default and not (key == "norm_eps" and math.isclose(value, default)):
        raise ValueError(f"{source}: field {key!r} = {value!r} is not supported (only {default!r})")
    kwargs = {}
    for field in dataclasses.fields(cls):
      if field.name in config:
        value = config[field.name]
        kwargs[field.name] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)

  def to_diffusers(self) -> dict[str, Any]:
    """The `config.json` of the equivalent diffusers `UNet2DConditionModel`."""
    out = {"_class_name": "UNet2DConditionModel"}
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      out[field.name] = list(value) if isinstance(value, tuple) else value
    return out

  @property
  def time_embed_dim(self) -> int:
    return 4 * self.block_out_channels[0]


class _Timesteps(nn.Module):
  """Sinusoidal embedding of a float per example: [N] -> [N, dim] (diffusers' `Timesteps`)."""

  dim: int
  flip_sin_to_cos: bool
  freq_shift: float

  def __call__(self, t: jax.Array) -> jax.Array:
    half = self.dim // 2
    exponent = -math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - self.freq_shift)
    angles = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    if self.flip_sin_to_cos:
      return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class _TimestepEmbedding(nn.Module):
  """Linear -> SiLU -> Linear, names `linear_1`, `linear_2` (diffusers' `TimestepEmbedding`)."""

  dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = Dense(self.dim, dtype=self.dtype, name="linear_1")(x)
    return Dense(self.dim, dtype=self.dtype, name="linear_2")(nn.silu(x))


class _DenseAddNorm(nn.Module):
  """BERT output sub-layer: LayerNorm(dropout(dense(x)) + residual), names `dense`, `LayerNorm`."""

  dropout_rate: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, residual: jax.Array, deterministic: bool) -> jax.Array:
    x = Dense(residual.shape[-1], dtype=self.dtype, name="dense")(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    return nn.LayerNorm(epsilon=1e-12, dtype=self.dtype, name="LayerNorm")(x + residual)


class _RewardAttention(nn.Module):
  """Multi-head attention of latent tokens over reward tokens (BERT `self`: query/key/value)."""

  heads: int
  dropout_rate: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, q: jax.Array, kv: jax.Array, deterministic: bool) -> jax.Array:
    width = q.shape[-1]
    head_dim = width // self.heads
    split = lambda x: x.reshape(x.shape[:2] + (self.heads, head_dim))
    query = split(Dense(width, dtype=self.dtype, name="query")(q))
    key = split(Dense(width, dtype=self.dtype, name="key")(kv))
    value = split(Dense(width, dtype=self.dtype, name="value")(kv))
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key) / math.sqrt(head_dim)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(value.dtype)
    probs = nn.Dropout(self.dropout_rate)(probs, deterministic=deterministic)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, value)
    return out.reshape(q.shape[:2] + (width,))


class _BertAttention(nn.Module):
  heads: int
  dropout_rate: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, q, kv, deterministic):
    attended = _RewardAttention(self.heads, self.dropout_rate, self.dtype, name="self")(q, kv, deterministic)
    return _DenseAddNorm(self.dropout_rate, self.dtype, name="output")(attended, q, deterministic)


class _Intermediate(nn.Module):
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return gelu(Dense(x.shape[-1], dtype=self.dtype, name="dense")(x))


class RewardCrossAttentionLayer(nn.Module):
  """`ca`: one BERT cross-attention layer; latent tokens [B, N, C] attend to reward tokens [B, 2, C]."""

  heads: int = REWARD_HEADS
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array, reward_tokens: jax.Array, deterministic: bool) -> jax.Array:
    y = _BertAttention(self.heads, self.dropout_rate, self.dtype, name="attention")(
        z, reward_tokens, deterministic)
    hidden = _Intermediate(self.dtype, name="hidden_intermediate")(y)
    return _DenseAddNorm(self.dropout_rate, self.dtype, name="output")(hidden, y, deterministic)


class _DealProj(nn.Module):
  """`proj_deal`: GroupNorm + 1x1 conv into tokens, 1x1 conv back out."""

  channels: int
  groups: int = 32
  dtype: Any = jnp.float32
  kernels: ops.Kernels = ops.Kernels()

  def setup(self):
    self.norm = GroupNorm(self.groups, 1e-6, dtype=self.dtype, implementation=self.kernels.norm)
    self.proj_in = conv1x1(self.channels, self.dtype, self.kernels.conv)
    self.proj_out = conv1x1(self.channels, self.dtype, self.kernels.conv)

  def to_tokens(self, h: jax.Array) -> jax.Array:
    z = self.proj_in(self.norm(h))
    return z.reshape(z.shape[0], -1, z.shape[-1])

  def from_tokens(self, u: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return self.proj_out(u.reshape(shape))


class RewardUNet(nn.Module):
  """InstructPix2Pix U-Net with multi-reward conditioning (SPEC section 2).

  Attributes:
    config: the U-Net architecture.
    reward: build and use the reward modules (False: a plain InstructPix2Pix U-Net).
    dtype: compute dtype; parameters keep whatever dtype they are given (float32 normally).
    remat: recompute each U-Net block in the backward pass (gradient checkpointing).
    reward_dropout: dropout in the MRC cross-attention layer (training only).
    kernels: the kernel family of attention, convolution and GroupNorm layers (see `ops`).
  """

  config: UNetConfig
  reward: bool = True
  dtype: Any = jnp.float32
  remat: bool = False
  reward_dropout: float = 0.1
  kernels: ops.Kernels = ops.Kernels()

  def setup(self):
    cfg = self.config
    width = cfg.block_out_channels[0]
    self.conv_in = Conv(width, dtype=self.dtype, implementation=self.kernels.conv)
    self.time_proj = _Timesteps(width, cfg.flip_sin_to_cos, cfg.freq_shift)
    self.time_embedding = _TimestepEmbedding(cfg.time_embed_dim, self.dtype)
    self.down_blocks, self.mid_block, self.up_blocks = unet_blocks.make_unet_blocks(
        cfg, dtype=self.dtype, remat=self.remat, kernels=self.kernels)
    self.conv_norm_out = GroupNorm(cfg.norm_num_groups, 1e-5, implementation=self.kernels.norm)
    self.conv_out = Conv(cfg.out_channels, dtype=self.dtype, implementation=self.kernels.conv)
    if self.reward:
      self.add_time_proj = _Timesteps(SCORE_EMBED_DIM, cfg.flip_sin_to_cos, cfg.freq_shift)
      self.add_embedding = _TimestepEmbedding(cfg.time_embed_dim, self.dtype)
      self.add_embedding2 = _TimestepEmbedding(width, self.dtype)
      self.text_linear = Dense(width, dtype=self.dtype)
      self.text_linear2 = Dense(cfg.time_embed_dim, dtype=self.dtype)
      self.proj_deal = _DealProj(width, cfg.norm_num_groups, self.dtype, self.kernels)
      self.ca = RewardCrossAttentionLayer(REWARD_HEADS, self.reward_dropout, self.dtype)

  def __call__(
      self,
      sample: jax.Array,
      timesteps: jax.Array,
      context: jax.Array,
      scores: jax.Array | None = None,
      reward_embeds: jax.Array | None = None,
      *,
      train: bool = False,
  ) -> jax.Array:
    """Predicts the noise.

    Args:
      sample: [B, h, w, 8] noisy latents (4) concatenated with unscaled image latents (4).
      timesteps: [B] or scalar, in [0, 1000).
      context: [B, 77, D] CLIP last hidden states of the instruction.
      scores: [B, 3] reward scores in [0, 5] (following, preserving, quality).
      reward_embeds: [B, D] CLIP pooled output of the joined reward text.
      train: enables dropout (needs a "dropout" rng).

    Returns:
      [B, h, w, 4] predicted noise, in the compute dtype.
    """
    deterministic = not train
    emb, score_emb, reward_embeds = self._embeddings(sample.shape[0], timesteps, scores, reward_embeds)
    h = self.conv_in(sample.astype(self.dtype))
    if self.reward:
      h = self._reward_cross_attention(h, score_emb, reward_embeds, deterministic)
    h = self._blocks(h, emb, context.astype(self.dtype), deterministic)
    h = nn.silu(self.conv_norm_out(h))
    return self.conv_out(h)

  def _embeddings(self, batch: int, timesteps: jax.Array, scores: jax.Array | None,
                  reward_embeds: jax.Array | None) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """(time embedding [B, E], with the score and reward-text terms on a reward U-Net; score
    embedding [B, 3 * SCORE_EMBED_DIM] or None; reward_embeds in the compute dtype)."""
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (batch,))
    emb = self.time_embedding(self.time_proj(timesteps).astype(self.dtype))
    if not self.reward:
      return emb, None, reward_embeds
    if scores is None or reward_embeds is None:
      raise ValueError("a reward U-Net needs `scores` [B, 3] and `reward_embeds` [B, D]")
    score_emb = self.add_time_proj(scores.reshape(-1)).reshape(batch, -1).astype(self.dtype)
    reward_embeds = reward_embeds.astype(self.dtype)
    return emb + self.add_embedding(score_emb) + self.text_linear2(reward_embeds), score_emb, reward_embeds

  def _reward_cross_attention(self, h: jax.Array, score_emb: jax.Array, reward_embeds: jax.Array,
                              deterministic: bool) -> jax.Array:
    """MRC: the tokens of h [B, h, w, C] attend to two reward tokens (scores, reward text); the
    result is added to h."""
    reward_tokens = jnp.stack([self.add_embedding2(score_emb), self.text_linear(reward_embeds)], axis=1)
    z = self.proj_deal.to_tokens(h)
    u = self.ca(z, reward_tokens, deterministic)
    return h + self.proj_deal.from_tokens(u, h.shape)

  def _blocks(self, h: jax.Array, emb: jax.Array, context: jax.Array, deterministic: bool) -> jax.Array:
    """Down blocks (keeping their skips), mid block, up blocks (each taking its skips)."""
    skips = (h,)
    for block in self.down_blocks:
      h, res = block(h, emb, context, deterministic)
      skips += res
    h = self.mid_block(h, emb, context, deterministic)
    n = self.config.layers_per_block + 1
    for block in self.up_blocks:
      h = block(h, skips[-n:], emb, context, deterministic)
      skips = skips[:-n]
    return h


def unet_param_shapes(model: RewardUNet, latent_size: int = 8) -> dict:
  """The parameter tree of `model` as `jax.ShapeDtypeStruct`s (traced, nothing allocated)."""
  cfg = model.config
  sample = jnp.zeros((1, latent_size, latent_size, cfg.in_channels))
  context = jnp.zeros((1, 1, cfg.cross_attention_dim))
  scores = jnp.zeros((1, NUM_SCORES))
  reward_embeds = jnp.zeros((1, cfg.cross_attention_dim))
  init = lambda: model.init(jax.random.PRNGKey(0), sample, jnp.zeros((1,)), context, scores, reward_embeds)
  return jax.eval_shape(init)["params"]


def init_unet_params(model: RewardUNet, seed: int) -> dict:
  """Random float32 parameters for `model`, drawn as PyTorch's default init (see weights)."""
  return weights.init_like_torch(unet_param_shapes(model), seed)
