"""Our reward U-Net (mre_jax/models/unet.py, unet_blocks.py) against the PyTorch twin and diffusers' UNet2DConditionModel."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mre_jax import models
from mre_jax.io import pretrained, weights
from mre_jax.models import tiny

torch = pytest.importorskip("torch")
import parity  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402

from mre_jax.io import torch_twin  # noqa: E402

SD_WIDTH = models.UNetConfig(
    block_out_channels=(320, 640), layers_per_block=1, attention_head_dim=8, cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
# The embedded demo's GroupNorm setting: 8 groups, so 4 channels per group at 32 channels, not 1.
TINY_8_GROUPS = dataclasses.replace(tiny.UNET, norm_num_groups=8)


def _inputs(cfg, batch, size, seed):
  r = np.random.default_rng(seed)
  return dict(
      sample=r.standard_normal((batch, size, size, cfg.in_channels)).astype(np.float32),
      timesteps=r.integers(0, 1000, batch),
      context=r.standard_normal((batch, 77, cfg.cross_attention_dim)).astype(np.float32),
      scores=r.uniform(0, 5, (batch, 3)).astype(np.float32),
      reward_embeds=r.standard_normal((batch, cfg.cross_attention_dim)).astype(np.float32))


def _torch_out(module, x, reward=True):
  args = [torch.tensor(x["sample"].transpose(0, 3, 1, 2)), torch.tensor(x["timesteps"]), torch.tensor(x["context"])]
  with torch.no_grad():
    if reward:
      out = module(*args, torch.tensor(x["scores"]), torch.tensor(x["reward_embeds"])).sample
    else:
      out = module(*args).sample
  return out.float().numpy().transpose(0, 2, 3, 1)


def _apply(model, params, **inputs):
  train = inputs.pop("train", False)
  rngs = inputs.pop("rngs", None)
  fn = jax.jit(lambda p, x, r: model.apply({"params": p}, **x, train=train, rngs=r))
  return fn(params, inputs, rngs)


_rel_err = parity.rel_err
_randomize = parity.randomize
_state_dict = parity.state_dict


@pytest.mark.parametrize("cfg,size", [(tiny.UNET, 16), (TINY_8_GROUPS, 16), (SD_WIDTH, 16)],
                         ids=["tiny", "tiny-8-groups", "320ch-768ctx"])
def test_reward_unet_matches_torch_twin(cfg, size):
  twin = _randomize(torch_twin.MRERewardUNet.from_config(cfg.to_diffusers()), seed=1)
  model = models.RewardUNet(cfg)
  params = weights.torch_to_flax(_state_dict(twin), models.unet_param_shapes(model))
  x = _inputs(cfg, 3, size, seed=2)
  x["scores"][0] = [5, 5, 5]
  x["scores"][1] = [0, 2.5, 4]
  for reward_embeds in (x["reward_embeds"], -x["reward_embeds"]):
    x["reward_embeds"] = reward_embeds
    ref = _torch_out(twin, x)
    assert _rel_err(_apply(model, params, **x), ref) < 1e-4


@pytest.mark.parametrize("cfg", [tiny.UNET, TINY_8_GROUPS], ids=["tiny", "tiny-8-groups"])
def test_reward_off_is_the_plain_instructpix2pix_unet(cfg):
  plain = _randomize(UNet2DConditionModel.from_config(cfg.to_diffusers()), seed=3)
  model = models.RewardUNet(cfg, reward=False)
  params = weights.torch_to_flax(_state_dict(plain), models.unet_param_shapes(model))
  x = _inputs(cfg, 2, 16, seed=4)
  out = _apply(model, params, sample=x["sample"], timesteps=x["timesteps"], context=x["context"])
  assert _rel_err(out, _torch_out(plain, x, reward=False)) < 1e-4
  assert not set(params) & set(models.REWARD_MODULES)


def test_scores_and_reward_text_change_the_output():
  model = models.RewardUNet(tiny.UNET)
  params = models.init_unet_params(models.RewardUNet(tiny.UNET), 5)
  x = _inputs(tiny.UNET, 1, 8, seed=6)
  base = _apply(model, params, **x)
  low_scores = _apply(model, params, **{**x, "scores": x["scores"] * 0.2})
  other_text = _apply(model, params, **{**x, "reward_embeds": x["reward_embeds"] + 1.0})
  for changed in (low_scores, other_text):
    assert float(jnp.abs(changed - base).max()) > 1e-3 * float(jnp.abs(base).max())


def test_widened_conv_in_with_zero_channels_gives_the_4_channel_output():
  cfg4 = dataclasses.replace(tiny.UNET, in_channels=4)
  params4 = models.init_unet_params(models.RewardUNet(cfg4), 7)
  params8 = pretrained.widen_conv_in(jax.device_get(params4), 8)
  x = _inputs(cfg4, 2, 8, seed=8)
  image_latents = np.random.default_rng(9).standard_normal(x["sample"].shape).astype(np.float32)
  out4 = _apply(models.RewardUNet(cfg4), params4, **x)
  out8 = _apply(models.RewardUNet(tiny.UNET), params8,
                **{**x, "sample": np.concatenate([x["sample"], image_latents], -1)})
  np.testing.assert_allclose(out8, out4, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(params8["conv_in"]["kernel"][:, :, 4:], 0)
  np.testing.assert_array_equal(params8["conv_in"]["kernel"][:, :, :4], params4["conv_in"]["kernel"])


def test_dropout_only_in_training_and_remat_keeps_values_and_gradients():
  params = models.init_unet_params(models.RewardUNet(tiny.UNET), 10)
  x = _inputs(tiny.UNET, 2, 8, seed=11)
  model, remat = models.RewardUNet(tiny.UNET), models.RewardUNet(tiny.UNET, remat=True)
  eval_a = _apply(model, params, **x)
  eval_b = _apply(model, params, **x)
  np.testing.assert_array_equal(eval_a, eval_b)
  train = lambda m, p, key: _apply(m, p, **x, train=True, rngs={"dropout": key})
  t1, t2 = train(model, params, jax.random.PRNGKey(1)), train(model, params, jax.random.PRNGKey(2))
  assert float(jnp.abs(t1 - t2).max()) > 0
  loss = lambda m: lambda p: jnp.mean(train(m, p, jax.random.PRNGKey(1)) ** 2)
  g_plain = jax.grad(loss(model))(params)
  g_remat = jax.grad(loss(remat))(params)
  for a, b in zip(jax.tree_util.tree_leaves(g_plain), jax.tree_util.tree_leaves(g_remat)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("cfg,size", [(tiny.UNET, 16), (SD_WIDTH, 16)], ids=["tiny", "320ch-768ctx"])
def test_bfloat16_compute_is_as_close_as_torch_autocast(cfg, size):
  """bfloat16 compute, float32 params: as close to the float32 twin as the twin under autocast."""
  twin = _randomize(torch_twin.MRERewardUNet.from_config(cfg.to_diffusers()), seed=12)
  model = models.RewardUNet(cfg, dtype=jnp.bfloat16)
  params = weights.torch_to_flax(_state_dict(twin), models.unet_param_shapes(model))
  x = _inputs(cfg, 2, size, seed=13)
  want = _torch_out(twin, x)
  with parity.autocast_bf16():
    torch_bf16 = _torch_out(twin, x)
  out16 = _apply(model, params, **x)
  assert out16.dtype == jnp.bfloat16
  assert all(p.dtype == np.float32 for p in jax.tree_util.tree_leaves(params))
  parity.assert_bf16_close(out16, torch_bf16, want, cfg.block_out_channels)
