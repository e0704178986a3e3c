"""The CLIP text encoder (transformers' `CLIPTextModel`), with its parameter names.

Token + position embeddings, `num_hidden_layers` pre-LayerNorm transformer layers (causal
multi-head self-attention, MLP with quick GELU for SD's CLIP), a final LayerNorm. Outputs the last
hidden states [B, T, D] (SD's instruction context) and the pooled output [B, D]: the hidden state
at the end-of-text token (the reward-text embedding). The tree is
`text_model/{embeddings, encoder/layers/<i>, final_layer_norm}`, transformers' layout, read by
`weights.torch_to_flax(..., flavour="transformers")`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mre_jax import ops
from mre_jax.models.layers import Dense, gelu, layer_norm
from mre_jax.ops import attention as attention_ops

_ACTIVATIONS = {"quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x), "gelu": gelu}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """The text encoder's architecture; field names are transformers' `CLIPTextConfig` ones (SD 1.5: ViT-L/14)."""

  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_attention_heads: int = 12
  num_hidden_layers: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  # 2 (SD 1.5's config, from before transformers fixed it): the end-of-text token is the
  # highest id in each row; otherwise its position is the first of this id.
  eos_token_id: int = 2

  @classmethod
  def from_dict(cls, config: Mapping[str, Any], source: str = "text_encoder config") -> "CLIPTextConfig":
    """Reads a transformers `config.json` (other keys, e.g. projection_dim, are not used by the text model)."""
    kwargs = {f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config}
    if kwargs.get("hidden_act", "quick_gelu") not in _ACTIVATIONS:
      raise ValueError(f"{source}: hidden_act {kwargs['hidden_act']!r} is not supported "
                       f"(expected one of {', '.join(_ACTIVATIONS)})")
    return cls(**kwargs)


class _Embeddings(nn.Module):
  config: CLIPTextConfig

  @nn.compact
  def __call__(self, ids: jax.Array) -> jax.Array:
    """ids [B, T] -> token + position embeddings [B, T, D] (float32)."""
    cfg = self.config
    init = nn.initializers.normal(0.02)
    tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, name="token_embedding")(ids)
    positions = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init,
                         name="position_embedding")(jnp.arange(ids.shape[-1]))
    return tokens + positions[None]


class _SelfAttention(nn.Module):
  """Causal multi-head self-attention: `q_proj`, `k_proj`, `v_proj`, `out_proj` (with bias)."""

  heads: int
  dtype: Any
  kernels: ops.Kernels

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    project = lambda name, y: Dense(x.shape[-1], dtype=self.dtype, name=name)(y)
    out = attention_ops.multi_head_attention(project("q_proj", x), project("k_proj", x), project("v_proj", x),
                                             self.heads, self.kernels.attention, causal=True)
    return project("out_proj", out)


class _Layer(nn.Module):
  """x + attention(LN(x)), then + fc2(act(fc1(LN(.)))): [B, T, D] -> [B, T, D]."""

  config: CLIPTextConfig
  dtype: Any
  kernels: ops.Kernels

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    x = x + _SelfAttention(cfg.num_attention_heads, self.dtype, self.kernels, name="self_attn")(
        layer_norm(cfg.layer_norm_eps, self.dtype, name="layer_norm1")(x))
    return x + _MLP(cfg, self.dtype, name="mlp")(layer_norm(cfg.layer_norm_eps, self.dtype, name="layer_norm2")(x))


class _MLP(nn.Module):
  config: CLIPTextConfig
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = _ACTIVATIONS[self.config.hidden_act](Dense(self.config.intermediate_size, dtype=self.dtype, name="fc1")(x))
    return Dense(x.shape[-1], dtype=self.dtype, name="fc2")(h)


class _Layers(nn.Module):
  """The layer stack; children are named "0", "1", ... (transformers' `encoder/layers/<i>`)."""

  config: CLIPTextConfig
  dtype: Any
  kernels: ops.Kernels

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.config.num_hidden_layers):
      x = _Layer(self.config, self.dtype, self.kernels, name=str(i))(x)
    return x


class _Encoder(nn.Module):
  config: CLIPTextConfig
  dtype: Any
  kernels: ops.Kernels

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return _Layers(self.config, self.dtype, self.kernels, name="layers")(x)


class _TextTransformer(nn.Module):
  config: CLIPTextConfig
  dtype: Any
  kernels: ops.Kernels

  @nn.compact
  def __call__(self, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    cfg = self.config
    x = _Embeddings(cfg, name="embeddings")(ids)
    x = _Encoder(cfg, self.dtype, self.kernels, name="encoder")(x)
    hidden = layer_norm(cfg.layer_norm_eps, self.dtype, name="final_layer_norm")(x)
    end = jnp.argmax(ids if cfg.eos_token_id == 2 else ids == cfg.eos_token_id, axis=-1)
    return hidden, jnp.take_along_axis(hidden, end[:, None, None], axis=1)[:, 0]


class CLIPTextEncoder(nn.Module):
  """input_ids [B, T] int -> (last hidden states [B, T, D], pooled output [B, D]), in `dtype`.

  As PyTorch `CLIPTextModel` without an attention mask (as SD uses it).
  """

  config: CLIPTextConfig
  dtype: Any = jnp.float32
  kernels: ops.Kernels = ops.Kernels()

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    ids = jnp.asarray(input_ids, jnp.int32)
    return _TextTransformer(self.config, self.dtype, self.kernels, name="text_model")(ids)
