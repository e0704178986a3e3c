"""The `convert` job: a diffusers-format folder -> a project checkpoint in the workdir.

python main.py --config=configs/convert.py --config.source=DIR --workdir=OUT
"""

from __future__ import annotations

import os
from pathlib import Path

import ml_collections
from absl import logging

from mre_jax.errors import ConfigError, require, require_workdir
from mre_jax.io import checkpointing, export

REWARD = {"auto": None, "on": True, "off": False}  # config.reward -> unet_from_diffusers(reward=...)


def convert(config: ml_collections.ConfigDict, workdir: str | os.PathLike | None) -> Path:
  """Job: diffusers folder `config.source` -> project checkpoint in `workdir`."""
  workdir = require_workdir(workdir, "the project checkpoint is written there")
  source = Path(require(config, "source"))
  if config.reward not in REWARD:
    raise ConfigError(f"config.reward={config.reward!r}: expected 'auto', 'on' or 'off'")
  if not source.is_dir():
    raise FileNotFoundError(f"config.source={source}: not a folder (expected a diffusers-format model folder "
                            "with unet/, vae/, text_encoder/, tokenizer/)")
  checkpointing.check_output_dir(workdir, config.overwrite, "workdir")
  spec, params = export.unet_from_diffusers(source, reward=REWARD[config.reward], in_channels=config.in_channels,
                                            seed=config.seed)
  export.write_checkpoint(workdir, spec, params, source)
  logging.info("converted %s -> %s (reward=%s, in_channels=%d)", source, workdir, spec.reward, spec.unet.in_channels)
  print(f"wrote project checkpoint {workdir} (reward modules: {'on' if spec.reward else 'off'})")
  return Path(workdir)
