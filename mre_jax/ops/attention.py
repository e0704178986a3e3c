"""Multi-head attention softmax(q k^T / sqrt(d)) v, by kernel family (`Kernels.attention`).

Layouts are the projections' own: q [B, T, heads*d], k and v [B, S, heads*d] -> [B, T, heads*d].
Families, each used for the layers it supports (XLA's ops run the others):

- "xla": XLA's ops. On a CPU, sequences of `BLOCKED_MIN_TOKENS` or more run a blocked kernel
  (below) that keeps each block's scores in cache; everything else is the plain math with a
  float32 softmax.
- "cudnn": cuDNN flash attention through `jax.nn.dot_product_attention` (GPU, half precision);
  every layer, as asked (cuDNN raises where it cannot).
- "splash": Pallas splash attention (jax.experimental.pallas.ops.tpu), compiled on a TPU and run
  by the Pallas interpreter elsewhere (for tests; slow); layers whose token counts fit its blocks
  (keys a multiple of 128: SD's self-attention at 16x16 latents and up, not 77-token cross-attention).
- "cpu": the fused C++ kernel of cpu_kernels.py (XLA:CPU, heads up to 160 wide, no mask).
- "auto": cuDNN for half-precision self-attention on a GPU (where the [B*heads, T, T] scores are
  large and cuDNN takes the head width), splash for self-attention on a TPU, the C++ kernel on a
  CPU where it builds, XLA's ops for all else (cross-attention over 77 tokens gains little).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from mre_jax.ops import ATTENTION, cpu_kernels

# Blocked attention for XLA:CPU. The plain math writes and re-reads the [B*heads, T, S] scores
# (128 MB at 4 x 8 heads x 1024^2) several times and is memory-bound; scanning over heads (and
# query blocks) keeps each block's scores in cache: on a 2-core Xeon, 4 x 1024 tokens x 8 heads of
# 40: forward ~0.45x, forward + backward ~0.42x the plain time. Cross-attention (S = 77) and short
# sequences gain nothing (the per-head matmuls get too small), so they keep the plain math.
BLOCKED_MIN_TOKENS = 512  # T and S at least this (T = S = 512: fwd 1.0-1.2x, fwd + bwd 0.4-0.5x plain)
BLOCK_SCORES = 2**22  # max scores per block (B x rows x S); larger blocks slowed the forward
SPLASH_BLOCK = 128  # splash tiles: blocks of this many key tokens, and of up to this many query tokens


def _is_half(dtype: Any) -> bool:
  return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _cudnn_max_head_dim() -> int:
  """cuDNN flash attention takes heads up to 256 wide on Hopper and later, 128 before."""
  capability = getattr(jax.devices()[0], "compute_capability", "0")
  return 256 if float(capability) >= 9.0 else 128


def _splash_blocks(t: int, s: int) -> tuple[int, int] | None:
  """(query block, key block) for t query and s key tokens, or None where none fits.

  Splash's key blocks are multiples of the TPU's 128 lanes; query blocks of its 8 sublanes.
  """
  block_q = min(t, SPLASH_BLOCK)
  fits = t % block_q == 0 and block_q % 8 == 0 and s % SPLASH_BLOCK == 0
  return (block_q, SPLASH_BLOCK) if fits else None


def resolve(choice: str, dtype: Any, *, t: int, s: int, head_dim: int, causal: bool = False) -> str:
  """The kernel `choice` runs for one layer: "xla", "cudnn", "splash" or "cpu".

  Args:
    choice: one of ops.ATTENTION.
    dtype: the compute dtype of q, k, v.
    t, s: query and key tokens; head_dim: width of one head; causal: a causal mask is applied.
  """
  if choice not in ATTENTION:
    raise ValueError(f"attention={choice!r}: expected one of {', '.join(ATTENTION)}")
  backend = jax.default_backend()
  if choice == "cudnn" and backend != "gpu":
    raise ValueError(f"attention='cudnn': cuDNN flash attention needs a GPU (backend is {backend!r})")
  if choice == "cpu" and not cpu_kernels.available():
    raise ValueError(f"attention='cpu': the fused CPU kernel is unavailable on backend {backend!r} "
                     "(it needs XLA:CPU and a C++ compiler; see mre_jax/ops/cpu_kernels.py)")
  if choice == "auto":
    self_attention = t == s
    if backend == "gpu":
      fits = head_dim % 8 == 0 and head_dim <= _cudnn_max_head_dim()
      return "cudnn" if _is_half(dtype) and self_attention and fits else "xla"
    if backend == "tpu":
      choice = "splash" if self_attention else "xla"
    else:
      choice = "cpu" if cpu_kernels.available() else "xla"  # available() is False off XLA:CPU
  if choice == "splash" and _splash_blocks(t, s) is None:
    return "xla"
  if choice == "cpu" and (causal or head_dim > cpu_kernels.MAX_HEAD_DIM):
    return "xla"
  return choice


def multi_head_attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int, implementation: str = "auto",
                         *, causal: bool = False) -> jax.Array:
  """softmax(q k^T / sqrt(d) [+ causal mask]) v per head: q [B, T, heads*d], k, v [B, S, heads*d] -> [B, T, heads*d].

  The softmax is float32 in every family; the result has q's dtype.
  """
  (b, t, width), s = q.shape, k.shape[1]
  if width % heads:
    raise ValueError(f"attention: width {width} is not a multiple of {heads} heads")
  d = width // heads
  kind = resolve(implementation, q.dtype, t=t, s=s, head_dim=d, causal=causal)
  if kind == "cudnn":
    split = lambda x, n: x.reshape(b, n, heads, d)
    out = jax.nn.dot_product_attention(split(q, t), split(k, s), split(v, s), scale=d**-0.5, is_causal=causal,
                                       implementation="cudnn")
    return out.reshape(b, t, width)
  if kind == "cpu":
    f32 = lambda x: x.astype(jnp.float32)
    return cpu_kernels.attention(f32(q), f32(k), f32(v), heads).astype(q.dtype)
  if kind == "splash":
    return _splash(q, k, v, heads, causal)
  if min(t, s) >= BLOCKED_MIN_TOKENS and not causal and jax.default_backend() == "cpu":
    # heads lead (they are scanned), the batch stays a vectorised (shardable) axis
    heads_first = lambda x, n: x.reshape(b, n, heads, d).transpose(2, 0, 1, 3).astype(jnp.float32)
    out = _blocked_attention(heads_first(q, t), heads_first(k, s), heads_first(v, s))
    return out.transpose(1, 2, 0, 3).reshape(b, t, width).astype(q.dtype)
  return _plain(q, k, v, heads, causal)


def _plain(q, k, v, heads, causal):
  """The textbook math: [B, heads, T, S] scores in float32, softmax, value product in q's dtype."""
  (b, t, width), s = q.shape, k.shape[1]
  d = width // heads
  split = lambda x, n: x.reshape(b, n, heads, d)
  scores = jnp.einsum("bthd,bshd->bhts", split(q, t), split(k, s), preferred_element_type=jnp.float32) * d**-0.5
  if causal:
    scores = jnp.where(jnp.tril(jnp.ones((t, s), bool)), scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bhts,bshd->bthd", probs, split(v, s)).reshape(b, t, width)


# ----------------------------------------------------------------------------- splash (Pallas)


@functools.cache
def _splash_kernel(heads: int, t: int, s: int, causal: bool, interpret: bool):
  # On use: an experimental TPU module, so the other backends never depend on its importing.
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  shape = (t, s)
  mask = splash.MultiHeadMask([splash.CausalMask(shape) if causal else splash.FullMask(shape)] * heads)
  bq, bkv = _splash_blocks(t, s)
  blocks = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                             block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
  return splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash(q, k, v, heads, causal):
  """Splash attention per example: the kernel takes [heads, T, d] and leaves the scaling to us."""
  (b, t, width), s = q.shape, k.shape[1]
  d = width // heads
  kernel = _splash_kernel(heads, t, s, causal, jax.default_backend() != "tpu")
  heads_first = lambda x, n: x.reshape(b, n, heads, d).transpose(0, 2, 1, 3)
  out = jax.vmap(kernel)(heads_first(q * jnp.asarray(d**-0.5, q.dtype), t), heads_first(k, s), heads_first(v, s))
  return out.transpose(0, 2, 1, 3).reshape(b, t, width).astype(q.dtype)


# ----------------------------------------------------------------------------- blocked (XLA:CPU)


def _query_block(b: int, t: int, s: int) -> int:
  """Query rows per block: t, halved while a block's [b, rows, s] scores exceed BLOCK_SCORES."""
  rows = t
  while b * rows * s > BLOCK_SCORES and rows % 2 == 0:
    rows //= 2
  return rows


def _split_rows(x: jax.Array, rows: int) -> jax.Array:
  """[B, T, ...] -> [T/rows, B, rows, ...]."""
  return jnp.moveaxis(x.reshape(x.shape[0], x.shape[1] // rows, rows, *x.shape[2:]), 1, 0)


def _join_rows(x: jax.Array) -> jax.Array:
  """[T/rows, B, rows, ...] -> [B, T, ...]."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])


def _blocked_forward(q, k, v):
  """q [H, B, T, d], k and v [H, B, S, d] -> out [H, B, T, d], row logsumexp of the scores [H, B, T]."""
  rows, scale = _query_block(q.shape[1], q.shape[2], k.shape[2]), q.shape[-1] ** -0.5

  def block(q, k, v):  # q [B, rows, d] (scaled), k and v [B, S, d]
    scores = jnp.einsum("bqd,bkd->bqk", q, k)
    top = jnp.max(scores, axis=-1, keepdims=True)
    p = jnp.exp(scores - top)
    total = jnp.sum(p, axis=-1, keepdims=True)
    return jnp.einsum("bqk,bkd->bqd", p, v) / total, (top + jnp.log(total))[..., 0]

  def head(qkv):
    q, k, v = qkv
    out, lse = lax.map(lambda qb: block(qb * scale, k, v), _split_rows(q, rows))
    return _join_rows(out), _join_rows(lse)

  return lax.map(head, (q, k, v))


def _blocked_backward(res, d_out):
  """Gradients wrt q, k, v from the forward's (q, k, v, out, logsumexp); p is recomputed per block."""
  q, k, v, out, lse = res
  rows, scale = _query_block(q.shape[1], q.shape[2], k.shape[2]), q.shape[-1] ** -0.5
  delta = jnp.sum(d_out * out, axis=-1)  # [H, B, T]: rowsum(p * dp) of the softmax backward

  def head(args):
    q, k, v, d_out, lse, delta = args

    def block(dkv_t, xs):
      dk_t, dv_t = dkv_t
      q, d_out, lse, delta = xs
      q = q * scale
      p = jnp.exp(jnp.einsum("bqd,bkd->bqk", q, k) - lse[..., None])
      ds = p * (jnp.einsum("bqd,bkd->bqk", d_out, v) - delta[..., None])
      # dk and dv accumulate as [B, d, S]: XLA:CPU runs these products ~2x faster than the [B, S, d] ones
      dk_t = dk_t + jnp.einsum("bqd,bqk->bdk", q, ds)
      dv_t = dv_t + jnp.einsum("bqd,bqk->bdk", d_out, p)
      return (dk_t, dv_t), jnp.einsum("bqk,bkd->bqd", ds, k) * scale

    zeros = jnp.zeros_like(jnp.swapaxes(k, 1, 2))
    (dk_t, dv_t), dq = lax.scan(block, (zeros, zeros), tuple(_split_rows(x, rows) for x in (q, d_out, lse, delta)))
    return _join_rows(dq), dk_t, dv_t

  dq, dk_t, dv_t = lax.map(head, (q, k, v, d_out, lse, delta))
  return dq, jnp.swapaxes(dk_t, -1, -2), jnp.swapaxes(dv_t, -1, -2)


@jax.custom_vjp
def _blocked_attention(q, k, v):
  """softmax(q k^T / sqrt(d)) v: q [H, B, T, d], k and v [H, B, S, d] float32 -> [H, B, T, d]."""
  return _blocked_forward(q, k, v)[0]


def _blocked_attention_fwd(q, k, v):
  out, lse = _blocked_forward(q, k, v)
  return out, (q, k, v, out, lse)


_blocked_attention.defvjp(_blocked_attention_fwd, _blocked_backward)
