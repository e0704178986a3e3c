"""The vae job: trains an AutoencoderKL, writes it in diffusers format with its test PSNR."""
import json

import jax
import numpy as np
import pytest

from configs import vae as vae_config
from mre_jax import pretrained, synthetic, tiny, vae_train
from mre_jax.errors import ConfigError


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory, tfds_tiny):
  config = vae_config.get_config("quick")
  config.data.data_dir = tfds_tiny
  workdir = tmp_path_factory.mktemp("vae")
  vae_train.train_vae(config, str(workdir))
  return config, workdir


def test_vae_job_writes_a_loadable_vae_and_its_psnr(vae_run):
  config, workdir = vae_run
  report = json.loads((workdir / "vae_eval.json").read_text())
  assert report["step"] == config.num_steps
  assert set(report["psnr_db"]) == {"original", "truth", "edited", "clean"}
  # The same loading code as SD's VAE reads it, with the architecture asked for.
  vae, params = pretrained.load_vae(workdir)
  cfg = pretrained.read_config(workdir / "vae")
  assert cfg["block_out_channels"] == list(config.vae.block_out_channels)
  assert cfg["latent_channels"] == config.vae.latent_channels
  # scaling_factor = 1 / std of the posterior means of training images (SD's convention).
  from mre_jax import input_pipeline
  builder = input_pipeline.build_dataset("synthetic_edit", config.data.data_dir, config="tiny")
  images = vae_train.load_images(builder, "train")[:3 * 500]
  mean, _ = pretrained.vae_encode(vae, params, images.astype(np.float32) / 127.5 - 1.0)
  assert cfg["scaling_factor"] == pytest.approx(1.0 / float(np.std(np.asarray(mean))), rel=1e-4)
  # The reported PSNR is the decoded posterior mode's, per image kind (here: originals).
  test = vae_train.load_images(builder, "test")
  decoded = pretrained.vae_decode(vae, params, pretrained.vae_encode(vae, params, test / 127.5 - 1.0)[0])
  per_image = vae_train.psnr(test, np.asarray(decoded)).reshape(-1, 3)
  assert report["psnr_db"]["original"] == pytest.approx(per_image[:, 0].mean(), abs=1e-3)


def test_psnr_is_exact_on_known_errors():
  reference = np.full((2, 4, 4, 3), 100, np.uint8)
  decoded = np.full((2, 4, 4, 3), 110 / 127.5 - 1.0)  # off by 10 levels everywhere: MSE 100
  np.testing.assert_allclose(vae_train.psnr(reference, decoded), 10 * np.log10(255 ** 2 / 100), rtol=1e-6)


def test_shipped_vae_loads_and_reconstructs():
  folder = tiny.vae_folder("synthetic_64px")
  report = json.loads((folder / "vae_eval.json").read_text())
  assert report["psnr_db"]["clean"] >= 30.0  # what the shipped weights measured on the test split
  vae, params = pretrained.load_vae(folder)
  assert pretrained.read_config(folder / "vae")["sample_size"] == 64
  # Fresh test-split scenes (never seen in training) come back through the decoder near the reported PSNR.
  rng, scenes = np.random.default_rng(123), []
  while len(scenes) < 16:
    scene = synthetic.sample_scene(rng)
    if synthetic.scene_split(scene) == "test":
      scenes.append(synthetic.to_uint8(synthetic.render_float(scene, 64)))
  images = np.stack(scenes)
  mean, _ = pretrained.vae_encode(vae, params, images / 127.5 - 1.0)
  assert mean.shape == (16, 16, 16, pretrained.read_config(folder / "vae")["latent_channels"])
  decoded = np.asarray(pretrained.vae_decode(vae, params, mean))
  assert vae_train.psnr(images, decoded).mean() >= 28.0


@pytest.mark.parametrize("override,message", [
    ({"vae.norm_num_groups": 3}, "norm_num_groups=3"),
    ({"crop_size": 18}, "crop_size=18"),
])
def test_bad_vae_config_fails_early(override, message, tmp_path):
  config = vae_config.get_config("quick")
  key, value = next(iter(override.items()))
  target = config
  *path, leaf = key.split(".")
  for p in path:
    target = target[p]
  target[leaf] = value
  with pytest.raises(ConfigError, match=message):
    vae_train.train_vae(config, str(tmp_path))
