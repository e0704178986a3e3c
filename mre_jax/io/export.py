"""Weight interchange with the PyTorch world: diffusers folders <-> project checkpoints.

- `unet_from_diffusers` + `write_checkpoint`: a diffusers-format folder (SD 1.5,
  timbrooks/instruct-pix2pix, the release's stage-1/stage-2 folders) -> a project checkpoint
  (see `checkpointing`); the `convert` job (mre_jax/jobs/convert.py).
- `write_diffusers_folder`: a project checkpoint's U-Net params -> a diffusers-format folder that
  `StableDiffusionInstructPix2PixPipeline.from_pretrained` accepts and whose `unet/` loads into
  the release's U-Net class (or `torch_twin.MRERewardUNet`) with no missing or unexpected keys;
  the `export` job (mre_jax/jobs/export.py).

Both build their output in a temporary sibling folder and rename it into place at the end.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors.numpy import save_file

from mre_jax import models
from mre_jax.io import checkpointing, pretrained, weights

UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
TEXT_WEIGHTS = "model.safetensors"
DIFFUSERS_VERSION = "0.39.0"

# SD 1.5 / InstructPix2Pix schedule with the release's sampler (SPEC section 4).
SCHEDULER_CONFIG = {
    "_class_name": "EulerAncestralDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "steps_offset": 1,
    "timestep_spacing": "leading", "trained_betas": None, "rescale_betas_zero_snr": False,
}


def read_scheduler_config(folder: str | os.PathLike) -> dict:
  """`<folder>/scheduler/scheduler_config.json`, or SD 1.5's (`SCHEDULER_CONFIG`) if there is none."""
  path = Path(folder) / "scheduler" / "scheduler_config.json"
  return dict(pretrained.read_config(path)) if path.is_file() else dict(SCHEDULER_CONFIG)


MODEL_INDEX = {
    "_class_name": "StableDiffusionInstructPix2PixPipeline", "_diffusers_version": DIFFUSERS_VERSION,
    "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
    "safety_checker": [None, None], "scheduler": ["diffusers", "EulerAncestralDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
}


# ----------------------------------------------------------------------------- U-Net


def unet_from_diffusers(folder: str | os.PathLike, *, reward: bool | None = None, in_channels: int = 8,
                        seed: int = 0) -> tuple[checkpointing.ModelSpec, dict]:
  """Loads `<folder>/unet` as float32 Flax params of a `models.RewardUNet`.

  Args:
    folder: a diffusers-format model folder.
    reward: build the reward modules; None = exactly when the source has them. Reward modules
      the source lacks are initialised randomly from `seed` (as the release does in stage 2).
    in_channels: U-Net input channels; a 4-channel source (SD 1.5) is widened by
      `pretrained.widen_conv_in` (stage-1 surgery).

  Returns:
    (spec, params).
  """
  path = pretrained.component_dir(folder, "unet")
  source_cfg = models.UNetConfig.from_diffusers(pretrained.read_config(path), str(path / "config.json"))
  state = pretrained.read_state_dict(path)
  source = str(pretrained.weight_file(path))
  has_reward = any(k.split(".")[0] in models.REWARD_MODULES for k in state)
  reward = has_reward if reward is None else reward
  if has_reward and not reward:
    raise ValueError(f"{source}: holds reward modules ({', '.join(models.REWARD_MODULES)}) but reward is off")
  model = models.RewardUNet(source_cfg, reward=reward)
  shapes = models.unet_param_shapes(model)
  fresh = {}
  if reward and not has_reward:
    fresh = {k: v for k, v in models.init_unet_params(model, seed).items() if k in models.REWARD_MODULES}
    shapes = {k: v for k, v in shapes.items() if k not in fresh}
  params = {**weights.torch_to_flax(state, shapes, source=source), **fresh}
  params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)
  if source_cfg.in_channels != in_channels:
    params = pretrained.widen_conv_in(params, in_channels)
  cfg = models.UNetConfig(**{**source_cfg.__dict__, "in_channels": in_channels})
  return checkpointing.ModelSpec(cfg, reward, source=str(Path(folder).absolute())), params


def unet_state_dict(params: Any) -> dict[str, np.ndarray]:
  """Flax U-Net params -> PyTorch state dict with the release's names."""
  return weights.flax_to_torch(jax.device_get(params))


# ----------------------------------------------------------------------------- diffusers folders


def write_component(folder: Path, config: dict, state_dict: dict[str, np.ndarray], weights_name: str) -> None:
  """Writes `<folder>/config.json` and `<folder>/<weights_name>` (safetensors, PyTorch layout)."""
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text(json.dumps(config, indent=2))
  save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, str(folder / weights_name),
            metadata={"format": "pt"})


def copy_frozen_parts(source: str | os.PathLike, target: Path) -> None:
  """Copies vae/, text_encoder/, tokenizer/ and scheduler/ of a diffusers folder as safetensors."""
  for name, weights_name in (("vae", UNET_WEIGHTS), ("text_encoder", TEXT_WEIGHTS)):
    path = pretrained.component_dir(source, name)
    file = pretrained.weight_file(path)
    (target / name).mkdir(parents=True)
    shutil.copy2(path / "config.json", target / name / "config.json")
    if file.name == weights_name:
      shutil.copy2(file, target / name / weights_name)  # bit for bit
    else:  # sharded or .bin: rewrite as one safetensors file
      write_component(target / name, pretrained.read_config(path), pretrained.read_state_dict(path), weights_name)
  shutil.copytree(pretrained.component_dir(source, "tokenizer"), target / "tokenizer")
  scheduler = Path(source) / "scheduler" / "scheduler_config.json"
  (target / "scheduler").mkdir()
  if scheduler.is_file():
    shutil.copy2(scheduler, target / "scheduler" / "scheduler_config.json")
  else:
    (target / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2))


def write_diffusers_folder(target: str | os.PathLike, spec: checkpointing.ModelSpec, unet_params: Any,
                           frozen: str | os.PathLike) -> None:
  """A complete diffusers InstructPix2Pix folder at `target`: the U-Net from `spec` and `unet_params`, the
  frozen parts copied from the diffusers folder `frozen`. Built in a staging sibling and renamed into place
  (replacing what was at `target`) only when complete."""
  tmp = checkpointing.staging_dir(target)
  try:
    write_component(tmp / "unet", {**spec.unet.to_diffusers(), "_diffusers_version": DIFFUSERS_VERSION},
                    unet_state_dict(unet_params), UNET_WEIGHTS)
    copy_frozen_parts(frozen, tmp)
    (tmp / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    checkpointing.publish(tmp, target)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def write_checkpoint(target: str | os.PathLike, spec: checkpointing.ModelSpec, params: Any,
                     source: str | os.PathLike) -> None:
  """A project checkpoint at `target`: `params` saved as step 0 (raw and EMA params alike), `spec`, and
  the frozen parts of the diffusers folder `source`. Staged and renamed into place like
  `write_diffusers_folder`."""
  tmp = checkpointing.staging_dir(target)
  try:
    copy_frozen_parts(source, checkpointing.frozen_dir(tmp))
    manager = checkpointing.make_manager(tmp)
    checkpointing.save_params(manager, 0, params, params)
    manager.close()
    checkpointing.write_spec(tmp, spec)
    checkpointing.publish(tmp, target)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
