"""Export a project checkpoint as a diffusers-format folder (safetensors only).

python main.py --config=configs/export.py --config.checkpoint=DIR --config.output_dir=OUT
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.job = "export"
  config.checkpoint = ""  # a project checkpoint folder (from convert or training)
  config.output_dir = ""  # the diffusers folder to write
  config.step = -1  # checkpoint step; -1 = latest
  config.use_ema = True  # export EMA params (False: raw params)
  config.overwrite = False  # replace a non-empty output_dir
  return config
