"""The CPU kernels (mre_jax/ops/cpu_kernels.py) against PyTorch: attention (SDPA), GroupNorm; their build."""

import os
import shutil
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mre_jax import models, ops
from mre_jax.models import layers, tiny
from mre_jax.ops import attention, cpu_kernels, norm

torch = pytest.importorskip("torch")

needs_kernel = pytest.mark.skipif(shutil.which(os.environ.get("CXX") or "g++") is None,
                                  reason="no C++ compiler to build the kernel")


def _sdpa(q, k, v, d_out, heads):
  """PyTorch's output and gradients for [B, T, heads*d] operands."""
  b, t, width = q.shape
  split = lambda x: torch.from_numpy(x).reshape(b, -1, heads, width // heads).transpose(1, 2).requires_grad_()
  tq, tk, tv = split(q), split(k), split(v)
  out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv).transpose(1, 2).reshape(b, t, width)
  out.backward(torch.from_numpy(d_out))
  merge = lambda x: x.grad.transpose(1, 2).reshape(b, -1, width).numpy()
  return out.detach().numpy(), merge(tq), merge(tk), merge(tv)


@needs_kernel
@pytest.mark.parametrize("b, t, s, heads, d", [
    (2, 200, 200, 3, 40),  # several query blocks, tokens not a multiple of 16
    (3, 130, 77, 2, 4),  # cross-attention over 77 context tokens, 4-wide heads
    (1, 33, 50, 2, 80),
    (2, 17, 9, 1, 160),  # the widest head the kernel takes
])
def test_fused_attention_and_its_gradients_match_torch_sdpa(rng, b, t, s, heads, d):
  assert cpu_kernels.available()
  q, k, v = (rng.standard_normal((b, n, heads * d)).astype(np.float32) for n in (t, s, s))
  q *= 3  # peaked rows: the softmax's max subtraction matters
  d_out = rng.standard_normal((b, t, heads * d)).astype(np.float32)
  out, vjp = jax.vjp(lambda *a: cpu_kernels.attention(*a, heads), q, k, v)
  grads = jax.jit(vjp)(jnp.asarray(d_out))
  want = _sdpa(q, k, v, d_out, heads)
  for got, ref in zip((out, *grads), want):
    np.testing.assert_allclose(np.asarray(got), ref, atol=2e-5 * max(1, np.abs(ref).max()))


@needs_kernel
def test_auto_routes_every_unet_attention_and_group_norm_through_the_kernels_on_cpu():
  for dtype in (jnp.float32, jnp.bfloat16):
    assert attention.resolve("auto", dtype, t=64, s=77, head_dim=4) == "cpu"
  model = models.RewardUNet(tiny.UNET)
  params = models.unet_param_shapes(model)
  args = (jnp.zeros((1, 8, 8, 8)), jnp.zeros((1,)), jnp.zeros((1, 77, 32)), jnp.zeros((1, 3)), jnp.zeros((1, 32)))
  loss = lambda p: jnp.sum(model.apply({"params": p}, *args))
  text = jax.jit(jax.grad(loss)).lower(params).as_text()
  # tiny.UNET: 4 transformer blocks, each with a self- and a cross-attention: 8 forward calls,
  # and their 8 backward calls
  assert text.count("mre_cpu_attention_forward") == 8
  assert text.count("mre_cpu_attention_backward") == 8
  # every GroupNorm too (parameters with a scale, other than the LayerNorms)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  norms = [p for p in paths if p.endswith("['scale']") and "transformer_blocks" not in p and "LayerNorm" not in p]
  assert len(norms) >= 10
  assert text.count("mre_cpu_group_norm_forward") == len(norms)
  assert text.count("mre_cpu_group_norm_backward") == len(norms)
  model = model.clone(kernels=ops.Kernels(attention="xla", norm="xla"))
  assert "mre_cpu_" not in jax.jit(loss).lower(params).as_text()


@needs_kernel
def test_heads_wider_than_the_kernel_and_causal_masks_fall_back_to_xla(rng):
  d = cpu_kernels.MAX_HEAD_DIM + 16
  q = rng.standard_normal((1, 8, d)).astype(np.float32)
  fn = lambda q: attention.multi_head_attention(q, q, q, 1, "cpu")
  assert "mre_cpu_attention_forward" not in jax.jit(fn).lower(q).as_text()
  np.testing.assert_allclose(fn(q), _sdpa(q, q, q, q, 1)[0], atol=1e-5)
  causal = lambda q: attention.multi_head_attention(q, q, q, 4, "cpu", causal=True)
  assert "mre_cpu_attention_forward" not in jax.jit(causal).lower(q[..., :64]).as_text()


@needs_kernel
@pytest.mark.parametrize("shape, groups", [
    ((4, 16, 16, 320), 32),  # 10 channels per group: groups straddle the 16-lane vectors
    ((1, 7, 5, 48), 8),  # one example: the work splits over runs of groups
    ((3, 9, 20), 4),  # rank 3 (tokens), channels not a multiple of 16
])
def test_group_norm_and_its_gradients_match_torch(rng, shape, groups):
  assert cpu_kernels.available()
  c = shape[-1]
  x = (rng.standard_normal(shape) * 3 + 2).astype(np.float32)  # an offset: the centring matters
  scale, bias = (rng.standard_normal(c).astype(np.float32) for _ in range(2))
  dy = rng.standard_normal(shape).astype(np.float32)
  out, vjp = jax.vjp(lambda *a: cpu_kernels.group_norm(*a, groups, 1e-5), x, scale, bias)
  grads = jax.jit(vjp)(jnp.asarray(dy))
  ref = torch.nn.GroupNorm(groups, c, eps=1e-5)
  with torch.no_grad():
    ref.weight.copy_(torch.from_numpy(scale))
    ref.bias.copy_(torch.from_numpy(bias))
  channels_first = lambda a: torch.from_numpy(np.moveaxis(a, -1, 1).copy())
  tx = channels_first(x).requires_grad_()
  want = ref(tx)
  want.backward(channels_first(dy))
  last = lambda t: np.moveaxis(t.detach().numpy(), 1, -1)
  for got, ref_value in zip((out, *grads), (last(want), last(tx.grad), ref.weight.grad.numpy(), ref.bias.grad.numpy())):
    np.testing.assert_allclose(np.asarray(got), ref_value, rtol=1e-4, atol=2e-5 * np.abs(ref_value).max())


@needs_kernel
def test_group_norm_layer_has_flax_parameters_and_results_with_either_kernel(rng):
  import flax.linen as nn
  x = jnp.asarray(rng.standard_normal((2, 4, 4, 64)) * 2 + 1, jnp.float32)
  ours, flax_gn = layers.GroupNorm(8, 1e-6), nn.GroupNorm(num_groups=8, epsilon=1e-6)
  params = flax_gn.init(jax.random.key(0), x)
  params = jax.tree.map(lambda a: a + jnp.asarray(rng.standard_normal(a.shape), jnp.float32), params)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(jnp.shape, params)
  want = flax_gn.apply(params, x)
  for implementation, kernel in (("auto", True), ("cpu", True), ("xla", False)):
    module = ours.clone(implementation=implementation)
    assert ("mre_cpu_group_norm_forward" in jax.jit(module.apply).lower(params, x).as_text()) == kernel
    np.testing.assert_allclose(module.apply(params, x), want, atol=1e-5)
  # bfloat16 input: XLA's ops, float32 statistics and output (float32 parameters), as PyTorch's autocast
  half = x.astype(jnp.bfloat16)
  assert norm.resolve("cpu", half, params["params"]["scale"]) == "xla"
  assert ours.apply(params, half).dtype == jnp.float32
  assert ours.clone(dtype=jnp.bfloat16).apply(params, half).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="norm='fast': expected one of"):
    ours.clone(implementation="fast").apply(params, x)


def test_a_failed_build_names_the_command_and_leaves_no_library(tmp_path, monkeypatch):
  monkeypatch.setenv("MRE_JAX_CACHE", str(tmp_path / "cache"))
  compiler = tmp_path / "broken-c++"
  compiler.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo broken 1.0 && exit 0\n"
                      "echo 'error: no such intrinsic' >&2\nexit 1\n")
  compiler.chmod(compiler.stat().st_mode | stat.S_IEXEC)
  with pytest.raises(RuntimeError, match="broken-c\\+\\+.*failed:\n.*no such intrinsic"):
    cpu_kernels.build(str(compiler))
  assert list((tmp_path / "cache").iterdir()) == []  # neither a library nor a temporary file


@needs_kernel
def test_build_is_cached_per_source(tmp_path, monkeypatch):
  monkeypatch.setenv("MRE_JAX_CACHE", str(tmp_path))
  compiler = cpu_kernels._compiler()
  first = cpu_kernels.build(compiler)
  mtime = first.stat().st_mtime_ns
  assert cpu_kernels.build(compiler) == first and first.stat().st_mtime_ns == mtime  # not rebuilt
  source = tmp_path / "cpu_kernels.cc"
  source.write_text(cpu_kernels.SOURCE.read_text() + "\n// changed\n")
  monkeypatch.setattr(cpu_kernels, "SOURCE", source)
  assert cpu_kernels.build(compiler) != first


@needs_kernel
def test_fused_attention_under_data_and_fsdp_sharding_matches_one_device(run_on_8_devices):
  code = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from mre_jax.ops import cpu_kernels
assert cpu_kernels.available()
r = np.random.default_rng(0)
q, k, v, g = (r.standard_normal((8, 40, 64)).astype(np.float32) for _ in range(4))
loss = lambda q, k, v: jnp.sum(cpu_kernels.attention(q, k, v, 4) * g)
mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
batch = NamedSharding(mesh, P(("data", "fsdp")))
got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(*(jax.device_put(x, batch) for x in (q, k, v)))
one = jax.devices()[0]
want = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(*(jax.device_put(x, one) for x in (q, k, v)))
for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
print("devices", jax.device_count(), "ok")
"""
  run_on_8_devices(code)
