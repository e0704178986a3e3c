"""Frozen and pretrained parts from diffusers-format folders: files, VAE, CLIP text encoder, tokenizer.

Everything is loaded from local diffusers-format folders (`unet/`, `vae/`, `text_encoder/`,
`tokenizer/`); nothing is fetched from a hub. Weights are read from safetensors, or from
PyTorch `.bin` files only through `torch.load(weights_only=True)`. The models are ours
(mre_jax/models/); transformers is used for the CLIP tokenizer only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from mre_jax import models, ops
from mre_jax.data import tokens
from mre_jax.io import weights

if TYPE_CHECKING:
  from transformers import CLIPTokenizer

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
    import torch  # the [torch] extra: only .bin files need it
  except ImportError as e:
    raise ImportError(f"{file}: reading .bin weights needs PyTorch (pip install 'mre_jax[torch]')") from e
  state = torch.load(file, map_location="cpu", weights_only=True)
  return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()}


def _read_safetensors(file: Path) -> dict[str, np.ndarray]:
  try:
    return safetensors.numpy.load_file(str(file))
  except Exception as e:  # safetensors raises its own error types
    raise ValueError(f"{file}: cannot read safetensors file: {e}") from e


# ----------------------------------------------------------------------------- VAE


def make_vae(config: Mapping[str, Any] | models.VAEConfig, dtype: Any = jnp.float32,
             kernels: ops.Kernels = ops.Kernels()) -> models.AutoencoderKL:
  """Our VAE for a diffusers `AutoencoderKL` config (a dict, as in `vae/config.json`)."""
  if not isinstance(config, models.VAEConfig):
    config = models.VAEConfig.from_diffusers(config)
  return models.AutoencoderKL(config, dtype=dtype, kernels=kernels)


def vae_param_shapes(vae: models.AutoencoderKL) -> dict:
  images = jnp.zeros((1, 8, 8, vae.config.in_channels))
  return jax.eval_shape(lambda: vae.init(jax.random.PRNGKey(0), images))["params"]


def load_vae(folder: str | os.PathLike, dtype: Any = jnp.float32,
             kernels: ops.Kernels = ops.Kernels()) -> tuple[models.AutoencoderKL, dict]:
  """Our VAE and its float32 params from `<folder>/vae`."""
  path = component_dir(folder, "vae")
  vae = models.AutoencoderKL(models.VAEConfig.from_diffusers(read_config(path), str(path / "config.json")),
                             dtype=dtype, kernels=kernels)
  return vae, vae_params(read_state_dict(path), vae, source=str(weight_file(path)))


def vae_params(state_dict: Mapping[str, np.ndarray], vae: models.AutoencoderKL, source: str = "state dict") -> dict:
  """float32 params of `vae` from a PyTorch `AutoencoderKL` state dict (old attention names too)."""
  return _as_float32(weights.torch_to_flax(state_dict, vae_param_shapes(vae), aliases=VAE_ALIASES, source=source))


def vae_state_dict(params: dict) -> dict[str, np.ndarray]:
  return weights.flax_to_torch(params, aliases=VAE_ALIASES)


def vae_encode(vae: models.AutoencoderKL, params: dict, images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """images [B, H, W, 3] in [-1, 1] -> (mean, logvar), each [B, H/8, W/8, C] (unscaled)."""
  return vae.apply({"params": params}, images, method=models.AutoencoderKL.encode)


def vae_decode(vae: models.AutoencoderKL, params: dict, latents: jax.Array, images: jax.Array | None = None
               ) -> jax.Array:
  """latents [B, h, w, C] (unscaled) -> images [B, 8h, 8w, 3], nominally in [-1, 1].

  `images`: the input images [B, 8h, 8w, 3] in [-1, 1], for an image-conditioned decoder
  (`vae.config.image_condition_width` > 0; ignored otherwise).
  """
  return vae.apply({"params": params}, latents, images, method=models.AutoencoderKL.decode)


# ----------------------------------------------------------------------------- text


def make_text_encoder(config: Mapping[str, Any] | models.CLIPTextConfig, dtype: Any = jnp.float32,
                      kernels: ops.Kernels = ops.Kernels()) -> models.CLIPTextEncoder:
  """Our CLIP text encoder for a transformers `CLIPTextConfig` dict (`text_encoder/config.json`)."""
  if not isinstance(config, models.CLIPTextConfig):
    config = models.CLIPTextConfig.from_dict(config)
  return models.CLIPTextEncoder(config, dtype=dtype, kernels=kernels)


def text_encoder_param_shapes(module: models.CLIPTextEncoder) -> dict:
  ids = jnp.zeros((1, tokens.MAX_LENGTH), jnp.int32)
  return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids))["params"]


def load_text_encoder(folder: str | os.PathLike, dtype: Any = jnp.float32,
                      kernels: ops.Kernels = ops.Kernels()) -> tuple[models.CLIPTextEncoder, dict]:
  """Our CLIP text encoder and its float32 params from `<folder>/text_encoder`."""
  path = component_dir(folder, "text_encoder")
  module = make_text_encoder(models.CLIPTextConfig.from_dict(read_config(path), str(path / "config.json")),
                             dtype, kernels)
  return module, text_encoder_params(read_state_dict(path), module, source=str(weight_file(path)))


def text_encoder_params(state_dict: Mapping[str, np.ndarray], module: models.CLIPTextEncoder,
                        source: str = "state dict") -> dict:
  """float32 params of `module` from a PyTorch `CLIPTextModel` state dict.

  transformers 4 names its tensors `text_model.<...>` (SD 1.5's files, our exports); transformers
  5 saves them without that prefix. Both load.
  """
  if not any(k.startswith("text_model.") for k in state_dict):
    state_dict = {f"text_model.{k}": v for k, v in state_dict.items()}
  return _as_float32(weights.torch_to_flax(
      state_dict, text_encoder_param_shapes(module), flavour="transformers",
      ignore_prefixes=("text_model.embeddings.position_ids",), source=source))


def text_encoder_state_dict(params: dict) -> dict[str, np.ndarray]:
  return weights.flax_to_torch(params, flavour="transformers")


def encode_text(module: models.CLIPTextEncoder, params: dict, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """input_ids [B, 77] -> (last hidden states [B, 77, D], pooled output [B, D]).

  The same two outputs as PyTorch `CLIPTextModel` without an attention mask (as SD uses it):
  the hidden states are the instruction context, the pooled output (end-of-text token after
  the final layer norm) is the reward-text embedding.
  """
  return module.apply({"params": params}, input_ids)


def load_tokenizer(folder: str | os.PathLike) -> CLIPTokenizer:
  """The CLIP tokenizer of `<folder>/tokenizer`; texts -> ids with mre_jax.data.tokens.tokenize."""
  # On use: `import transformers` takes seconds, and the tokenizer is all this project uses of it.
  from transformers import CLIPTokenizer
  return CLIPTokenizer.from_pretrained(str(component_dir(folder, "tokenizer")), local_files_only=True)


def bpe_byte_symbols() -> list[str]:
  """The 256 symbols CLIP's byte-level BPE (GPT-2's) uses for bytes, in its vocabulary's order.

  A byte that is a visible Latin-1 character stands for itself; the others (controls, space,
  soft hyphen, ...) take the code points from 256 up, in byte order, so that no symbol is blank.
  The vocabulary lists the visible bytes first (in byte order), then the others.
  """
  visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
  others = [b for b in range(256) if b not in visible]
  return [chr(b) for b in visible] + [chr(256 + i) for i in range(len(others))]


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
