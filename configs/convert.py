"""Convert a diffusers-format folder into a project checkpoint.

python main.py --config=configs/convert.py --config.source=DIR --workdir=OUT
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.job = "convert"
  # A local diffusers-format folder: SD 1.5 (stage-1 start), timbrooks/instruct-pix2pix or the
  # release's stage-1/stage-2 folders. It needs unet/, vae/, text_encoder/, tokenizer/.
  config.source = ""
  config.reward = "auto"  # reward modules: auto (as in source), on (random init if absent), off
  config.in_channels = 8  # U-Net input channels; a 4-channel source is widened (copy + zeros)
  config.seed = 0  # init seed of reward modules the source lacks
  config.overwrite = False  # replace a non-empty workdir
  return config
