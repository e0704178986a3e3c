"""PyTorch twin of the reward U-Net, for running exported weights without the release's code.

`MRERewardUNet` is diffusers' `UNet2DConditionModel` plus the release's reward modules, under
the release's attribute names, so the `unet/` folder that `export` writes loads into it (or
into the release's own class) with no missing or unexpected keys. It is written from SPEC
section 2 independently of the Flax model and is what the parity tests compare against.

Needs the optional `torch` extra: `pip install 'mre_jax[torch]'`.
"""

from __future__ import annotations

import inspect
import math

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import nn


class _SelfAttention(nn.Module):
  def __init__(self, width: int, heads: int, dropout: float):
    super().__init__()
    self.heads = heads
    self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
    self.dropout = nn.Dropout(dropout)

  def forward(self, q, kv):
    b, width = q.shape[0], q.shape[-1]
    split = lambda x: x.view(b, -1, self.heads, width // self.heads).transpose(1, 2)
    query, key, value = split(self.query(q)), split(self.key(kv)), split(self.value(kv))
    probs = torch.softmax(query @ key.transpose(-1, -2) / math.sqrt(width // self.heads), dim=-1)
    out = self.dropout(probs) @ value
    return out.transpose(1, 2).reshape(b, -1, width)


class _DenseAddNorm(nn.Module):
  def __init__(self, width: int, dropout: float):
    super().__init__()
    self.dense = nn.Linear(width, width)
    self.LayerNorm = nn.LayerNorm(width, eps=1e-12)
    self.dropout = nn.Dropout(dropout)

  def forward(self, x, residual):
    return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class _Attention(nn.Module):
  def __init__(self, width, heads, dropout):
    super().__init__()
    self.self = _SelfAttention(width, heads, dropout)
    self.output = _DenseAddNorm(width, dropout)

  def forward(self, q, kv):
    return self.output(self.self(q, kv), q)


class _Intermediate(nn.Module):
  def __init__(self, width):
    super().__init__()
    self.dense = nn.Linear(width, width)

  def forward(self, x):
    return nn.functional.gelu(self.dense(x))


class RewardCrossAttentionLayer(nn.Module):
  """`ca`: the release's BertLayerNoMemory_Cross (queries: latent tokens, keys: reward tokens)."""

  def __init__(self, width: int, heads: int = 8, dropout: float = 0.1):
    super().__init__()
    self.attention = _Attention(width, heads, dropout)
    self.hidden_intermediate = _Intermediate(width)
    self.output = _DenseAddNorm(width, dropout)

  def forward(self, z, reward_tokens):
    y = self.attention(z, reward_tokens)
    return self.output(self.hidden_intermediate(y), y)


class DealProj(nn.Module):
  def __init__(self, width: int, groups: int):
    super().__init__()
    self.norm = nn.GroupNorm(groups, width, eps=1e-6)
    self.proj_in = nn.Conv2d(width, width, 1)
    self.proj_out = nn.Conv2d(width, width, 1)


class MRERewardUNet(UNet2DConditionModel):
  """`UNet2DConditionModel` + score embeddings, reward-text projections and the MRC block.

  forward(sample [B, 8, h, w], timestep, encoder_hidden_states [B, 77, D],
          reward_scores [B, 3], reward_embeds [B, D]) -> noise prediction [B, 4, h, w].
  """

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    width = self.config.block_out_channels[0]
    time_dim, text_dim = 4 * width, self.config.cross_attention_dim
    self.add_time_proj = Timesteps(256, self.config.flip_sin_to_cos, self.config.freq_shift)
    self.add_embedding = TimestepEmbedding(3 * 256, time_dim)
    self.add_embedding2 = TimestepEmbedding(3 * 256, width)
    self.text_linear = nn.Linear(text_dim, width)
    self.text_linear2 = nn.Linear(text_dim, time_dim)
    self.proj_deal = DealProj(width, self.config.norm_num_groups)
    self.ca = RewardCrossAttentionLayer(width)

  # diffusers' from_config reads the accepted config keys off the __init__ signature.
  __init__.__signature__ = inspect.signature(UNet2DConditionModel.__init__)

  default_rewards: tuple[torch.Tensor, torch.Tensor] | None = None

  def set_default_rewards(self, scores: torch.Tensor, reward_embeds: torch.Tensor) -> None:
    """Rewards used when forward gets none, e.g. inside diffusers' InstructPix2Pix pipeline."""
    self.default_rewards = (scores.reshape(1, 3), reward_embeds.reshape(1, -1))

  def forward(self, sample, timestep, encoder_hidden_states, reward_scores=None, reward_embeds=None,
              added_cond_kwargs=None, return_dict=True, **unused):
    b = sample.shape[0]
    if reward_scores is None and added_cond_kwargs:  # the release passes them this way
      reward_scores, reward_embeds = added_cond_kwargs["reward_scores"], added_cond_kwargs["negative_embeds"]
    if reward_scores is None:
      if self.default_rewards is None:
        raise ValueError("MRERewardUNet needs reward_scores and reward_embeds (or set_default_rewards)")
      reward_scores, reward_embeds = (x.to(sample.device, sample.dtype).expand(b, -1) for x in self.default_rewards)
    timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(b)
    emb = self.time_embedding(self.time_proj(timestep).to(sample.dtype))
    scores = self.add_time_proj(reward_scores.reshape(-1)).reshape(b, -1).to(sample.dtype)
    emb = emb + self.add_embedding(scores) + self.text_linear2(reward_embeds)

    h = self.conv_in(sample)
    _, c, height, width = h.shape
    z = self.proj_deal.proj_in(self.proj_deal.norm(h)).permute(0, 2, 3, 1).reshape(b, height * width, c)
    tokens = torch.stack([self.add_embedding2(scores), self.text_linear(reward_embeds)], dim=1)
    u = self.ca(z, tokens).reshape(b, height, width, c).permute(0, 3, 1, 2)
    h = h + self.proj_deal.proj_out(u)

    skips = (h,)
    for block in self.down_blocks:
      if getattr(block, "has_cross_attention", False):
        h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states)
      else:
        h, res = block(hidden_states=h, temb=emb)
      skips += res
    h = self.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states)
    for block in self.up_blocks:
      res, skips = skips[-len(block.resnets):], skips[:-len(block.resnets)]
      if getattr(block, "has_cross_attention", False):
        h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=encoder_hidden_states)
      else:
        h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res)
    h = self.conv_out(self.conv_act(self.conv_norm_out(h)))
    return UNet2DConditionOutput(sample=h) if return_dict else (h,)
