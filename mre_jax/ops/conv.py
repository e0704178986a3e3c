"""Convolution kernels for XLA:CPU: Winograd F(4x4, 3x3) for wide 3x3 convolutions, a matmul for 1x1.

`conv2d` is `lax.conv_general_dilated` for NHWC inputs and HWIO kernels, by kernel family
(`Kernels.conv`):

- "auto" (default): on a CPU backend, float32 3x3 convolutions with stride 1, padding 1, at least
  `WINOGRAD_MIN_SIDE` pixels a side and `WINOGRAD_MIN_CHANNELS` channels in and out run as
  Winograd F(4x4, 3x3), and 1x1 convolutions with stride 1 run as a matmul (`dense.matmul`).
  Everything else (any GPU/TPU convolution, strided, small or low-precision ones) is
  `lax.conv_general_dilated`.
- "winograd": the same rewrites on any backend and for any channel count and size (for tests);
- "xla": never rewrite.

Why: on the U-Net's shapes XLA:CPU's direct 3x3 convolutions run at about 150 GFLOP/s on a
2-core Xeon, where its matmuls reach about 200 and PyTorch's oneDNN convolutions about 270.
Winograd F(4x4, 3x3) (Lavin & Gray, 2016) turns a 3x3 convolution into 36 independent
[tiles, C] x [C, O] matmuls with 4x fewer multiplications, plus cheap linear transforms of
input tiles, weights and output tiles. Everything is linear jnp code, so gradients come from
JAX's autodiff and are Winograd-shaped too. The float32 error relative to the direct
convolution is ~2e-5 of the output's scale (the transforms' constants reach 8); half precision
would amplify that, hence float32 only in "auto".
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mre_jax.ops import CONV, dense

# Measured on a 2-core Xeon (float32), one convolution alone: F(4x4, 3x3) beat XLA's direct
# convolution from 256 channels up (3x32x32x320: 17.5 vs 31.5 ms, PyTorch 20.1; 1x64x64x512: 69
# vs 90 ms) and lost at 128 (1x256x256x128: 152 vs 109 ms). At 16x16 it lost alone (3x16x16x640:
# 51 vs 34 ms) but won inside the U-Net, forward (1.30 vs 1.34 s per call) and more so backward.
# Those figures predate the two-pass tile transforms (`_separate`); with them, forward alone:
# 3x32x32x192 5.6 vs 11.4 ms, 3x32x32x128 3.7 vs 3.8, 1x256x256x128 104 vs 86, 3x16x16x320 5.3
# vs 7.4; forward + both gradients won at every width from 32 channels at 32 px and up (1.5-3.9x) and
# lost at 8 px. The thresholds were not re-tuned.
WINOGRAD_MIN_CHANNELS = 256
WINOGRAD_MIN_SIDE = 16

# F(4x4, 3x3) with interpolation points 0, 1, -1, 2, -2, inf: y = A^T [(G g G^T) * (B^T d B)] A
# for a 6x6 input tile d and a 3x3 kernel g gives the 4x4 output tile y.
_BT = np.array([[4, 0, -5, 0, 1, 0],
                [0, -4, -4, 1, 1, 0],
                [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0],
                [0, 2, -1, -2, 1, 0],
                [0, 4, 0, -5, 0, 1]], np.float64)
_G = np.array([[1 / 4, 0, 0],
               [-1 / 6, -1 / 6, -1 / 6],
               [-1 / 6, 1 / 6, -1 / 6],
               [1 / 24, 1 / 12, 1 / 6],
               [1 / 24, -1 / 12, 1 / 6],
               [0, 0, 1]], np.float64)
_AT = np.array([[1, 1, 1, 1, 1, 0],
                [0, 1, -1, 2, -2, 0],
                [0, 1, 1, 4, 4, 0],
                [0, 1, -1, 8, -8, 1]], np.float64)
_TILE, _OUT = _BT.shape[0], _AT.shape[0]  # 6x6 input tiles give 4x4 output tiles


def _combine(matrix: np.ndarray, parts: list) -> list:
  """[sum_j matrix[i, j] * parts[j] for each row i], skipping zero coefficients."""
  return [sum(float(c) * p for c, p in zip(row, parts) if c) for row in matrix]


def _separate(x: jax.Array) -> jax.Array:
  """Materialises the first pass of a separable tile transform.

  Fused into one loop, XLA:CPU would recompute the first pass's sums in each of the 36 (or 16)
  outputs of the second; materialising them made the input transform 2-3x faster forward and
  ~10x faster in its gradient (4x32x32x640: 2.9 vs 43 ms) on the 2-core Xeon above.
  """
  return lax.optimization_barrier(x)


def _input_tiles(x: jax.Array, tiles_h: int, tiles_w: int) -> jax.Array:
  """x [N, H, W, C] (zero-padded by 1, and up to whole tiles) -> B^T d B per tile: [36, N*th*tw, C]."""
  n, h, w, c = x.shape
  x = jnp.pad(x, ((0, 0), (1, _OUT * tiles_h + 1 - h), (1, _OUT * tiles_w + 1 - w), (0, 0)))
  rows = [lax.slice_in_dim(x, i, i + _OUT * (tiles_h - 1) + 1, stride=_OUT, axis=1) for i in range(_TILE)]
  r = _separate(jnp.stack(_combine(_BT, rows)))  # B^T along H: [6, N, th, W + 2, C]
  cols = [lax.slice_in_dim(r, j, j + _OUT * (tiles_w - 1) + 1, stride=_OUT, axis=3) for j in range(_TILE)]
  return jnp.stack(_combine(_BT, cols), axis=1).reshape(_TILE * _TILE, n * tiles_h * tiles_w, c)


def _kernel_tiles(kernel: jax.Array) -> jax.Array:
  """kernel [3, 3, C, O] -> G g G^T: [36, C, O] (one small matmul)."""
  c, o = kernel.shape[2:]
  gg = jnp.asarray(np.kron(_G, _G), kernel.dtype)  # [36, 9]
  return jnp.dot(gg, kernel.reshape(9, c * o), precision=lax.Precision.HIGHEST).reshape(_TILE * _TILE, c, o)


def _output_tiles(m: jax.Array, n: int, tiles_h: int, tiles_w: int) -> jax.Array:
  """m [36, N*th*tw, O] -> A^T m A per tile, laid out as [N, 4*th, 4*tw, O]."""
  m = m.reshape(_TILE, _TILE, n, tiles_h, tiles_w, m.shape[-1])
  r = _separate(jnp.stack(_combine(_AT, [m[i] for i in range(_TILE)])))  # A^T along H: [4, 6, N, th, tw, O]
  y = jnp.stack(_combine(_AT, [r[:, j] for j in range(_TILE)]), axis=4)  # [4, N, th, tw, 4, O]
  return jnp.transpose(y, (1, 2, 0, 3, 4, 5)).reshape(n, tiles_h * _OUT, tiles_w * _OUT, -1)


def winograd_conv3x3(x: jax.Array, kernel: jax.Array, precision: Any = None) -> jax.Array:
  """3x3 convolution, stride 1, zero padding 1: x [N, H, W, C], kernel [3, 3, C, O] -> [N, H, W, O]."""
  n, h, w, _ = x.shape
  tiles_h, tiles_w = -(-h // _OUT), -(-w // _OUT)
  v = _input_tiles(x, tiles_h, tiles_w)
  u = _kernel_tiles(kernel)
  m = jnp.einsum("pkc,pco->pko", v, u, precision=precision)
  return _output_tiles(m, n, tiles_h, tiles_w)[:, :h, :w]


def _kind(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding, implementation: str) -> str:
  """"winograd", "matmul" or "xla" for one NHWC convolution under `implementation`."""
  if implementation not in CONV:
    raise ValueError(f"conv={implementation!r}: expected one of {', '.join(CONV)}")
  if implementation == "xla" or (implementation == "auto" and jax.default_backend() != "cpu"):
    return "xla"
  if x.ndim != 4 or tuple(strides) != (1, 1):
    return "xla"
  pads = padding if isinstance(padding, str) else tuple(map(tuple, padding))
  (_, h, w, c), (kh, kw, _, o) = x.shape, kernel.shape
  if (kh, kw) == (1, 1) and pads in ("VALID", "SAME", ((0, 0), (0, 0))):
    return "matmul"
  if (kh, kw) != (3, 3) or pads not in ("SAME", ((1, 1), (1, 1))):
    return "xla"
  if implementation == "winograd":
    return "winograd"
  wide = min(c, o) >= WINOGRAD_MIN_CHANNELS and min(h, w) >= WINOGRAD_MIN_SIDE
  return "winograd" if wide and x.dtype == kernel.dtype == jnp.float32 else "xla"


def conv2d(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1), padding: Any = "SAME",
           implementation: str = "auto", precision: Any = None) -> jax.Array:
  """x [N, H, W, C] (*) kernel [kh, kw, C, O] -> [N, H', W', O]; padding as `lax.conv_general_dilated`'s."""
  kind = _kind(x, kernel, tuple(strides), padding, implementation)
  if kind == "winograd":
    return winograd_conv3x3(x, kernel, precision)
  if kind == "matmul":
    return dense.matmul(x, kernel[0, 0], precision=precision)
  numbers = lax.conv_dimension_numbers(x.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))
  return lax.conv_general_dilated(x, kernel, tuple(strides), padding, dimension_numbers=numbers,
                                  precision=precision)
