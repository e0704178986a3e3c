"""Convolution kernels (mre_jax/conv.py) against PyTorch's conv2d, and their routing."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mre_jax import conv, models, pretrained, tiny

torch = pytest.importorskip("torch")


@pytest.fixture
def setting():
  """Restores the convolution setting after a test that changes it."""
  previous = conv.set_conv("auto")
  yield conv.set_conv
  conv.set_conv(previous)


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
  # a fresh function each time: make_jaxpr caches traces by function, not by the conv setting
  return str(jax.make_jaxpr(lambda *a: fn(*a))(*args)).count("conv_general_dilated")


@pytest.mark.parametrize("kernel_size, padding, strides, rewritten", [
    ((3, 3), "SAME", 1, True), ((3, 3), ((1, 1), (1, 1)), 1, True), ((1, 1), "VALID", 1, True),
    ((3, 3), ((1, 1), (1, 1)), 2, False), ((3, 3), "VALID", 1, False)])
def test_conv_module_has_linen_parameters_and_results_and_rewrites_what_it_should(
    rng, setting, kernel_size, padding, strides, rewritten):
  setting("winograd")
  x = jnp.asarray(rng.standard_normal((2, 12, 9, 6)), jnp.float32)
  ours = conv.Conv(5, kernel_size, strides=strides, padding=padding)
  params = ours.init(jax.random.key(0), x)
  ref = nn.Conv(5, kernel_size, strides=strides, padding=padding)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, ref.init(jax.random.key(0), x))
  np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), atol=1e-5)
  assert _conv_ops(ours.apply, params, x) == (0 if rewritten else 1)
  setting("xla")
  assert _conv_ops(ours.apply, params, x) == 1


def test_auto_rewrites_only_wide_float32_convolutions_on_cpu(setting):
  assert jax.default_backend() == "cpu"
  side, wide = conv.WINOGRAD_MIN_SIDE, conv.WINOGRAD_MIN_CHANNELS

  def ops(channels, size, dtype=jnp.float32, kernel_size=(3, 3)):
    x = jax.ShapeDtypeStruct((1, size, size, channels), dtype)
    module = conv.Conv(channels, kernel_size, padding="SAME", dtype=dtype, param_dtype=dtype)
    params = jax.eval_shape(module.init, jax.random.key(0), x)
    return _conv_ops(module.apply, params, x)

  assert ops(wide, side) == 0
  assert ops(wide // 2, side) == 1  # too few channels
  assert ops(wide, side // 2) == 1  # too small
  assert ops(wide, side, jnp.bfloat16) == 1  # Winograd's error would grow in half precision
  assert ops(8, 4, kernel_size=(1, 1)) == 0  # 1x1: a matmul at any size
  with pytest.raises(ValueError, match="expected one of"):
    setting("fft")


def test_unet_and_vae_blocks_build_their_convolutions_from_conv_module(setting):
  model = models.RewardUNet(tiny.UNET)
  params = models.unet_param_shapes(model)
  args = (jnp.zeros((1, 8, 8, 8)), jnp.zeros((1,)), jnp.zeros((1, 77, 32)), jnp.zeros((1, 3)), jnp.zeros((1, 32)))
  apply = lambda p: model.apply({"params": p}, *args)
  setting("xla")
  total = _conv_ops(apply, params)
  setting("winograd")
  # tiny.UNET has one stride-2 downsampling convolution; every other one is rewritten
  assert total > 10 and _conv_ops(apply, params) == 1
  vae = pretrained.make_vae(tiny.VAE)
  image = jax.ShapeDtypeStruct((1, 3, 16, 16), jnp.float32)  # diffusers' Flax VAE takes NCHW
  downsamplers = len(tiny.VAE["block_out_channels"]) - 1
  assert _conv_ops(lambda p, x: vae.apply({"params": p}, x), pretrained.vae_param_shapes(vae), image) == downsamplers


def test_winograd_conv_under_data_and_fsdp_sharding_matches_one_device(run_on_8_devices):
  # 8 simulated devices need a fresh process (XLA reads its flags once)
  code = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from mre_jax import conv
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
