"""Convolution kernels (mre_jax/ops/conv.py) against PyTorch's conv2d, and their routing."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mre_jax import models, ops
from mre_jax.io import pretrained
from mre_jax.models import layers, tiny
from mre_jax.ops import conv

torch = pytest.importorskip("torch")


def _torch_conv(x, kernel, d_out):
  """PyTorch conv2d (padding 1) of NHWC x and HWIO kernel; output and gradients wrt x and kernel."""
  tx = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()
  tk = torch.from_numpy(kernel).permute(3, 2, 0, 1).requires_grad_()
  out = torch.nn.functional.conv2d(tx, tk, padding=1)
  out.backward(torch.from_numpy(d_out).permute(0, 3, 1, 2))
  return (out.detach().permute(0, 2, 3, 1).numpy(), tx.grad.permute(0, 2, 3, 1).numpy(),
          tk.grad.permute(2, 3, 1, 0).numpy())


@pytest.mark.parametrize("shape", [(2, 16, 16, 8, 12), (1, 13, 22, 5, 7), (3, 4, 6, 3, 2)])
def test_winograd_conv_and_its_gradients_match_torch_conv2d(rng, shape):
  n, h, w, c, o = shape  # sides that are not multiples of the 4x4 output tile included
  x = rng.standard_normal((n, h, w, c)).astype(np.float32)
  kernel = (rng.standard_normal((3, 3, c, o)) / np.sqrt(9 * c)).astype(np.float32)
  d_out = rng.standard_normal((n, h, w, o)).astype(np.float32)
  out, vjp = jax.vjp(conv.winograd_conv3x3, x, kernel)
  dx, dk = jax.jit(vjp)(jnp.asarray(d_out))
  for got, want in zip((out, dx, dk), _torch_conv(x, kernel, d_out)):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())


def _conv_ops(fn, *args):
  return str(jax.make_jaxpr(fn)(*args)).count("conv_general_dilated")


@pytest.mark.parametrize("kernel_size, padding, strides, rewritten", [
    ((3, 3), "SAME", 1, True), ((3, 3), ((1, 1), (1, 1)), 1, True), ((1, 1), "VALID", 1, True),
    ((3, 3), ((1, 1), (1, 1)), 2, False), ((3, 3), "VALID", 1, False)])
def test_conv_layer_has_linen_parameters_and_results_and_rewrites_what_it_should(
    rng, kernel_size, padding, strides, rewritten):
  x = jnp.asarray(rng.standard_normal((2, 12, 9, 6)), jnp.float32)
  ours = layers.Conv(5, kernel_size, strides=(strides, strides), padding=padding, implementation="winograd")
  params = ours.init(jax.random.key(0), x)
  ref = nn.Conv(5, kernel_size, strides=strides, padding=padding)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, ref.init(jax.random.key(0), x))
  params = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
  np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), atol=1e-4)
  assert _conv_ops(ours.apply, params, x) == (0 if rewritten else 1)
  assert _conv_ops(ours.clone(implementation="xla").apply, params, x) == 1


def test_auto_rewrites_only_wide_float32_convolutions_on_cpu():
  assert jax.default_backend() == "cpu"
  side, wide = conv.WINOGRAD_MIN_SIDE, conv.WINOGRAD_MIN_CHANNELS

  def count(channels, size, dtype=jnp.float32, kernel_size=(3, 3), implementation="auto"):
    x = jax.ShapeDtypeStruct((1, size, size, channels), dtype)
    module = layers.Conv(channels, kernel_size, padding="SAME", dtype=dtype, implementation=implementation)
    params = jax.eval_shape(module.init, jax.random.key(0), x)
    return _conv_ops(module.apply, params, x)

  assert count(wide, side) == 0
  assert count(wide // 2, side) == 1  # too few channels
  assert count(wide, side // 2) == 1  # too small
  assert count(wide, side, jnp.bfloat16) == 1  # Winograd's error would grow in half precision
  assert count(8, 4, kernel_size=(1, 1)) == 0  # 1x1: a matmul at any size
  with pytest.raises(ValueError, match="expected one of"):
    count(8, 4, implementation="fft")


def test_the_conv_field_reaches_every_unet_and_vae_convolution():
  unet = lambda conv: models.RewardUNet(tiny.UNET, kernels=ops.Kernels(conv=conv))
  params = models.unet_param_shapes(unet("auto"))
  args = (jnp.zeros((1, 8, 8, 8)), jnp.zeros((1,)), jnp.zeros((1, 77, 32)), jnp.zeros((1, 3)), jnp.zeros((1, 32)))
  count = lambda model: _conv_ops(lambda p: model.apply({"params": p}, *args), params)
  # tiny.UNET has one stride-2 downsampling convolution; every other one is rewritten
  assert count(unet("xla")) > 10 and count(unet("winograd")) == 1
  vae = lambda conv: pretrained.make_vae(tiny.VAE, kernels=ops.Kernels(conv=conv))
  image = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
  vae_params = pretrained.vae_param_shapes(vae("auto"))
  vae_count = lambda model: _conv_ops(lambda p, x: model.apply({"params": p}, x), vae_params, image)
  downsamplers = len(tiny.VAE["block_out_channels"]) - 1
  assert vae_count(vae("xla")) > 10 and vae_count(vae("winograd")) == downsamplers


def test_winograd_conv_under_data_and_fsdp_sharding_matches_one_device(run_on_8_devices):
  # 8 simulated devices need a fresh process (XLA reads its flags once)
  code = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from mre_jax.ops import conv
r = np.random.default_rng(0)
x = r.standard_normal((8, 12, 12, 16)).astype(np.float32)
k = r.standard_normal((3, 3, 16, 8)).astype(np.float32)
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
ks = jax.device_put(k, NamedSharding(mesh, P(None, None, None, "fsdp")))
loss = lambda x, k: jnp.sum(jnp.sin(conv.winograd_conv3x3(x, k)))
got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(xs, ks)
one = jax.devices()[0]
want = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(jax.device_put(x, one), jax.device_put(k, one))
assert all(len(a.sharding.device_set) == 8 for a in jax.tree.leaves(got))
for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4 * np.abs(b).max())
print("devices", jax.device_count(), "ok")
"""
  run_on_8_devices(code)
