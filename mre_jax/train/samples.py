"""Sample grids written during training: labelled, upscaled PNG tiles of held-out edits."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mre_jax.data import input_pipeline, tokens
from mre_jax.infer import sampling
from mre_jax.io import pretrained
from mre_jax.train.trainer import Frozen

GRID_HEADER = 24  # pixels of the label row


GRID_LABELS = ("input", "truth", "target", "edit at 5,5,5", "edit at target's rewards")


def make_sample_grid_fn(config, unet, frozen: Frozen, batch):
  """fn(ema_params, fparams) -> uint8 grid image of `batch` (see `_sample_grid`), built once per run."""
  spec = sampling.spec_from_scheduler_config(frozen.scheduler_config, "euler_ancestral", config.sample.steps)
  sample_fn = sampling.make_sample_fn(unet, frozen.vae, frozen.scaling_factor, spec)
  encode = jax.jit(functools.partial(pretrained.encode_text, frozen.text_encoder))
  return functools.partial(_sample_grid, sample_fn, encode, batch, frozen, config.sample.tile)


def _sample_grid(sample_fn, encode, batch, frozen: Frozen, tile: int, ema_params, fparams) -> np.ndarray:
  """uint8 grid: a header row of labels, then per example: input | truth (if the data has it) |
  target | edit at (5, 5, 5) and "None; None; None" | edit at the target's own rewards; tiles
  upscaled (nearest) to at least `tile` pixels."""
  from mre_jax.infer import sampling
  n = batch["original"].shape[0]
  best_text = tokens.tokenize(frozen.tokenizer, ["; ".join(input_pipeline.BEST_REWARD_TEXTS)] * n)
  context, _ = encode(fparams["text"], batch["instruction_ids"])
  null_context, _ = encode(fparams["text"], jnp.broadcast_to(fparams["empty_ids"], batch["instruction_ids"].shape))
  _, best = encode(fparams["text"], best_text)
  _, own = encode(fparams["text"], batch["reward_ids"])
  best_scores = np.tile(np.asarray(input_pipeline.BEST_SCORES, np.float32), (n, 1))
  cond = sampling.Conditioning(batch["original"], context, null_context, best_scores, best,
                               sampling.seed_keys(range(n)))
  guidance = np.asarray([sampling.TEXT_GUIDANCE, sampling.IMAGE_GUIDANCE], np.float32)
  at_best, _ = sample_fn(ema_params, fparams["vae"], cond, guidance)
  at_own, _ = sample_fn(ema_params, fparams["vae"], cond._replace(scores=batch["scores"], reward_embeds=own), guidance)
  to01 = lambda x: np.clip(np.asarray(x) / 2 + 0.5, 0, 1)
  columns = [to01(batch["original"])] + ([to01(batch["truth"])] if "truth" in batch else [])
  columns += [to01(batch["edited"]), np.asarray(at_best), np.asarray(at_own)]
  labels = GRID_LABELS if "truth" in batch else GRID_LABELS[:1] + GRID_LABELS[2:]
  return labelled_grid(columns, labels, tile)


def labelled_grid(columns: list[np.ndarray], labels, tile: int) -> np.ndarray:
  """uint8 [header + n * T, len(columns) * T, 3] from columns of float [n, H, W, 3] in [0, 1]:
  each image upscaled by nearest neighbour to T = H * ceil(tile / H) pixels, one label per column."""
  from PIL import Image, ImageDraw, ImageFont
  scale = max(1, -(-tile // columns[0].shape[1]))
  up = [np.repeat(np.repeat(np.asarray(c), scale, axis=1), scale, axis=2) for c in columns]
  body = np.concatenate([np.concatenate(list(c), axis=0) for c in up], axis=1)
  body = (np.clip(body, 0, 1) * 255).round().astype(np.uint8)
  header = Image.new("RGB", (body.shape[1], GRID_HEADER), (255, 255, 255))
  draw = ImageDraw.Draw(header)
  width = up[0].shape[2]
  font = ImageFont.load_default(size=max(8, min(16, width // 12)))
  for i, label in enumerate(labels):
    draw.text((i * width + 4, 4), label, fill=(0, 0, 0), font=font)
  return np.concatenate([np.asarray(header), body], axis=0)
