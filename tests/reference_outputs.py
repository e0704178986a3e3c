"""Reference parameter trees and outputs of the U-Net, VAE and CLIP text encoder, saved to a fixture.

tests/fixtures/reference_models.npz and reference_trees.json.gz were written by this script from the
code before the models were rewritten in mre_jax/models/ (commit 6180f01, which built them from
diffusers' and transformers' Flax classes):

    PYTHONPATH=<checkout of 6180f01> python tests/reference_outputs.py tests/fixtures

tests/test_reference.py checks that today's modules have exactly those parameter trees (so
checkpoints and converted folders written before still load) and give the same outputs from the
same weights. Weights are drawn per parameter name (`named_params`), so they do not depend on the
order in which a module creates its parameters. Only public functions of models / pretrained are
used, so the script runs against both versions of the code.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import sys
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mre_jax import models
from mre_jax.io import pretrained
from mre_jax.models import tiny

SD_WIDTH = models.UNetConfig(
    block_out_channels=(320, 640), layers_per_block=1, attention_head_dim=8, cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
# Every optional block feature at once: linear projections, cross-attention only, 2 transformer
# layers per block, per-block head counts, 3 levels with 2 resnets each.
VARIANT = dataclasses.replace(
    tiny.UNET, use_linear_projection=True, only_cross_attention=True, transformer_layers_per_block=2,
    attention_head_dim=(4, 8, 8), layers_per_block=2, block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
UNETS = {"tiny": (tiny.UNET, True), "tiny_plain": (tiny.UNET, False), "sdwidth": (SD_WIDTH, True),
         "sd15": (models.UNetConfig(), True), "variant": (VARIANT, True)}
SD_VAE = {**tiny.VAE, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32}
VAES = {"tiny": tiny.VAE, "sd": SD_VAE}
VIT_L = {**tiny.text_config(49408), "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
         "num_hidden_layers": 12, "projection_dim": 768}
CLIPS = {"tiny": tiny.text_config(1000), "vitl": VIT_L}
# What is run (the others are only compared by parameter tree): U-Nets at 8x8 latents, batch 2.
RUN_UNETS = ("tiny", "tiny_plain", "variant", "sdwidth")


def flat_shapes(tree) -> dict[str, tuple[int, ...]]:
  return {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def named_params(shapes, seed: int) -> dict:
  """float32 weights for a shape tree, each drawn from a generator seeded by its path and `seed`.

  Kernels ~ U(+-1/sqrt(fan in)) as PyTorch's default init; norm scales 1 + N(0, 0.1) and biases
  N(0, 0.1), so no norm is left at the identity; embeddings N(0, 1).
  """
  out = {}
  for path, shape in flat_shapes(shapes).items():
    rng = np.random.default_rng([seed, zlib.crc32(path.encode())])
    name = path.rsplit("/", 1)[-1]
    if name == "embedding":
      value = rng.standard_normal(shape)
    elif name == "scale":
      value = 1 + 0.1 * rng.standard_normal(shape)
    elif name == "bias":
      value = 0.1 * rng.standard_normal(shape)
    else:
      bound = 1 / np.sqrt(max(int(np.prod(shape[:-1])), 1))
      value = rng.uniform(-bound, bound, shape)
    out[tuple(path.split("/"))] = value.astype(np.float32)
  return traverse_util.unflatten_dict(out)


def unet_inputs(cfg, seed: int, batch: int = 2, size: int = 8) -> dict[str, np.ndarray]:
  r = np.random.default_rng(seed)
  return dict(sample=r.standard_normal((batch, size, size, cfg.in_channels)).astype(np.float32),
              timesteps=np.array([17, 803][:batch]),
              context=r.standard_normal((batch, 77, cfg.cross_attention_dim)).astype(np.float32),
              scores=r.uniform(0, 5, (batch, 3)).astype(np.float32),
              reward_embeds=r.standard_normal((batch, cfg.cross_attention_dim)).astype(np.float32))


def vae_inputs(seed: int) -> tuple[np.ndarray, np.ndarray]:
  r = np.random.default_rng(seed)
  return r.uniform(-1, 1, (2, 32, 24, 3)).astype(np.float32), r.standard_normal((2, 4, 3, 4)).astype(np.float32)


def text_ids(vocab_size: int) -> np.ndarray:
  """[3, 77]: start, words, end-of-text (the top id, as CLIP's), padded with end-of-text."""
  ids = np.full((3, 77), vocab_size - 1, np.int32)
  ids[:, 0] = vocab_size - 2
  for row, n in enumerate((5, 12, 0)):
    ids[row, 1:1 + n] = np.random.default_rng(row).integers(0, vocab_size - 2, n)
  return ids


def run_unet(name: str, dtype=jnp.float32) -> np.ndarray:
  cfg, reward = UNETS[name]
  model = models.RewardUNet(cfg, reward=reward, dtype=dtype)
  params = named_params(models.unet_param_shapes(model), seed=1)
  x = unet_inputs(cfg, seed=2)
  if not reward:
    x = {k: x[k] for k in ("sample", "timesteps", "context")}
  out = jax.jit(lambda p, x: model.apply({"params": p}, **x))(params, x)
  return np.asarray(out, np.float32)


def run_vae(dtype=jnp.float32) -> dict[str, np.ndarray]:
  vae = pretrained.make_vae(tiny.VAE, dtype)
  params = named_params(pretrained.vae_param_shapes(vae), seed=3)
  images, latents = vae_inputs(seed=4)
  mean, logvar = pretrained.vae_encode(vae, params, images)
  decoded = pretrained.vae_decode(vae, params, latents)
  return {"mean": np.asarray(mean, np.float32), "logvar": np.asarray(logvar, np.float32),
          "decoded": np.asarray(decoded, np.float32)}


def run_clip(dtype=jnp.float32) -> dict[str, np.ndarray]:
  module = pretrained.make_text_encoder(CLIPS["tiny"], dtype)
  params = named_params(pretrained.text_encoder_param_shapes(module), seed=5)
  hidden, pooled = pretrained.encode_text(module, params, text_ids(1000))
  return {"hidden": np.asarray(hidden, np.float32), "pooled": np.asarray(pooled, np.float32)}


def param_trees() -> dict[str, dict[str, list[int]]]:
  trees = {f"unet_{k}": flat_shapes(models.unet_param_shapes(models.RewardUNet(c, reward=r)))
           for k, (c, r) in UNETS.items()}
  trees.update({f"vae_{k}": flat_shapes(pretrained.vae_param_shapes(pretrained.make_vae(c))) for k, c in VAES.items()})
  trees.update({f"clip_{k}": flat_shapes(pretrained.text_encoder_param_shapes(pretrained.make_text_encoder(c)))
                for k, c in CLIPS.items()})
  return {k: {p: list(s) for p, s in v.items()} for k, v in trees.items()}


def outputs() -> dict[str, np.ndarray]:
  out = {f"unet_{name}": run_unet(name) for name in RUN_UNETS}
  out["unet_tiny_bfloat16"] = run_unet("tiny", jnp.bfloat16)
  out.update({f"vae_{k}": v for k, v in run_vae().items()})
  out.update({f"clip_{k}": v for k, v in run_clip().items()})
  return out


def main(folder: str) -> None:
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  with gzip.open(folder / "reference_trees.json.gz", "wt") as f:
    json.dump(param_trees(), f, sort_keys=True)
  np.savez_compressed(folder / "reference_models.npz", **outputs())


if __name__ == "__main__":
  main(sys.argv[1])
