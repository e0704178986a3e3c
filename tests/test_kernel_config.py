"""Kernels are configuration: `ops.Kernels`, the jobs' config fields, the model spec that records them."""

import json

import pytest

from configs import edit as edit_config
from configs import evaluate as evaluate_config
from configs import train as train_config
from mre_jax import ops
from mre_jax.errors import ConfigError
from mre_jax.io import checkpointing
from mre_jax.models import tiny
from mre_jax.train import setup


def test_kernels_validate_their_names():
  assert ops.Kernels() == ops.Kernels("auto", "auto", "auto")
  with pytest.raises(ValueError, match="attention='flash': expected one of auto, xla, cudnn, splash, cpu"):
    ops.Kernels(attention="flash")
  with pytest.raises(ConfigError, match=r"config.model.norm='fast': expected one of auto, xla, cpu"):
    ops.Kernels.from_config({"norm": "fast"}, "config.model")
  assert ops.Kernels.from_config({"conv": "xla"}) == ops.Kernels(conv="xla")  # absent fields: auto
  assert ops.Kernels.from_json(ops.Kernels(attention="splash").to_json()) == ops.Kernels(attention="splash")


@pytest.mark.parametrize("section", ["train", "edit", "evaluate"])
def test_every_job_config_has_the_kernel_fields(section):
  config = {"train": lambda: train_config.get_config().model, "edit": edit_config.get_config,
            "evaluate": lambda: evaluate_config.get_config().edit}[section]()
  assert {config.attention, config.conv, config.norm} == {"auto"}
  assert ops.Kernels.from_config(config) == ops.Kernels()


def test_training_rejects_a_bad_kernel_name_before_anything_runs():
  config = train_config.get_config()
  config.model.conv = "fft"
  with pytest.raises(ConfigError, match=r"config.model.conv='fft': expected one of auto, xla, winograd"):
    setup.validate(config, 1)


def test_model_spec_records_the_kernels_and_reads_specs_written_before_it_did(tmp_path):
  spec = checkpointing.ModelSpec(tiny.UNET, kernels=ops.Kernels(attention="cudnn", norm="xla"))
  checkpointing.write_spec(tmp_path, spec)
  assert json.loads((tmp_path / checkpointing.MODEL_FILE).read_text())["kernels"] == {
      "attention": "cudnn", "conv": "auto", "norm": "xla"}
  assert checkpointing.read_spec(tmp_path) == spec
  old = {k: v for k, v in spec.to_json().items() if k != "kernels"}  # mre_model.json before kernels
  assert checkpointing.ModelSpec.from_json(old).kernels == ops.Kernels()
  with pytest.raises(ValueError, match=r"mre_model.json: kernels.attention='flash'"):
    checkpointing.ModelSpec.from_json({**old, "kernels": {"attention": "flash"}})
