"""Prints seconds per edit of the JAX editing pipeline and of diffusers' PyTorch pipeline.

  PYTHONPATH=. python benchmarks/edit.py [--size=256] [--steps=30] [--batches=1,4] [--reps=1] \
      [--models=tiny,320ch]

Both run the same random weights (a tiny diffusers-format folder; `320ch` swaps in a
320/640-channel U-Net with the tiny VAE and text encoder) with Euler ancestral and three-way
guidance on the same machine. JAX: the editor's jitted sampler (one program: VAE encode,
denoising loop, decode) compiled ahead of time (compile time printed separately), then timed
with text encoding and host transfer included. PyTorch: `StableDiffusionInstructPix2PixPipeline`
with `torch_twin.MRERewardUNet`, after a one-step warm-up call at the same batch size. The last line is `speedup_vs_pytorch=<PyTorch s/edit / JAX s/edit>` for 320ch at batch 1.
"""
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mre_jax import (
  models,  # pylint: disable=g-import-not-at-top
  testing,
)
from mre_jax.infer import edit, sampling
from mre_jax.models import tiny

_SIZE = flags.DEFINE_integer("size", 256, "Image side in pixels (a multiple of 64).")
_STEPS = flags.DEFINE_integer("steps", 30, "Denoising steps.")
_BATCHES = flags.DEFINE_list("batches", ["1", "4"], "Batch sizes (images per call).")
_REPS = flags.DEFINE_integer("reps", 1, "Least timed calls per setting (after compile / warm-up; and >= 3 s).")
_MODELS = flags.DEFINE_list("models", ["tiny", "320ch"], "Which U-Nets: tiny, 320ch.")

UNETS = {
    "tiny": tiny.UNET,
    # SD 1.5's first two levels (320, 640 channels); context width of the tiny text encoder.
    "320ch": models.UNetConfig(
        block_out_channels=(320, 640), layers_per_block=1, attention_head_dim=8, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        sample_size=32),
}
PROMPTS = ("make it blue", "add snow", "turn the sky red", "make it a painting")


def _inputs(batch, size):
  from PIL import Image
  r = np.random.default_rng(0)
  images = [Image.fromarray(r.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(batch)]
  return images, [PROMPTS[i % len(PROMPTS)] for i in range(batch)]


def _mean_seconds(fn, reps, min_seconds=3.0):
  """Mean seconds per call over at least `reps` calls and at least `min_seconds` in all."""
  start, calls = time.perf_counter(), 0
  while calls < reps or time.perf_counter() - start < min_seconds:
    fn()
    calls += 1
  return (time.perf_counter() - start) / calls


def _jax(folder, batch, size, steps, reps):
  """(seconds per call, compile seconds): the sampler compiled ahead of time, then timed."""
  editor = edit.load_editor(folder)
  images, prompts = _inputs(batch, size)
  pixels = np.stack([edit.prepare_image(im, size) for im in images])
  guidance = np.asarray([7.5, 1.5], np.float32)

  def call(fn):
    cond = edit.make_conditioning(editor, pixels, prompts, seeds=range(batch))  # text encoding included
    images, finite = fn(editor.unet_params, editor.vae_params, cond, guidance)
    sampling.check_finite(finite)
    return np.asarray(images)
  cond = edit.make_conditioning(editor, pixels, prompts, seeds=range(batch))
  start = time.perf_counter()
  compiled = edit.sampler(editor, steps, "euler_ancestral").lower(
      editor.unet_params, editor.vae_params, cond, guidance).compile()
  compile_s = time.perf_counter() - start
  return _mean_seconds(lambda: call(compiled), reps), compile_s


def _torch(folder, batch, size, steps, reps):
  """Seconds per call, after a one-step warm-up call at the same batch size."""
  import torch
  from diffusers import StableDiffusionInstructPix2PixPipeline

  from mre_jax.io import torch_twin
  twin = torch_twin.MRERewardUNet.from_pretrained(Path(folder) / "unet").eval()
  editor = edit.load_editor(folder)
  _, pooled = edit.encode_texts(editor, [edit.DEFAULT_REWARD_TEXT])
  twin.set_default_rewards(torch.tensor(edit.DEFAULT_SCORES), torch.tensor(pooled[0]))
  pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(folder, unet=twin, safety_checker=None)
  pipe.set_progress_bar_config(disable=True)
  images, prompts = _inputs(batch, size)

  def call(num_steps):
    with torch.inference_mode():
      pipe(prompts, image=images, num_inference_steps=num_steps, output_type="np",
           generator=torch.Generator().manual_seed(0))
  call(1)
  return _mean_seconds(lambda: call(steps), reps)


def main(argv):
  del argv
  size, steps, reps = _SIZE.value, _STEPS.value, _REPS.value
  import jax
  import torch
  print(f"devices: jax {jax.devices()[0].platform} ({os.cpu_count()} cpus), torch {torch.get_num_threads()} threads; "
        f"{size}px, {steps} steps, Euler ancestral, 3-way guidance")
  speedup = None
  with tempfile.TemporaryDirectory() as tmp:
    for name in _MODELS.value:
      folder = testing.write_tiny_model_folder(Path(tmp) / name, unet=UNETS[name])
      for batch in map(int, _BATCHES.value):
        jax_s, compile_s = _jax(folder, batch, size, steps, reps)
        torch_s = _torch(folder, batch, size, steps, reps)
        ratio = torch_s / jax_s
        print(f"{name:6s} batch {batch}: jax {jax_s / batch:.3f} s/edit (compile {compile_s:.1f} s), "
              f"pytorch {torch_s / batch:.3f} s/edit, speedup {ratio:.2f}x", flush=True)
        if name == "320ch" and batch == 1:
          speedup = ratio
  print(f"speedup_vs_pytorch={speedup:.2f}" if speedup is not None else "speedup_vs_pytorch=nan")


if __name__ == "__main__":
  app.run(main)
