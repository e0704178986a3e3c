"""Serve a web editing page (Gradio) for one model on this machine.

python main.py --config=configs/serve.py --config.checkpoint=DIR [--config.port=7860]
python main.py --config=configs/serve.py --config.checkpoint=/tmp/mre_demo --config.resolution=64

The model loads and compiles once at start; the page's sliders, seed and reward text change
traced values only. The URL is printed once the server listens (port 0: a free port).
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.job = "serve"
  # A project checkpoint, a training workdir, or a diffusers-format InstructPix2Pix folder.
  config.checkpoint = ""
  config.step = -1  # checkpoint step; -1 = latest (diffusers folders: ignored)
  config.use_ema = True  # checkpoint: EMA params (False: raw params)
  config.dtype = "float32"  # U-Net compute dtype: float32 or bfloat16 (VAE, text encoder: float32)

  # Server.
  config.host = "127.0.0.1"  # address to listen on (0.0.0.0: every interface; the page has no login)
  config.port = 7860  # TCP port; 0 picks a free one (the printed URL names it)
  config.queue_size = 16  # edits that may wait in the queue; more are refused with "queue full"
  config.max_upload_mb = 50  # largest upload in MB (Gradio refuses bigger files)
  config.max_megapixels = 50.0  # larger images are refused on the page, naming this limit
  config.warmup = True  # compile the sampler for the default steps/scheduler and a square image at start
  config.examples = 7  # synthetic test-split examples in the gallery (one per edit category); 0: none
  config.examples_seed = 0  # seed of the synthetic world the examples come from

  # Working size: every edit runs at the scale of `resolution` (the demo model: 64).
  config.resolution = 512  # R, a positive multiple of 64 (see configs/edit.py)
  config.size_rule = "release"  # release (longer side near R) or short_side (shorter side R)

  # The page's initial values (a visitor changes them per edit).
  config.scheduler = "euler_ancestral"  # euler_ancestral (release), euler or ddim
  config.steps = 30  # denoising steps
  config.max_steps = 100  # the steps slider's maximum
  config.text_guidance = 7.5  # g_text: instruction guidance scale
  config.image_guidance = 1.5  # g_image: input-image guidance scale
  config.seed = 0  # noise seed
  config.scores = (5.0, 5.0, 5.0)  # following, preserving, quality; each in [0, 5]
  config.reward_text = "None; None; None"  # failure descriptions, joined with "; "
  return config
