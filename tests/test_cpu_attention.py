"""The fused CPU attention kernel (mre_jax/cpu_attention.py) against PyTorch's SDPA; its build."""

import os
import shutil
import stat
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mre_jax import cpu_attention, models, pretrained, tiny

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
  assert cpu_attention.available()
  q, k, v = (rng.standard_normal((b, n, heads * d)).astype(np.float32) for n in (t, s, s))
  q *= 3  # peaked rows: the softmax's max subtraction matters
  d_out = rng.standard_normal((b, t, heads * d)).astype(np.float32)
  out, vjp = jax.vjp(lambda *a: cpu_attention.attention(*a, heads), q, k, v)
  grads = jax.jit(vjp)(jnp.asarray(d_out))
  want = _sdpa(q, k, v, d_out, heads)
  for got, ref in zip((out, *grads), want):
    np.testing.assert_allclose(np.asarray(got), ref, atol=2e-5 * max(1, np.abs(ref).max()))


@needs_kernel
def test_auto_routes_every_unet_attention_through_the_fused_kernel_on_cpu(monkeypatch):
  monkeypatch.setattr(pretrained, "_ATTENTION", ["auto"])
  assert pretrained.attention_implementation(jnp.float32) == "cpu"
  assert pretrained.attention_implementation(jnp.bfloat16) == "cpu"
  model = models.RewardUNet(tiny.UNET)
  params = models.unet_param_shapes(model)
  args = (jnp.zeros((1, 8, 8, 8)), jnp.zeros((1,)), jnp.zeros((1, 77, 32)), jnp.zeros((1, 3)), jnp.zeros((1, 32)))
  loss = lambda p: jnp.sum(model.apply({"params": p}, *args))
  text = jax.jit(jax.grad(loss)).lower(params).as_text()
  # tiny.UNET: 4 transformer blocks, each with a self- and a cross-attention: 8 forward calls,
  # and their 8 backward calls
  assert text.count(cpu_attention._TARGETS["forward"]) == 8
  assert text.count(cpu_attention._TARGETS["backward"]) == 8
  monkeypatch.setattr(pretrained, "_ATTENTION", ["xla"])
  assert cpu_attention._TARGETS["forward"] not in jax.jit(loss).lower(params).as_text()


@needs_kernel
def test_heads_wider_than_the_kernel_fall_back_to_xla(monkeypatch, rng):
  monkeypatch.setattr(pretrained, "_ATTENTION", ["cpu"])
  d = cpu_attention.MAX_HEAD_DIM + 16
  q = rng.standard_normal((1, 8, d)).astype(np.float32)
  text = jax.jit(lambda q: pretrained.multi_head_attention(q, q, q, 1)).lower(q).as_text()
  assert cpu_attention._TARGETS["forward"] not in text
  np.testing.assert_allclose(pretrained.multi_head_attention(q, q, q, 1), _sdpa(q, q, q, q, 1)[0], atol=1e-5)


def test_a_failed_build_names_the_command_and_leaves_no_library(tmp_path, monkeypatch):
  monkeypatch.setenv("MRE_JAX_CACHE", str(tmp_path / "cache"))
  compiler = tmp_path / "broken-c++"
  compiler.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo broken 1.0 && exit 0\n"
                      "echo 'error: no such intrinsic' >&2\nexit 1\n")
  compiler.chmod(compiler.stat().st_mode | stat.S_IEXEC)
  with pytest.raises(RuntimeError, match="broken-c\\+\\+.*failed:\n.*no such intrinsic"):
    cpu_attention.build(str(compiler))
  assert list((tmp_path / "cache").iterdir()) == []  # neither a library nor a temporary file


@needs_kernel
def test_build_is_cached_per_source(tmp_path, monkeypatch):
  monkeypatch.setenv("MRE_JAX_CACHE", str(tmp_path))
  compiler = cpu_attention._compiler()
  first = cpu_attention.build(compiler)
  mtime = first.stat().st_mtime_ns
  assert cpu_attention.build(compiler) == first and first.stat().st_mtime_ns == mtime  # not rebuilt
  source = tmp_path / "cpu_attention.cc"
  source.write_text(cpu_attention.SOURCE.read_text() + "\n// changed\n")
  monkeypatch.setattr(cpu_attention, "SOURCE", source)
  assert cpu_attention.build(compiler) != first


@needs_kernel
def test_fused_attention_under_data_and_fsdp_sharding_matches_one_device():
  code = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from mre_jax import cpu_attention
assert cpu_attention.available()
r = np.random.default_rng(0)
q, k, v, g = (r.standard_normal((8, 40, 64)).astype(np.float32) for _ in range(4))
loss = lambda q, k, v: jnp.sum(cpu_attention.attention(q, k, v, 4) * g)
mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
batch = NamedSharding(mesh, P(("data", "fsdp")))
got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(*(jax.device_put(x, batch) for x in (q, k, v)))
one = jax.devices()[0]
want = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(*(jax.device_put(x, one) for x in (q, k, v)))
for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
print("devices", jax.device_count(), "ok")
"""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "PYTHONPATH": root}
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "devices 8 ok" in out.stdout
