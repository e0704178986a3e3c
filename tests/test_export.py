"""convert / export round trips, the exported folder in PyTorch, and the jobs' errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from configs import convert as convert_config
from configs import export as export_config
from mre_jax import models, testing
from mre_jax.data import tokens
from mre_jax.errors import ConfigError
from mre_jax.io import checkpointing, export, pretrained
from mre_jax.jobs import convert as convert_job
from mre_jax.jobs import export as export_job
from mre_jax.models import tiny

torch = pytest.importorskip("torch")
from diffusers import StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel  # noqa: E402

from mre_jax.io import torch_twin  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WEIGHT_FILES = ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/model.safetensors")


def _convert(source, workdir, **overrides):
  config = convert_config.get_config()
  config.update(dict(source=str(source), **overrides))
  return convert_job.convert(config, str(workdir))


def _export(checkpoint, output_dir, **overrides):
  config = export_config.get_config()
  config.update(dict(checkpoint=str(checkpoint), output_dir=str(output_dir), **overrides))
  return export_job.export(config)


@pytest.fixture(scope="module")
def exported(tiny_folder, tmp_path_factory):
  root = tmp_path_factory.mktemp("roundtrip")
  _convert(tiny_folder, root / "ckpt")
  return _export(root / "ckpt", root / "out")


def test_convert_then_export_reproduces_every_tensor_bit_for_bit(tiny_folder, exported):
  for name in WEIGHT_FILES:
    source, result = load_file(str(tiny_folder / name)), load_file(str(exported / name))
    assert source.keys() == result.keys(), name
    for key in source:
      assert source[key].dtype == result[key].dtype and source[key].tobytes() == result[key].tobytes(), key
  assert json.loads((exported / "unet/config.json").read_text())["in_channels"] == 8
  assert sorted(p.name for p in exported.iterdir()) == [
      "model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
  assert not list(exported.rglob("*.bin"))


def test_export_loads_in_diffusers_pipeline_and_twin_without_key_mismatch(exported, tiny_folder):
  twin, info = torch_twin.MRERewardUNet.from_pretrained(exported / "unet", output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(exported, unet=twin, safety_checker=None)
  text_encoder, text_params = pretrained.load_text_encoder(exported)
  ids = tokens.tokenize(pretrained.load_tokenizer(exported), ["None; None; None"])
  pooled = np.asarray(pretrained.encode_text(text_encoder, text_params, ids)[1])
  twin.set_default_rewards(torch.tensor([5.0, 5.0, 5.0]), torch.tensor(pooled))
  image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
  from PIL import Image
  out = pipe("make it blue", image=Image.fromarray(image), num_inference_steps=2, output_type="np",
             generator=torch.Generator().manual_seed(0)).images
  assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()
  # the same unet/ also loads into diffusers' plain class (reward weights are then unused)
  plain = UNet2DConditionModel.from_pretrained(exported / "unet")
  assert plain.config.in_channels == 8


def test_exported_twin_matches_the_checkpoint_in_jax(exported):
  ckpt = exported.parent / "ckpt"
  spec = checkpointing.read_spec(ckpt)
  _, params = checkpointing.restore_params(ckpt)
  twin = torch_twin.MRERewardUNet.from_pretrained(exported / "unet").eval()
  r = np.random.default_rng(1)
  x = r.standard_normal((2, 8, 8, 8)).astype(np.float32)
  ctx = r.standard_normal((2, 77, 32)).astype(np.float32)
  scores = np.array([[5, 5, 5], [1, 3, 2]], np.float32)
  reward = r.standard_normal((2, 32)).astype(np.float32)
  out = models.RewardUNet(spec.unet, reward=spec.reward).apply({"params": params}, x, np.array([3, 900]), ctx,
                                                                scores, reward)
  with torch.no_grad():
    ref = twin(torch.tensor(x.transpose(0, 3, 1, 2)), torch.tensor([3, 900]), torch.tensor(ctx),
               torch.tensor(scores), torch.tensor(reward)).sample.numpy().transpose(0, 2, 3, 1)
  assert np.abs(np.asarray(out) - ref).max() / np.abs(ref).max() < 1e-4


def test_convert_sd15_style_source_widens_conv_in_and_adds_reward_modules(tmp_path):
  sd = testing.write_tiny_model_folder(tmp_path / "sd", seed=3, unet=tiny.UNET.__class__(
      **{**tiny.UNET.__dict__, "in_channels": 4}), reward=False)
  _convert(sd, tmp_path / "stage1", reward="off")
  _convert(sd, tmp_path / "stage2", reward="on", seed=1)
  source = pretrained.read_state_dict(sd / "unet")
  for name, reward in (("stage1", False), ("stage2", True)):
    spec = checkpointing.read_spec(tmp_path / name)
    _, params = checkpointing.restore_params(tmp_path / name, use_ema=False)
    assert spec.unet.in_channels == 8 and spec.reward == reward
    assert bool(set(params) & set(models.REWARD_MODULES)) == reward
    kernel = params["conv_in"]["kernel"]
    np.testing.assert_array_equal(kernel[:, :, 4:], 0)
    np.testing.assert_array_equal(kernel[:, :, :4], source["conv_in.weight"].transpose(2, 3, 1, 0))


@pytest.mark.parametrize("form", ["safetensors", "bin"])
def test_float16_sources_load_as_float32_and_bin_sources_export_as_safetensors(form, tiny_folder, tmp_path):
  """SD 1.5 checkpoints are often float16, older ones in .bin files: the U-Net (through convert), VAE
  and text encoder load as float32 params holding the float16 values, and export writes safetensors."""
  source = shutil.copytree(tiny_folder, tmp_path / "source")
  for name in WEIGHT_FILES:
    half = {k: v.astype(np.float16) for k, v in load_file(str(source / name)).items()}
    if form == "bin":
      (source / name).unlink()
      bin_name = "pytorch_model.bin" if name.endswith("/model.safetensors") else "diffusion_pytorch_model.bin"
      torch.save({k: torch.from_numpy(v) for k, v in half.items()}, (source / name).with_name(bin_name))
    else:
      save_file(half, str(source / name))
  as_half = lambda tree: jax.tree_util.tree_map(lambda x: np.asarray(x).astype(np.float16).astype(np.float32), tree)
  _convert(source, tmp_path / "ckpt")
  loaded = {"unet": checkpointing.restore_params(tmp_path / "ckpt", use_ema=False)[1],
            "vae": pretrained.load_vae(source)[1], "text": pretrained.load_text_encoder(source)[1]}
  expected = {"unet": as_half(export.unet_from_diffusers(tiny_folder)[1]),
              "vae": as_half(pretrained.load_vae(tiny_folder)[1]),
              "text": as_half(pretrained.load_text_encoder(tiny_folder)[1])}
  for part in loaded:
    assert {np.asarray(x).dtype for x in jax.tree_util.tree_leaves(loaded[part])} == {np.dtype(np.float32)}, part
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded[part], expected[part])
  out = _export(tmp_path / "ckpt", tmp_path / "out")
  assert not list(out.rglob("*.bin")) and all((out / name).is_file() for name in WEIGHT_FILES)
  vae = "vae/diffusion_pytorch_model.safetensors"
  np.testing.assert_array_equal(load_file(str(out / vae))["decoder.conv_out.weight"],
                                load_file(str(tiny_folder / vae))["decoder.conv_out.weight"].astype(np.float16))


def test_convert_errors_leave_no_output(tiny_folder, tmp_path):
  bad = tmp_path / "bad"
  shutil.copytree(tiny_folder, bad)
  file = bad / "unet" / "diffusion_pytorch_model.safetensors"
  state = load_file(str(file))
  state["conv_out.bias"] = np.zeros(7, np.float32)
  save_file(state, str(file))
  with pytest.raises(ValueError, match=r"conv_out.bias: \(7,\) does not fit"):
    _convert(bad, tmp_path / "out")
  assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "keep.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="workdir=.*full: exists and is not empty"):
    _convert(tiny_folder, tmp_path / "full")
  assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
  with pytest.raises(ConfigError, match="config.reward='maybe'"):
    _convert(tiny_folder, tmp_path / "x", reward="maybe")
  _convert(tiny_folder, tmp_path / "ok")
  with pytest.raises(FileNotFoundError, match="no saved step 5"):
    _export(tmp_path / "ok", tmp_path / "e", step=5)
  assert not (tmp_path / "e").exists()


def _main(*args):
  return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_cli_exit_codes_and_one_line_errors(tmp_path):
  result = _main("--config=configs/convert.py", "--config.job=dance")
  assert result.returncode == 2 and "config.job='dance' is not a job" in result.stderr.strip().splitlines()[-1]
  result = _main("--config=configs/export.py", "--config.output_dir=" + str(tmp_path / "o"))
  assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == \
      "error: config.checkpoint is required (job 'export')"
  result = _main("--config=configs/convert.py", f"--config.source={tmp_path / 'nowhere'}", f"--workdir={tmp_path / 'w'}")
  assert result.returncode == 1 and "nowhere: not a folder" in result.stderr
  assert not (tmp_path / "w").exists()


def test_export_refuses_an_image_conditioned_vae_and_writes_nothing(tiny_folder, tmp_path):
  """diffusers' AutoencoderKL has no image-conditioned decoder (models/vae.py): exporting one is an
  error naming the file and field, before anything is written."""
  ckpt = _convert(tiny_folder, tmp_path / "ckpt")
  config_file = checkpointing.frozen_dir(ckpt) / "vae" / "config.json"
  config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "image_condition_width": 8}))
  with pytest.raises(ValueError, match=r"vae/config.json: image_condition_width=8"):
    _export(ckpt, tmp_path / "out")
  assert not (tmp_path / "out").exists()
