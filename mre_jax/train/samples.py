"""Sample grids written during training: labelled, upscaled PNG tiles of held-out edits."""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mre_jax import models
from mre_jax.data import input_pipeline, tokens
from mre_jax.infer import sampling
from mre_jax.io import pretrained
from mre_jax.train.trainer import Frozen

GRID_HEADER = 24  # pixels of the label row


GRID_LABELS = ("input", "truth", "target", "edit at 5,5,5", "edit at target's rewards")


def make_sample_grid_fn(config: ml_collections.ConfigDict, unet: models.RewardUNet, frozen: Frozen,
                        batch: dict[str, np.ndarray]) -> Callable[[Any, dict], np.ndarray]:
  """fn(ema_params, fparams) -> uint8 grid image of `batch` (see `_sample_grid`), built once per run.

  The device part of every grid (text encoding and both sets of edits) is one jitted program,
  `_grid_edits`, traced at the first grid of a run only.
  """
  spec = sampling.spec_from_scheduler_config(frozen.scheduler_config, "euler_ancestral", config.sample.steps)
  sample_fn = sampling.make_sample_fn(unet, frozen.vae, frozen.scaling_factor, spec)
  n = batch["original"].shape[0]
  inputs = {k: batch[k] for k in ("original", "instruction_ids", "reward_ids", "scores")}
  inputs["best_ids"] = tokens.tokenize(frozen.tokenizer, ["; ".join(input_pipeline.BEST_REWARD_TEXTS)] * n)
  inputs["keys"] = sampling.seed_keys(range(n))
  inputs["guidance"] = np.asarray([config.sample.text_guidance, config.sample.image_guidance], np.float32)
  edits_fn = jax.jit(functools.partial(_grid_edits, sample_fn, frozen.text_encoder))
  return functools.partial(_sample_grid, edits_fn, inputs, batch, config.sample.tile)


def _grid_edits(sample_fn, text_encoder, ema_params, fparams, inputs: dict) -> tuple[jax.Array, jax.Array]:
  """The edits of a grid: (at (5, 5, 5) and "None; None; None", at the target's own rewards).

  inputs: original float32 [n, H, W, 3] in [-1, 1]; instruction_ids, reward_ids, best_ids (the
  best reward text) int32 [n, 77]; scores float32 [n, 3]; keys uint32 [n, 2]; guidance float32 [2]
  (text, image).
  Returns two float32 [n, H, W, 3] in [0, 1].
  """
  encode = functools.partial(pretrained.encode_text, text_encoder, fparams["text"])
  ids = inputs["instruction_ids"]
  context, _ = encode(ids)
  null_context, _ = encode(jnp.broadcast_to(fparams["empty_ids"], ids.shape))
  _, best = encode(inputs["best_ids"])
  _, own = encode(inputs["reward_ids"])
  best_scores = jnp.tile(jnp.asarray(input_pipeline.BEST_SCORES, jnp.float32), (ids.shape[0], 1))
  cond = sampling.Conditioning(inputs["original"], context, null_context, best_scores, best, inputs["keys"])
  guidance = inputs["guidance"]
  at_best, _ = sample_fn(ema_params, fparams["vae"], cond, guidance)
  at_own, _ = sample_fn(ema_params, fparams["vae"], cond._replace(scores=inputs["scores"], reward_embeds=own),
                        guidance)
  return at_best, at_own


def _sample_grid(edits_fn, inputs: dict, batch, tile: int, ema_params, fparams) -> np.ndarray:
  """uint8 grid: a header row of labels, then per example: input | truth (if the data has it) |
  target | edit at (5, 5, 5) and "None; None; None" | edit at the target's own rewards; tiles
  upscaled (nearest) to at least `tile` pixels."""
  at_best, at_own = jax.device_get(edits_fn(ema_params, fparams, inputs))
  to01 = lambda x: np.clip(np.asarray(x) / 2 + 0.5, 0, 1)
  columns = [to01(batch["original"])] + ([to01(batch["truth"])] if "truth" in batch else [])
  columns += [to01(batch["edited"]), np.asarray(at_best), np.asarray(at_own)]
  labels = GRID_LABELS if "truth" in batch else GRID_LABELS[:1] + GRID_LABELS[2:]
  return labelled_grid(columns, labels, tile)


def labelled_grid(columns: list[np.ndarray], labels: Sequence[str], tile: int) -> np.ndarray:
  """uint8 [header + n * T, len(columns) * T, 3] from columns of float [n, H, W, 3] in [0, 1]:
  each image upscaled by nearest neighbour to T = H * ceil(tile / H) pixels, one label per column."""
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
