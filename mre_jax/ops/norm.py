"""GroupNorm by kernel family (`Kernels.norm`): XLA's ops or the C++ kernel of cpu_kernels.py.

- "xla": statistics in float32 (two-pass variance, as PyTorch), any backend and dtype.
- "cpu": the fused kernel (XLA:CPU; float32 inputs and parameters; other dtypes run "xla").
  XLA's GroupNorm with autodiff took 3-4x PyTorch's time on a 2-core Xeon; the kernel reads the
  input twice for the statistics and once to normalise, and its backward three times.
- "auto": "cpu" where the kernel builds, "xla" elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from mre_jax.ops import NORM, cpu_kernels


def resolve(choice: str, x: jax.Array, scale: jax.Array) -> str:
  """"cpu" or "xla" for one GroupNorm of input `x` and parameters like `scale` under `choice`."""
  if choice not in NORM:
    raise ValueError(f"norm={choice!r}: expected one of {', '.join(NORM)}")
  if choice == "xla":
    return "xla"
  if choice == "cpu" and not cpu_kernels.available():
    raise ValueError(f"norm='cpu': the CPU GroupNorm kernel is unavailable on backend {jax.default_backend()!r} "
                     "(it needs XLA:CPU and a C++ compiler; see mre_jax/ops/cpu_kernels.py)")
  float32 = x.dtype == scale.dtype == jnp.float32
  return "cpu" if float32 and x.ndim >= 3 and cpu_kernels.available() else "xla"


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int, epsilon: float,
               implementation: str = "auto") -> jax.Array:
  """GroupNorm of x [B, ..., C] over all axes but the batch, in groups of C / groups channels.

  Biased variance, then `* scale + bias` ([C] each). The result has the promoted dtype of x and
  scale (float32 for bfloat16 activations and float32 parameters, as PyTorch's autocast).
  """
  channels = x.shape[-1]
  if channels % groups:
    raise ValueError(f"GroupNorm: {channels} channels do not split into {groups} groups")
  if resolve(implementation, x, scale) == "cpu":
    return cpu_kernels.group_norm(x, scale, bias, groups, epsilon)
  grouped = x.astype(jnp.float32).reshape(x.shape[0], -1, groups, channels // groups)
  mean = jnp.mean(grouped, axis=(1, 3), keepdims=True)
  centred = grouped - mean
  var = jnp.mean(jnp.square(centred), axis=(1, 3), keepdims=True)
  y = (centred * lax.rsqrt(var + epsilon)).reshape(x.shape)
  y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
  return y.astype(jnp.result_type(x.dtype, scale.dtype))
