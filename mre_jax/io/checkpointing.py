"""The project checkpoint: one layout for every job.

```
<dir>/
  mre_model.json     the model: U-Net architecture (diffusers config keys), reward on/off,
                     where the weights came from, the kernels the run used; written once
  frozen/            the frozen parts as a diffusers-format folder in PyTorch layout
                     (vae/, text_encoder/, tokenizer/, scheduler/; safetensors); written once
  state/<step>/      Orbax: items `params`, `ema_params` (U-Net + reward modules, float32),
                     and whatever training adds (`opt_state`, `meta`, data iterator state)
```

`convert` writes step 0 (params == EMA params), training continues it, editing and export
read it (EMA weights by default).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from mre_jax import models, ops
from mre_jax.io import files

MODEL_FILE = "mre_model.json"
FROZEN_DIR = "frozen"
STATE_DIR = "state"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What a checkpoint's parameters are (the U-Net architecture and the reward switch), and how they were run.

  `kernels` records the kernel families of the run that wrote the checkpoint (training:
  config.model.attention / conv / norm); it does not change the parameters, and a job that
  loads the checkpoint uses its own config's kernels. Files written before it existed read as "auto".
  """

  unet: models.UNetConfig
  reward: bool = True
  source: str = ""  # where the weights came from, for the record
  kernels: ops.Kernels = ops.Kernels()

  def to_json(self) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "unet": self.unet.to_diffusers(), "reward": self.reward,
            "source": self.source, "kernels": self.kernels.to_json()}

  @classmethod
  def from_json(cls, data: dict[str, Any], where: str = MODEL_FILE) -> "ModelSpec":
    if data.get("format_version") != FORMAT_VERSION:
      raise ValueError(f"{where}: format_version {data.get('format_version')!r}, expected {FORMAT_VERSION}")
    return cls(models.UNetConfig.from_diffusers(data["unet"], where), bool(data["reward"]), data.get("source", ""),
               ops.Kernels.from_json(data.get("kernels"), f"{where}: kernels"))


def is_checkpoint(path: str | os.PathLike) -> bool:
  return (Path(path) / MODEL_FILE).is_file()


def read_spec(path: str | os.PathLike) -> ModelSpec:
  file = Path(path) / MODEL_FILE
  if not file.is_file():
    raise FileNotFoundError(f"{file}: missing; a project checkpoint folder holds {MODEL_FILE}, "
                            f"{FROZEN_DIR}/ and {STATE_DIR}/ (make one with configs/convert.py)")
  return ModelSpec.from_json(json.loads(file.read_text()), str(file))


def write_spec(path: str | os.PathLike, spec: ModelSpec) -> None:
  files.write_json(Path(path) / MODEL_FILE, spec.to_json(), indent=2)


def frozen_dir(path: str | os.PathLike) -> Path:
  return Path(path) / FROZEN_DIR


def make_manager(path: str | os.PathLike, *, max_to_keep: int | None = None,
                 save_interval_steps: int = 1, async_save: bool = False) -> ocp.CheckpointManager:
  """Orbax manager over `<path>/state`; unfinished saves are never listed as steps."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                                         enable_async_checkpointing=async_save, create=True)
  return ocp.CheckpointManager(Path(path).absolute() / STATE_DIR, options=options)


def save_params(manager: ocp.CheckpointManager, step: int, params: Any, ema_params: Any) -> None:
  manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                             ema_params=ocp.args.StandardSave(ema_params)))
  manager.wait_until_finished()


def restore_params(path: str | os.PathLike, *, step: int | None = None, use_ema: bool = True) -> tuple[int, Any]:
  """(step, U-Net params) of a checkpoint: the EMA params unless `use_ema` is False.

  Only that item's folder is read: a composite restore would warn about every item it skips
  (`params` or `ema_params`, `opt_state`, the data iterator).
  """
  item = "ema_params" if use_ema else "params"
  manager = ocp.CheckpointManager(Path(path).absolute() / STATE_DIR)
  try:
    step = manager.latest_step() if step is None or step < 0 else step
    steps = list(manager.all_steps())
  finally:
    manager.close()
  if step is None or step not in steps:
    raise FileNotFoundError(f"{Path(path) / STATE_DIR}: no saved step {'' if step is None else step} "
                            f"(steps: {steps})")
  folder = Path(path).absolute() / STATE_DIR / str(step) / item
  handler = ocp.StandardCheckpointHandler()
  try:
    # A run saved on many devices restores onto this process's first device.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                                    handler.metadata(folder))
    return step, handler.restore(folder, args=ocp.args.StandardRestore(target))
  finally:
    handler.close()


# ----------------------------------------------------------------------------- atomic folders
# (files: mre_jax.io.files.write_atomic)


def staging_dir(final: str | os.PathLike) -> Path:
  """A fresh sibling folder to build `final` in, renamed into place by `publish`."""
  tmp = files.temp_sibling(Path(final).absolute())
  tmp.mkdir(parents=True)
  return tmp


def check_output_dir(final: str | os.PathLike, overwrite: bool, field: str) -> None:
  final = Path(final)
  if final.exists() and (not final.is_dir() or any(final.iterdir())) and not overwrite:
    raise FileExistsError(f"{field}={final}: exists and is not empty (set overwrite=True to replace it)")


def publish(tmp: Path, final: str | os.PathLike) -> None:
  """Moves a finished staging folder to `final`, replacing what was there only at the end."""
  final = Path(final).absolute()
  old = None
  if final.exists():
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    os.replace(final, old)
  os.replace(tmp, final)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
