"""The `export` job: a project checkpoint -> a diffusers-format folder (safetensors only).

python main.py --config=configs/export.py --config.checkpoint=DIR --config.output_dir=OUT
"""

from __future__ import annotations

import os
from pathlib import Path

import ml_collections

from mre_jax.errors import require
from mre_jax.io import checkpointing, pretrained
from mre_jax.io.export import write_diffusers_folder


def export(config: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None) -> Path:
  """Job: project checkpoint `config.checkpoint` -> diffusers folder `config.output_dir`."""
  del workdir  # export writes only to output_dir
  ckpt = Path(require(config, "checkpoint"))
  output_dir = Path(require(config, "output_dir"))
  spec = checkpointing.read_spec(ckpt)  # a bad checkpoint is named before the output folder is looked at
  check_exportable_vae(checkpointing.frozen_dir(ckpt))
  checkpointing.check_output_dir(output_dir, config.overwrite, "output_dir")
  step, params = checkpointing.restore_params(ckpt, step=config.step, use_ema=config.use_ema)
  write_diffusers_folder(output_dir, spec, params, checkpointing.frozen_dir(ckpt))
  print(f"exported step {step} ({'EMA' if config.use_ema else 'raw'} params) of {ckpt} -> {output_dir}")
  return output_dir


def check_exportable_vae(frozen: Path) -> None:
  """Raises ValueError if `frozen`/vae has an image-conditioned decoder, which diffusers cannot load."""
  path = pretrained.component_dir(frozen, "vae") / "config.json"
  width = pretrained.read_config(path).get("image_condition_width", 0)
  if width:
    raise ValueError(f"{path}: image_condition_width={width}: this VAE's decoder also sees the input image, "
                     "which diffusers' AutoencoderKL cannot load; export a model trained with an SD-format VAE "
                     "(for the synthetic world: --config.model.vae=synthetic_64px_sharp)")
