"""Our VAE (mre_jax/models/vae.py) against diffusers' PyTorch AutoencoderKL: encode and decode."""

import jax.numpy as jnp
import numpy as np
import pytest

from mre_jax import models
from mre_jax.io import pretrained
from mre_jax.models import tiny

torch = pytest.importorskip("torch")
import parity  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402

# SD's VAE widths (128, 256, 512 channels, 32 groups; its 512-wide single-head mid attention),
# one resnet per level and three levels to keep it small.
SD_WIDTH = {**tiny.VAE, "block_out_channels": [128, 256, 512], "down_block_types": ["DownEncoderBlock2D"] * 3,
            "up_block_types": ["UpDecoderBlock2D"] * 3, "layers_per_block": 1, "norm_num_groups": 32}
CONFIGS = {"tiny": tiny.VAE, "128-512ch": SD_WIDTH}


def _pair(config, seed, dtype=jnp.float32):
  """(PyTorch AutoencoderKL with perturbed weights, our VAE, its params converted from PyTorch's)."""
  ref = parity.randomize(AutoencoderKL.from_config(config), seed)
  vae = pretrained.make_vae(config, dtype)
  return ref, vae, pretrained.vae_params(parity.state_dict(ref), vae)


def _inputs(config, seed):
  """Images [2, 32, 24, 3] in [-1, 1] and latents [2, 32/f, 24/f, 4] for the downscale factor f."""
  r = np.random.default_rng(seed)
  f = 2 ** (len(config["block_out_channels"]) - 1)
  return r.uniform(-1, 1, (2, 32, 24, 3)).astype(np.float32), r.standard_normal((2, 32 // f, 24 // f, 4)).astype(np.float32)


def _torch_outputs(ref, images, latents):
  """(posterior mean, logvar, decoded images), NHWC numpy."""
  nhwc = lambda t: t.float().numpy().transpose(0, 2, 3, 1)
  with torch.no_grad():
    dist = ref.encode(torch.tensor(images.transpose(0, 3, 1, 2))).latent_dist
    decoded = ref.decode(torch.tensor(latents.transpose(0, 3, 1, 2))).sample
  return nhwc(dist.mean), nhwc(dist.logvar), nhwc(decoded)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_vae_encode_and_decode_match_torch_in_float32(name):
  ref, vae, params = _pair(CONFIGS[name], seed=1)
  images, latents = _inputs(CONFIGS[name], seed=2)
  mean, logvar, decoded = _torch_outputs(ref, images, latents)
  ours = (*pretrained.vae_encode(vae, params, images), pretrained.vae_decode(vae, params, latents))
  for got, want, what in zip(ours, (mean, logvar, decoded), ("mean", "logvar", "decoded")):
    assert got.shape == want.shape
    assert parity.rel_err(got, want) < 1e-4, what


@pytest.mark.parametrize("name", list(CONFIGS))
def test_vae_in_bfloat16_is_as_close_as_torch_autocast(name):
  ref, vae, params = _pair(CONFIGS[name], seed=3, dtype=jnp.bfloat16)
  images, latents = _inputs(CONFIGS[name], seed=4)
  want = _torch_outputs(ref, images, latents)
  with parity.autocast_bf16():
    torch_bf16 = _torch_outputs(ref, images, latents)
  ours = (*pretrained.vae_encode(vae, params, images), pretrained.vae_decode(vae, params, latents))
  assert ours[0].dtype == jnp.bfloat16
  for got, half, full, what in zip(ours, torch_bf16, want, ("mean", "logvar", "decoded")):
    parity.assert_bf16_close(got, half, full, what)


def test_vae_config_rejects_what_we_do_not_build():
  assert models.VAEConfig.from_diffusers(tiny.VAE).block_out_channels == (8, 8, 16, 16)
  with pytest.raises(ValueError, match="'act_fn' = 'gelu' is not supported"):
    models.VAEConfig.from_diffusers({**tiny.VAE, "act_fn": "gelu"}, "vae/config.json")
  with pytest.raises(ValueError, match="down_block_types.*only 'DownEncoderBlock2D'"):
    models.VAEConfig.from_diffusers({**tiny.VAE, "down_block_types": ["AttnDownEncoderBlock2D"] * 4})
