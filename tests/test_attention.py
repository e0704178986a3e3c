"""Attention kernels (mre_jax/ops/attention.py) against PyTorch's SDPA, their choice and where it reaches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mre_jax import models, ops
from mre_jax.io import pretrained
from mre_jax.models import tiny
from mre_jax.ops import attention

torch = pytest.importorskip("torch")


def _sdpa(q, k, v, heads, causal=False, d_out=None):
  """PyTorch's output (and gradients wrt q, k, v, given d_out) for [B, T, heads*d] operands."""
  b, t, width = q.shape
  split = lambda x: torch.from_numpy(x).reshape(b, -1, heads, width // heads).transpose(1, 2).requires_grad_()
  tq, tk, tv = split(q), split(k), split(v)
  out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal).transpose(1, 2)
  out = out.reshape(b, t, width)
  if d_out is None:
    return out.detach().numpy()
  out.backward(torch.from_numpy(d_out))
  merge = lambda x: x.grad.transpose(1, 2).reshape(b, -1, width).numpy()
  return out.detach().numpy(), merge(tq), merge(tk), merge(tv)


def _qkv(rng, b, t, s, width):
  return tuple(rng.standard_normal((b, n, width)).astype(np.float32) for n in (t, s, s))


@pytest.mark.parametrize("implementation", ["xla", "auto", "cpu", "splash"])
def test_every_family_matches_torch_sdpa_for_self_cross_and_causal_attention(rng, implementation):
  heads, d = 4, 8
  # self-attention (128 tokens: one splash block), cross-attention over 7 tokens (not splash), causal
  for t, s, causal in ((128, 128, False), (16, 7, False), (128, 128, True)):
    q, k, v = _qkv(rng, 2, t, s, heads * d)
    out = attention.multi_head_attention(q, k, v, heads, implementation, causal=causal)
    np.testing.assert_allclose(out, _sdpa(q, k, v, heads, causal), atol=1e-5)


def test_splash_attention_and_its_gradients_match_torch_sdpa_over_several_blocks(rng):
  """Pallas splash attention, interpreted on the CPU: 256 tokens are two 128-token blocks each way."""
  b, t, heads, d = 1, 256, 2, 40
  q, k, v = _qkv(rng, b, t, t, heads * d)
  q *= 3  # peaked rows: the running max of the online softmax matters
  d_out = rng.standard_normal((b, t, heads * d)).astype(np.float32)
  fn = lambda *a: attention.multi_head_attention(*a, heads, "splash")
  assert attention.resolve("splash", jnp.float32, t=t, s=t, head_dim=d) == "splash"
  out, vjp = jax.vjp(fn, q, k, v)
  for got, want in zip((out, *vjp(jnp.asarray(d_out))), _sdpa(q, k, v, heads, d_out=d_out)):
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5 * max(1, np.abs(want).max()))
  # token counts that fit no block run XLA's ops
  assert attention.resolve("splash", jnp.float32, t=t, s=77, head_dim=d) == "xla"
  assert attention.resolve("splash", jnp.float32, t=64, s=64, head_dim=d) == "xla"


@pytest.mark.parametrize("t, s", [(32, 32), (32, 24)])
def test_blocked_attention_and_its_gradients_match_torch_sdpa(rng, monkeypatch, t, s):
  monkeypatch.setattr(attention, "BLOCKED_MIN_TOKENS", 1)  # the blocked kernel for these small shapes,
  monkeypatch.setattr(attention, "BLOCK_SCORES", 2 * 8 * s)  # in blocks of 8 query rows
  b, heads, d = 2, 3, 8
  q, k, v = _qkv(rng, b, t, s, heads * d)
  d_out = rng.standard_normal((b, t, heads * d)).astype(np.float32)
  fn = lambda *a: attention.multi_head_attention(*a, heads, "xla")
  assert "scan" in str(jax.make_jaxpr(fn)(q, k, v))  # the blocked kernel scans over heads and blocks
  out, vjp = jax.vjp(fn, q, k, v)
  grads = jax.jit(vjp)(jnp.asarray(d_out))
  for got, want in zip((out, *grads), _sdpa(q, k, v, heads, d_out=d_out)):
    np.testing.assert_allclose(got, want, atol=1e-5)
  # bfloat16 inputs: float32 softmax inside, bfloat16 out
  half = fn(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)))
  assert half.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(half, np.float32), out, atol=0.05)


def test_auto_picks_per_backend_dtype_and_layer(monkeypatch):
  resolve = lambda dtype, t=1024, s=1024, d=40, **kw: attention.resolve("auto", dtype, t=t, s=s, head_dim=d, **kw)
  assert resolve(jnp.float32) == resolve(jnp.bfloat16) == "cpu"  # this machine (with a C++ compiler)
  assert resolve(jnp.float32, d=512) == "xla"  # the VAE's single 512-wide head: wider than the kernel
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(attention, "_cudnn_max_head_dim", lambda: 256)
  assert resolve(jnp.bfloat16) == resolve(jnp.float16) == resolve(jnp.bfloat16, d=160) == "cudnn"
  assert resolve(jnp.float32) == "xla"  # cuDNN flash attention is half precision only
  assert resolve(jnp.bfloat16, s=77) == "xla"  # cross-attention
  assert resolve(jnp.bfloat16, d=512) == resolve(jnp.bfloat16, d=36) == "xla"  # too wide; not a multiple of 8
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert resolve(jnp.bfloat16) == resolve(jnp.float32) == "splash"
  assert resolve(jnp.bfloat16, s=77) == resolve(jnp.bfloat16, t=64, s=64) == "xla"  # cross; keys not 128s


def test_kernels_that_cannot_run_here_and_unknown_names_are_errors():
  q = jnp.zeros((1, 8, 16))
  with pytest.raises(ValueError, match="cudnn.*needs a GPU"):
    attention.multi_head_attention(q, q, q, 2, "cudnn")
  with pytest.raises(ValueError, match="attention='flash': expected one of auto, xla, cudnn, splash, cpu"):
    attention.multi_head_attention(q, q, q, 2, "flash")


def _recorded_attention(monkeypatch, kinds=None):
  """Makes every attention call append (implementation, q shape, causal) to the returned list, and
  the kernel it resolves to to `kinds`."""
  calls, real = [], attention.multi_head_attention

  def record(q, k, v, heads, implementation="auto", *, causal=False):
    calls.append((implementation, q.shape, causal))
    if kinds is not None:
      kinds.append(attention.resolve(implementation, q.dtype, t=q.shape[1], s=k.shape[1],
                                     head_dim=q.shape[2] // heads, causal=causal))
    return real(q, k, v, heads, implementation, causal=causal)

  monkeypatch.setattr(attention, "multi_head_attention", record)
  return calls


def test_the_attention_field_reaches_every_layer_of_the_unet_vae_and_text_encoder(monkeypatch):
  kernels = ops.Kernels(attention="xla")
  unet = models.RewardUNet(tiny.UNET, kernels=kernels)
  vae = pretrained.make_vae(tiny.VAE, kernels=kernels)
  text = pretrained.make_text_encoder(tiny.text_config(100), kernels=kernels)
  shapes = models.unet_param_shapes(unet), pretrained.vae_param_shapes(vae), pretrained.text_encoder_param_shapes(text)
  calls = _recorded_attention(monkeypatch)
  args = (jnp.zeros((1, 8, 8, 8)), jnp.zeros((1,)), jnp.zeros((1, 77, 32)), jnp.zeros((1, 3)), jnp.zeros((1, 32)))
  jax.eval_shape(lambda p: unet.apply({"params": p}, *args), shapes[0])
  # tiny.UNET: transformer blocks 1 down and 2 up at 8x8 (width 32), 1 in the mid block at 4x4
  # (width 64); each has a self- and a cross-attention
  assert sorted(calls) == [("xla", (1, 16, 64), False)] * 2 + [("xla", (1, 64, 32), False)] * 6
  calls.clear()
  jax.eval_shape(lambda p: vae.apply({"params": p}, jnp.zeros((1, 64, 64, 3))), shapes[1])
  assert calls == [("xla", (1, 64, 16), False)] * 2  # the encoder's and decoder's mid-block attention at 8x8
  calls.clear()
  jax.eval_shape(lambda p: text.apply({"params": p}, jnp.zeros((1, 77), jnp.int32)), shapes[2])
  assert calls == [("xla", (1, 77, 32), True)] * 2  # 2 causal layers


def test_unet_with_splash_attention_matches_xla_attention(rng, monkeypatch):
  """The tiny U-Net at 16x16 latents: its 256-token self-attention through interpreted splash."""
  model = models.RewardUNet(tiny.UNET, kernels=ops.Kernels(attention="xla"))
  params = models.init_unet_params(model, 3)
  args = (rng.standard_normal((2, 16, 16, 8)).astype(np.float32), np.array([5, 500]),
          rng.standard_normal((2, 77, 32)).astype(np.float32), np.full((2, 3), 4.0, np.float32),
          rng.standard_normal((2, 32)).astype(np.float32))
  want = model.apply({"params": params}, *args)
  kinds = []
  _recorded_attention(monkeypatch, kinds)
  splash = model.clone(kernels=ops.Kernels(attention="splash")).apply({"params": params}, *args)
  np.testing.assert_allclose(splash, want, atol=1e-5 * float(jnp.abs(want).max()))
  # splash for the 3 self-attention layers at 16x16; XLA's ops at 8x8 (64 keys) and for cross-attention
  assert sorted(kinds) == ["splash"] * 3 + ["xla"] * 5
