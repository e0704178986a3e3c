"""Each SD block (mre_jax/models/unet_blocks.py) against its diffusers PyTorch module, one at a time.

Inputs come at two scales: unit variance, and 1e-2 (variance 1e-4), where a GroupNorm's epsilon
(1e-5 in resnets, 1e-6 in transformers) changes the output by percents, not parts per million.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mre_jax import ops
from mre_jax.io import weights
from mre_jax.models import tiny, unet_blocks

torch = pytest.importorskip("torch")
import parity  # noqa: E402
from diffusers import Transformer2DModel, UNet2DConditionModel  # noqa: E402
from diffusers.models.downsampling import Downsample2D  # noqa: E402
from diffusers.models.resnet import ResnetBlock2D  # noqa: E402
from diffusers.models.upsampling import Upsample2D  # noqa: E402

SCALES = (1.0, 1e-2)
XLA = ops.Kernels(attention="xla", conv="xla", norm="xla")  # and the defaults ("auto": the CPU kernels)


def _params(ref, block, *args):
  """Our block's params converted from the PyTorch module's (perturbed) weights."""
  shapes = jax.eval_shape(lambda: block.init(jax.random.key(0), *args))["params"]
  # Downsample2D registers its convolution twice, also as the legacy `Conv2d_0`
  return weights.torch_to_flax(parity.state_dict(ref), shapes, ignore_prefixes=("Conv2d_0.",))


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("kernels", [ops.Kernels(), XLA], ids=["auto", "xla"])
@pytest.mark.parametrize("cin, cout, temb, eps", [(64, 64, 128, 1e-5), (32, 64, 128, 1e-5), (64, 32, None, 1e-6)],
                         ids=["unet", "unet-shortcut", "vae-shortcut"])
def test_resnet_block_matches_diffusers(rng, kernels, cin, cout, temb, eps):
  ref = parity.randomize(ResnetBlock2D(in_channels=cin, out_channels=cout, temb_channels=temb, groups=32, eps=eps), 1)
  block = unet_blocks.ResnetBlock(cout, 32, eps, kernels=kernels)
  emb = rng.standard_normal((2, temb)).astype(np.float32) if temb else None
  params = _params(ref, block, jnp.zeros((2, 8, 8, cin)), emb)
  for scale in SCALES:
    x = (rng.standard_normal((2, 8, 8, cin)) * scale).astype(np.float32)
    with torch.no_grad():
      want = _nhwc(ref(_nchw(x), None if emb is None else torch.from_numpy(emb)))
    got = block.apply({"params": params}, x, emb)
    assert parity.rel_err(got, want) < 1e-4, scale


@pytest.mark.parametrize("kernels", [ops.Kernels(), XLA], ids=["auto", "xla"])
@pytest.mark.parametrize("linear, only_cross, depth", [(False, False, 1), (True, True, 2)],
                         ids=["conv-projections", "linear-projections-cross-only-depth-2"])
def test_spatial_transformer_matches_diffusers(rng, kernels, linear, only_cross, depth):
  c, heads, d = 64, 4, 24
  ref = parity.randomize(Transformer2DModel(
      num_attention_heads=heads, attention_head_dim=c // heads, in_channels=c, num_layers=depth, cross_attention_dim=d,
      norm_num_groups=32, use_linear_projection=linear, only_cross_attention=only_cross), 2)
  block = unet_blocks.SpatialTransformer(heads, depth, linear, only_cross, kernels=kernels)
  context = rng.standard_normal((2, 7, d)).astype(np.float32)
  params = _params(ref, block, jnp.zeros((2, 8, 8, c)), context)
  for scale in SCALES:
    x = (rng.standard_normal((2, 8, 8, c)) * scale).astype(np.float32)
    with torch.no_grad():
      want = _nhwc(ref(_nchw(x), encoder_hidden_states=torch.from_numpy(context)).sample)
    got = block.apply({"params": params}, x, context)
    # the residual is x itself: compare what the block adds
    assert parity.rel_err(got - x, want - x) < 1e-4, scale


@pytest.mark.parametrize("padding, ref_padding", [(((1, 1), (1, 1)), 1), (((0, 1), (0, 1)), 0)], ids=["unet", "vae"])
def test_downsample_matches_diffusers(rng, padding, ref_padding):
  ref = parity.randomize(Downsample2D(32, use_conv=True, padding=ref_padding), 3)
  block = unet_blocks.Downsample(32, padding)
  x = rng.standard_normal((2, 8, 6, 32)).astype(np.float32)
  with torch.no_grad():
    want = _nhwc(ref(_nchw(x)))
  got = block.apply({"params": _params(ref, block, x)}, x)
  assert got.shape == want.shape == (2, 4, 3, 32)
  assert parity.rel_err(got, want) < 1e-5


def test_upsample_matches_diffusers(rng):
  ref = parity.randomize(Upsample2D(32, use_conv=True), 4)
  block = unet_blocks.Upsample(32)
  x = rng.standard_normal((2, 4, 3, 32)).astype(np.float32)
  with torch.no_grad():
    want = _nhwc(ref(_nchw(x)))
  got = block.apply({"params": _params(ref, block, x)}, x)
  assert got.shape == want.shape == (2, 8, 6, 32)
  assert parity.rel_err(got, want) < 1e-5


def test_levels_built_for_the_unet_match_those_of_diffusers_unet(rng):
  """`make_unet_blocks` of tiny.UNET (every default as the U-Net uses it) against the blocks of
  diffusers' UNet2DConditionModel of the same config: a cross-attention level down, the mid
  block, a cross-attention level up (taking skips)."""
  cfg = tiny.UNET  # 32 and 64 channels, 8 heads, 32-d context
  ref = parity.randomize(UNet2DConditionModel.from_config(cfg.to_diffusers()), 5)
  down, mid, up = unet_blocks.make_unet_blocks(cfg, dtype=jnp.float32, remat=False, kernels=ops.Kernels())
  temb = rng.standard_normal((2, cfg.time_embed_dim)).astype(np.float32)
  context = rng.standard_normal((2, 7, cfg.cross_attention_dim)).astype(np.float32)
  t = lambda a: torch.from_numpy(a)
  for scale in SCALES:
    x8, x4 = ((rng.standard_normal((2, n, n, c)) * scale).astype(np.float32) for n, c in ((8, 32), (4, 64)))
    h8 = (rng.standard_normal((2, 8, 8, 64)) * scale).astype(np.float32)
    skips = tuple((rng.standard_normal((2, 8, 8, 32)) * scale).astype(np.float32) for _ in range(2))
    with torch.no_grad():
      want_down, want_skips = ref.down_blocks[0](_nchw(x8), t(temb), encoder_hidden_states=t(context))
      want_mid = ref.mid_block(_nchw(x4), t(temb), encoder_hidden_states=t(context))
      want_up = ref.up_blocks[-1](_nchw(h8), tuple(map(_nchw, skips)), t(temb), encoder_hidden_states=t(context))
    got_down, got_skips = down[0].apply({"params": _params(ref.down_blocks[0], down[0], x8, temb, context)},
                                        x8, temb, context)
    got_mid = mid.apply({"params": _params(ref.mid_block, mid, x4, temb, context)}, x4, temb, context)
    got_up = up[-1].apply({"params": _params(ref.up_blocks[-1], up[-1], h8, skips, temb, context)},
                          h8, skips, temb, context)
    for got, want in zip((got_down, *got_skips, got_mid, got_up), (want_down, *want_skips, want_mid, want_up)):
      assert parity.rel_err(got, _nhwc(want)) < 1e-4, scale
