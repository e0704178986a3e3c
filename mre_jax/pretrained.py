"""Frozen and pretrained parts: the only module that imports diffusers / transformers model code.

diffusers 0.39.x is the last release with Flax models and transformers < 5 the last with Flax
CLIP; keeping every use of them here means a move off them touches this one file.

Everything is loaded from local diffusers-format folders (`unet/`, `vae/`, `text_encoder/`,
`tokenizer/`); nothing is fetched from a hub. Weights are read from safetensors, or from
PyTorch `.bin` files only through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import logging
import os
import types
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("USE_TF", "0")  # transformers must not import TensorFlow
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # and nothing may reach a model hub


class _DropFlaxDeprecation(logging.Filter):
  # diffusers 0.39 logs this from every Flax module's setup(), i.e. on every trace.
  def filter(self, record):
    return "Flax classes are deprecated" not in record.getMessage()


for _name in ("attention_flax", "embeddings_flax", "resnet_flax", "vae_flax", "unets.unet_2d_blocks_flax",
              "unets.unet_2d_condition_flax", "modeling_flax_utils"):
  logging.getLogger(f"diffusers.models.{_name}").addFilter(_DropFlaxDeprecation())

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402
import numpy as np  # noqa: E402
from diffusers.models import attention_flax as _attention  # noqa: E402
from diffusers.models import resnet_flax as _resnet  # noqa: E402
from diffusers.models import vae_flax as _vae  # noqa: E402
from diffusers.models.unets import unet_2d_blocks_flax as _blocks  # noqa: E402
from diffusers.models.vae_flax import FlaxAutoencoderKL  # noqa: E402
from transformers import CLIPTextConfig, CLIPTokenizer  # noqa: E402
from transformers.models.clip.modeling_flax_clip import FlaxCLIPTextModule  # noqa: E402
from transformers.models.clip.tokenization_clip import bytes_to_unicode  # noqa: E402

from mre_jax import conv, cpu_kernels, dense, weights  # noqa: E402

MAX_TOKENS = 77
VAE_ALIASES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out_0": "proj_attn"}
_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors", "model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json",
    "diffusion_pytorch_model.bin", "pytorch_model.bin",
)


# ----------------------------------------------------------------------------- files


def component_dir(folder: str | os.PathLike, name: str) -> Path:
  """`<folder>/<name>`, which must exist and hold a config (tokenizer: vocab files)."""
  path = Path(folder) / name
  wanted = ("vocab.json", "merges.txt") if name == "tokenizer" else ("config.json",)
  if not path.is_dir():
    raise FileNotFoundError(
        f"{path}: missing folder; a diffusers-format model folder has {name}/ with {', '.join(wanted)}")
  for f in wanted:
    if not (path / f).is_file():
      raise FileNotFoundError(f"{path / f}: missing file (expected in the {name}/ subfolder)")
  return path


def read_config(path: str | os.PathLike) -> dict:
  path = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
  try:
    return json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: cannot read JSON config: {e}") from e


def weight_file(path: Path) -> Path:
  for name in _WEIGHT_FILES:
    if (path / name).is_file():
      return path / name
  raise FileNotFoundError(f"{path}: no weights file; expected one of {', '.join(_WEIGHT_FILES)}")


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads the PyTorch-layout weights of one component folder as numpy arrays."""
  file = weight_file(Path(path))
  if file.name.endswith(".index.json"):
    shards = sorted(set(json.loads(file.read_text())["weight_map"].values()))
    out = {}
    for shard in shards:
      out.update(_read_safetensors(file.parent / shard))
    return out
  if file.suffix == ".safetensors":
    return _read_safetensors(file)
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"{file}: reading .bin weights needs PyTorch (pip install 'mre_jax[torch]')") from e
  state = torch.load(file, map_location="cpu", weights_only=True)
  return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()}


def _read_safetensors(file: Path) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  try:
    return load_file(str(file))
  except Exception as e:  # safetensors raises its own error types
    raise ValueError(f"{file}: cannot read safetensors file: {e}") from e


# ----------------------------------------------------------------------------- U-Net blocks


def _torch_groupnorm(num_groups, epsilon):
  del epsilon  # attention_flax says 1e-5 where PyTorch's Transformer2DModel uses 1e-6
  return cpu_kernels.GroupNorm(num_groups=num_groups, epsilon=1e-6)


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU in PyTorch's form, x/2 (1 + erf(x/sqrt(2))) (attention_flax's GEGLU uses the tanh form).

  Same function as `nn.gelu(x, approximate=False)`, whose erfc form XLA:CPU runs 2x slower
  (forward + backward on [4096, 1280]: 24 vs 13 ms); absolute difference ~1e-6 at |x| ~ 10.
  """
  return 0.5 * x * (1 + lax.erf(x * 0.5**0.5))


# diffusers 0.39's Flax transformer blocks differ from their PyTorch twins in two constants
# (1e-4 relative error on SD-width U-Nets). GroupNorm and gelu appear in attention_flax only
# there, so that module sees a linen namespace with the PyTorch behaviour. All blocks build
# their convolutions from `conv.Conv`, dense layers from `dense.Dense` and GroupNorms from
# `cpu_kernels.GroupNorm` (same parameters; faster kernels on a CPU, see those modules).
_attention.nn = types.SimpleNamespace(**{**vars(nn), "GroupNorm": _torch_groupnorm, "gelu": gelu,
                                         "Conv": conv.Conv, "Dense": dense.Dense})
_resnet.nn = _vae.nn = types.SimpleNamespace(**{**vars(nn), "Conv": conv.Conv, "Dense": dense.Dense,
                                                "GroupNorm": cpu_kernels.GroupNorm})

# Attention kernels: "auto" picks cuDNN flash attention for self-attention on a GPU in
# bfloat16/float16 (where the [B*heads, T, T] scores are large), the fused kernel of
# cpu_kernels.py on a CPU (where it builds), and XLA math everywhere else: on a CPU a blocked
# kernel for long sequences (below), diffusers' own math otherwise. "cudnn" forces flash
# attention for all attention layers, "cpu" the fused CPU kernel, "xla" XLA's ops only.
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "cpu")
_ATTENTION = [os.environ.get("MRE_JAX_ATTENTION", "auto")]


def set_attention(implementation: str) -> str:
  """Chooses the U-Net attention kernel for programs traced from now on (env: MRE_JAX_ATTENTION).

  Returns the previous setting, so that a caller can restore it.
  """
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r}: expected one of {ATTENTION_IMPLEMENTATIONS}")
  previous, _ATTENTION[0] = _ATTENTION[0], implementation
  return previous


def attention_implementation(dtype: Any, self_attention: bool = True) -> str:
  """The kernel the setting resolves to for compute dtype `dtype` on the default backend."""
  chosen = _ATTENTION[0]
  if chosen not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"MRE_JAX_ATTENTION={chosen!r}: expected one of {ATTENTION_IMPLEMENTATIONS}")
  backend = jax.default_backend()
  if chosen == "auto":
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if backend == "gpu":
      return "cudnn" if half and self_attention else "xla"
    return "cpu" if cpu_kernels.available() else "xla"  # available() is False off XLA:CPU
  if chosen == "cpu" and not cpu_kernels.available():
    raise ValueError(f"MRE_JAX_ATTENTION=cpu: the fused CPU attention kernel is unavailable on backend "
                     f"{backend!r} (it needs XLA:CPU and a C++ compiler; see mre_jax/cpu_kernels.py)")
  return chosen


# Blocked attention for XLA:CPU. The naive math writes and re-reads the [B*heads, T, S] scores
# (128 MB at 4 x 8 heads x 1024^2) several times and is memory-bound; scanning over heads (and
# query blocks) keeps each block's scores in cache: on a 2-core Xeon, 4 x 1024 tokens x 8 heads of
# 40: forward ~0.45x, forward + backward ~0.42x the naive time. Cross-attention (S = 77) and short
# sequences gain nothing (the per-head matmuls get too small), so they keep the naive math.
_BLOCKED_MIN_TOKENS = 512  # T and S at least this (T = S = 512: fwd 1.0-1.2x, fwd + bwd 0.4-0.5x naive)
_BLOCK_SCORES = 2**22  # max scores per block (B x rows x S); larger blocks slowed the forward


def _query_block(b: int, t: int, s: int) -> int:
  """Query rows per block: t, halved while a block's [b, rows, s] scores exceed _BLOCK_SCORES."""
  rows = t
  while b * rows * s > _BLOCK_SCORES and rows % 2 == 0:
    rows //= 2
  return rows


def _split_rows(x: jax.Array, rows: int) -> jax.Array:
  """[B, T, ...] -> [T/rows, B, rows, ...]."""
  return jnp.moveaxis(x.reshape(x.shape[0], x.shape[1] // rows, rows, *x.shape[2:]), 1, 0)


def _join_rows(x: jax.Array) -> jax.Array:
  """[T/rows, B, rows, ...] -> [B, T, ...]."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])


def _blocked_forward(q, k, v):
  """q [H, B, T, d], k and v [H, B, S, d] -> out [H, B, T, d], row logsumexp of the scores [H, B, T]."""
  rows, scale = _query_block(q.shape[1], q.shape[2], k.shape[2]), q.shape[-1] ** -0.5

  def block(q, k, v):  # q [B, rows, d] (scaled), k and v [B, S, d]
    scores = jnp.einsum("bqd,bkd->bqk", q, k)
    top = jnp.max(scores, axis=-1, keepdims=True)
    p = jnp.exp(scores - top)
    total = jnp.sum(p, axis=-1, keepdims=True)
    return jnp.einsum("bqk,bkd->bqd", p, v) / total, (top + jnp.log(total))[..., 0]

  def head(qkv):
    q, k, v = qkv
    out, lse = lax.map(lambda qb: block(qb * scale, k, v), _split_rows(q, rows))
    return _join_rows(out), _join_rows(lse)

  return lax.map(head, (q, k, v))


def _blocked_backward(res, d_out):
  """Gradients wrt q, k, v from the forward's (q, k, v, out, logsumexp); p is recomputed per block."""
  q, k, v, out, lse = res
  rows, scale = _query_block(q.shape[1], q.shape[2], k.shape[2]), q.shape[-1] ** -0.5
  delta = jnp.sum(d_out * out, axis=-1)  # [H, B, T]: rowsum(p * dp) of the softmax backward

  def head(args):
    q, k, v, d_out, lse, delta = args

    def block(dkv_t, xs):
      dk_t, dv_t = dkv_t
      q, d_out, lse, delta = xs
      q = q * scale
      p = jnp.exp(jnp.einsum("bqd,bkd->bqk", q, k) - lse[..., None])
      ds = p * (jnp.einsum("bqd,bkd->bqk", d_out, v) - delta[..., None])
      # dk and dv accumulate as [B, d, S]: XLA:CPU runs these products ~2x faster than the [B, S, d] ones
      dk_t = dk_t + jnp.einsum("bqd,bqk->bdk", q, ds)
      dv_t = dv_t + jnp.einsum("bqd,bqk->bdk", d_out, p)
      return (dk_t, dv_t), jnp.einsum("bqk,bkd->bqd", ds, k) * scale

    zeros = jnp.zeros_like(jnp.swapaxes(k, 1, 2))
    (dk_t, dv_t), dq = lax.scan(block, (zeros, zeros), tuple(_split_rows(x, rows) for x in (q, d_out, lse, delta)))
    return _join_rows(dq), dk_t, dv_t

  dq, dk_t, dv_t = lax.map(head, (q, k, v, d_out, lse, delta))
  return dq, jnp.swapaxes(dk_t, -1, -2), jnp.swapaxes(dv_t, -1, -2)


@jax.custom_vjp
def _blocked_attention(q, k, v):
  """softmax(q k^T / sqrt(d)) v: q [H, B, T, d], k and v [H, B, S, d] float32 -> [H, B, T, d]."""
  return _blocked_forward(q, k, v)[0]


def _blocked_attention_fwd(q, k, v):
  out, lse = _blocked_forward(q, k, v)
  return out, (q, k, v, out, lse)


_blocked_attention.defvjp(_blocked_attention_fwd, _blocked_backward)


def multi_head_attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v per head: q [B, T, heads*d], k and v [B, S, heads*d] -> [B, T, heads*d]."""
  (b, t, width), s = q.shape, k.shape[1]
  d = width // heads
  implementation = attention_implementation(q.dtype, self_attention=s == t)
  if implementation == "cudnn":
    split = lambda x, n: x.reshape(b, n, heads, d)
    out = jax.nn.dot_product_attention(split(q, t), split(k, s), split(v, s), scale=d**-0.5,
                                       implementation="cudnn")
    return out.reshape(b, t, width)
  if implementation == "cpu" and cpu_kernels.supports_attention(width, heads):
    f32 = lambda x: x.astype(jnp.float32)  # float32 softmax, like the blocked kernel
    return cpu_kernels.attention(f32(q), f32(k), f32(v), heads).astype(q.dtype)
  if min(t, s) >= _BLOCKED_MIN_TOKENS and jax.default_backend() == "cpu":
    # heads lead (they are scanned), the batch stays a vectorised (shardable) axis; float32 softmax
    heads_first = lambda x, n: x.reshape(b, n, heads, d).transpose(2, 0, 1, 3).astype(jnp.float32)
    out = _blocked_attention(heads_first(q, t), heads_first(k, s), heads_first(v, s))
    return out.transpose(1, 2, 0, 3).reshape(b, t, width).astype(q.dtype)
  to_batch = lambda x, n: x.reshape(b, n, heads, d).transpose(0, 2, 1, 3).reshape(b * heads, n, d)
  scores = jnp.einsum("bid,bjd->bij", to_batch(q, t), to_batch(k, s)) * d**-0.5
  out = jnp.einsum("bij,bjd->bid", nn.softmax(scores, axis=2), to_batch(v, s))
  return out.reshape(b, heads, t, d).transpose(0, 2, 1, 3).reshape(b, t, width)


class _Attention(_attention.FlaxAttention):
  """diffusers' FlaxAttention (same parameters) with the kernel of `multi_head_attention`."""

  def __call__(self, hidden_states, context=None, deterministic=True):
    context = hidden_states if context is None else context
    out = multi_head_attention(self.query(hidden_states), self.key(context), self.value(context), self.heads)
    return self.dropout_layer(self.proj_attn(out), deterministic=deterministic)


_attention.FlaxAttention = _Attention  # what FlaxBasicTransformerBlock builds its attn1 / attn2 from


def make_unet_blocks(cfg, *, dtype: Any, remat: bool) -> tuple[list, nn.Module, list]:
  """diffusers' Flax SD U-Net blocks for `cfg` (a `models.UNetConfig`): down, mid, up.

  With `remat`, each block is recomputed in the backward pass; `deterministic` (the last
  positional argument of every block) is static.
  """
  wrap = (lambda cls, det: nn.remat(cls, static_argnums=(det,))) if remat else (lambda cls, det: cls)
  channels = cfg.block_out_channels
  n = len(channels)
  heads = cfg.attention_head_dim
  heads = tuple(heads) if isinstance(heads, (list, tuple)) else (heads,) * n
  attn = dict(use_linear_projection=cfg.use_linear_projection,
              transformer_layers_per_block=cfg.transformer_layers_per_block)
  down, up = [], []
  for i, kind in enumerate(cfg.down_block_types):
    common = dict(in_channels=channels[max(i - 1, 0)], out_channels=channels[i], num_layers=cfg.layers_per_block,
                  add_downsample=i < n - 1, dtype=dtype)
    if kind == "CrossAttnDownBlock2D":
      down.append(wrap(_blocks.FlaxCrossAttnDownBlock2D, 4)(
          num_attention_heads=heads[i], only_cross_attention=cfg.only_cross_attention, **common, **attn))
    elif kind == "DownBlock2D":
      down.append(wrap(_blocks.FlaxDownBlock2D, 3)(**common))
    else:
      raise ValueError(f"unet config: down_block_types has unsupported {kind!r}")
  mid = wrap(_blocks.FlaxUNetMidBlock2DCrossAttn, 4)(in_channels=channels[-1], num_attention_heads=heads[-1],
                                                     dtype=dtype, **attn)
  rev, rev_heads = channels[::-1], heads[::-1]
  for i, kind in enumerate(cfg.up_block_types):
    common = dict(in_channels=rev[min(i + 1, n - 1)], out_channels=rev[i], prev_output_channel=rev[max(i - 1, 0)],
                  num_layers=cfg.layers_per_block + 1, add_upsample=i < n - 1, dtype=dtype)
    if kind == "CrossAttnUpBlock2D":
      up.append(wrap(_blocks.FlaxCrossAttnUpBlock2D, 5)(
          num_attention_heads=rev_heads[i], only_cross_attention=cfg.only_cross_attention, **common, **attn))
    elif kind == "UpBlock2D":
      up.append(wrap(_blocks.FlaxUpBlock2D, 4)(**common))
    else:
      raise ValueError(f"unet config: up_block_types has unsupported {kind!r}")
  return down, mid, up


# ----------------------------------------------------------------------------- VAE


def make_vae(config: dict, dtype: Any = jnp.float32) -> FlaxAutoencoderKL:
  return FlaxAutoencoderKL.from_config(config, dtype=dtype)


def vae_param_shapes(vae: FlaxAutoencoderKL) -> dict:
  return jax.eval_shape(lambda: vae.init_weights(jax.random.PRNGKey(0)))


def load_vae(folder: str | os.PathLike, dtype: Any = jnp.float32) -> tuple[FlaxAutoencoderKL, dict]:
  """Flax VAE and float32 params from `<folder>/vae`."""
  path = component_dir(folder, "vae")
  vae = make_vae(read_config(path), dtype)
  params = weights.torch_to_flax(read_state_dict(path), vae_param_shapes(vae), aliases=VAE_ALIASES,
                                 source=str(weight_file(path)))
  return vae, _as_float32(params)


def vae_state_dict(params: dict) -> dict[str, np.ndarray]:
  return weights.flax_to_torch(params, aliases=VAE_ALIASES)


def vae_encode(vae: FlaxAutoencoderKL, params: dict, images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """images [B, H, W, 3] in [-1, 1] -> (mean, logvar), each [B, H/8, W/8, C] (unscaled)."""
  def fn(module, x):
    return module.quant_conv(module.encoder(x, deterministic=True))
  moments = vae.apply({"params": params}, images.astype(vae.dtype), method=fn)
  mean, logvar = jnp.split(moments, 2, axis=-1)
  return mean, jnp.clip(logvar, -30.0, 20.0)


def vae_decode(vae: FlaxAutoencoderKL, params: dict, latents: jax.Array) -> jax.Array:
  """latents [B, h, w, C] (unscaled) -> images [B, 8h, 8w, 3], nominally in [-1, 1]."""
  def fn(module, z):
    return module.decoder(module.post_quant_conv(z), deterministic=True)
  return vae.apply({"params": params}, latents.astype(vae.dtype), method=fn)


# ----------------------------------------------------------------------------- text


def make_text_encoder(config: dict, dtype: Any = jnp.float32) -> FlaxCLIPTextModule:
  return FlaxCLIPTextModule(CLIPTextConfig(**config), dtype=dtype)


def text_encoder_param_shapes(module: FlaxCLIPTextModule) -> dict:
  ids = jnp.zeros((1, MAX_TOKENS), jnp.int32)
  return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids, ids, ids)["params"])


def load_text_encoder(folder: str | os.PathLike, dtype: Any = jnp.float32) -> tuple[FlaxCLIPTextModule, dict]:
  """Flax CLIP text encoder and float32 params from `<folder>/text_encoder`."""
  path = component_dir(folder, "text_encoder")
  module = make_text_encoder(read_config(path), dtype)
  params = weights.torch_to_flax(
      read_state_dict(path), text_encoder_param_shapes(module), flavour="transformers",
      ignore_prefixes=("text_model.embeddings.position_ids",), source=str(weight_file(path)))
  return module, _as_float32(params)


def text_encoder_state_dict(params: dict) -> dict[str, np.ndarray]:
  return weights.flax_to_torch(params, flavour="transformers")


def encode_text(module: FlaxCLIPTextModule, params: dict, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """input_ids [B, 77] -> (last hidden states [B, 77, D], pooled output [B, D]).

  The same two outputs as PyTorch `CLIPTextModel` without an attention mask (as SD uses it):
  the hidden states are the instruction context, the pooled output (end-of-text token after
  the final layer norm) is the reward-text embedding.
  """
  ids = jnp.asarray(input_ids, jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(ids.shape[-1]), ids.shape)
  out = module.apply({"params": params}, ids, jnp.ones_like(ids), positions, deterministic=True)
  return out.last_hidden_state, out.pooler_output


def load_tokenizer(folder: str | os.PathLike) -> CLIPTokenizer:
  return CLIPTokenizer.from_pretrained(str(component_dir(folder, "tokenizer")), local_files_only=True)


def bpe_byte_symbols() -> list[str]:
  """The 256 symbols CLIP's byte-level BPE uses for bytes, in byte order."""
  return list(bytes_to_unicode().values())


def tokenize(tokenizer: CLIPTokenizer, texts: Sequence[str]) -> np.ndarray:
  """Texts -> [B, 77] int32 ids, padded to max length and truncated (as SD does)."""
  return tokenizer(list(texts), padding="max_length", max_length=MAX_TOKENS, truncation=True,
                   return_tensors="np").input_ids.astype(np.int32)


# ----------------------------------------------------------------------------- surgery


def widen_conv_in(params: dict, in_channels: int) -> dict:
  """Stage-1 surgery: `conv_in` with more input channels, the old ones copied, the new ones zero."""
  kernel = np.asarray(params["conv_in"]["kernel"])
  old = kernel.shape[2]
  if in_channels < old:
    raise ValueError(f"conv_in: cannot narrow from {old} to {in_channels} input channels")
  wide = np.zeros(kernel.shape[:2] + (in_channels,) + kernel.shape[3:], kernel.dtype)
  wide[:, :, :old] = kernel
  return {**params, "conv_in": {**params["conv_in"], "kernel": wide}}


def _as_float32(tree):
  return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), tree)
