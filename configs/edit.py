"""Edit images with a trained (or converted) model: one image, or a JSONL file of requests.

python main.py --config=configs/edit.py --config.checkpoint=DIR --config.image=in.jpg \
    --config.instruction="make it winter" --config.output=out.png
python main.py --config=configs/edit.py --config.checkpoint=DIR --config.requests=edits.jsonl

A requests file has one JSON object per line: {"image": path, "instruction": text} plus optional
"output" (path), "scores" ([3 numbers in 0..5]), "seed" (int), "reward_text" (string); relative
paths are relative to the requests file. Every output and a results JSONL (one record per line,
with "status" "ok" or "error" and the reason) are written; a failing request does not stop the
others.
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.job = "edit"
  # A project checkpoint (from convert or training) or a diffusers-format InstructPix2Pix folder
  # (e.g. the release's stage-2 folder: unet/ with the reward modules, vae/, text_encoder/, ...).
  config.checkpoint = ""
  config.step = -1  # checkpoint step; -1 = latest (diffusers folders: ignored)
  config.use_ema = True  # checkpoint: EMA params (False: raw params)
  config.dtype = "float32"  # U-Net compute dtype: float32 or bfloat16 (VAE, text encoder: float32)
  # Kernel families (mre_jax/ops); "auto" picks per layer from the backend, dtype and shapes.
  config.attention = "auto"  # auto | xla | cudnn (GPU) | splash (TPU) | cpu (C++, XLA:CPU)
  config.conv = "auto"  # auto | xla | winograd
  config.norm = "auto"  # GroupNorm: auto | xla | cpu

  # Single edit.
  config.image = ""  # input image (any format and mode PIL reads)
  config.instruction = ""  # the edit, e.g. "make it winter"
  config.output = ""  # single: output image file (.png, .jpg, ...); batch: output folder
  config.overwrite = False  # replace existing output files

  # Batch mode (instead of image/instruction).
  config.requests = ""  # JSONL file of requests (see above)
  config.results = ""  # results JSONL; default <output folder>/results.jsonl
  config.batch_size = 1  # requests of the same working size per sampler call

  # Sampler (SPEC section 4).
  config.scheduler = "euler_ancestral"  # euler_ancestral (release), euler or ddim (deterministic)
  config.steps = 30  # denoising steps
  config.text_guidance = 7.5  # g_text: instruction guidance scale
  config.image_guidance = 1.5  # g_image: input-image guidance scale
  config.seed = 0  # noise seed (batch: default for requests without one)
  config.resolution = 512  # R, a positive multiple of 64: the scale of the working size (see size_rule)
  # release: the release's evaluation (SPEC section 4): longer side near R, shorter side rounded up
  # to a multiple of 64 (1536x1024 -> 576x384); short_side: the paper's text, shorter side R (768x512).
  config.size_rule = "release"

  # Reward condition: the best by default (SPEC section 4).
  config.scores = (5.0, 5.0, 5.0)  # following, preserving, quality; each in [0, 5]
  config.reward_text = "None; None; None"  # failure descriptions, joined with "; "
  return config
