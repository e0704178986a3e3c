"""Matmuls of tokens by weights for XLA:CPU, on 2-D operands.

A dense layer applied to tokens x [B, T, C] is one `dot_general` with two free lhs
dimensions, and its weight gradient one with two contracting dimensions. XLA:CPU runs those
products' gradients 1.5-2x slower than the same products on x reshaped to [B*T, C] (2-core Xeon,
float32, forward + backward of [4, 1024, 320] @ [320, 2560]: 270 vs 148 ms). `dot_general`
below does that reshape (free: row-major merge of leading dimensions) on a CPU backend and
leaves every other product, and every product on a GPU/TPU, to `lax.dot_general` as it is.
"""

from __future__ import annotations

from typing import Any

import jax
from jax import lax


def dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: lax.DotDimensionNumbers, precision: Any = None,
                preferred_element_type: Any = None) -> jax.Array:
  """`lax.dot_general`; on a CPU, x [..., C] @ W [C, O] is computed as a [N, C] @ [C, O] matmul."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  if (jax.default_backend() == "cpu" and lhs.ndim > 2 and rhs.ndim == 2 and not lhs_batch and not rhs_batch
      and tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,)):
    out = lax.dot_general(lhs.reshape(-1, lhs.shape[-1]), rhs, (((1,), (0,)), ((), ())), precision=precision,
                          preferred_element_type=preferred_element_type)
    return out.reshape(*lhs.shape[:-1], rhs.shape[-1])
  return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                         preferred_element_type=preferred_element_type)


def matmul(x: jax.Array, w: jax.Array, precision: Any = None) -> jax.Array:
  """x [..., C] @ w [C, O] through `dot_general`."""
  return dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)
