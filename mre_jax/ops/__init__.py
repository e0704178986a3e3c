"""Kernels, chosen by name: the models say which kind of kernel a layer runs, never how it runs.

- attention.py: multi-head attention: XLA's ops, cuDNN flash attention (GPU), Pallas splash
  attention (TPU; interpreted elsewhere, for tests) or the fused C++ kernel (CPU).
- conv.py: 2-D convolution: XLA's, or Winograd F(4x4, 3x3) and matmul rewrites (XLA:CPU).
- norm.py: GroupNorm: XLA's ops or the C++ kernel (CPU).
- dense.py: token matmuls as 2-D matmuls on a CPU (same results: a layout, not a choice).
- cpu_kernels.py, csrc/: the C++ kernels behind "cpu" (XLA FFI, built on first use).

A `Kernels` value is a field of every model module, set from the job's config
(`config.model.attention`, `.conv`, `.norm` for training) and recorded in the run's config and
the checkpoint's model spec. "auto" is resolved per layer while the program is traced, from the
backend, the compute dtype and the layer's shapes; nothing is read from the environment and
nothing is set process-wide, so two modules with different kernels can live in one process and
a jitted function's cache key (the module) names its kernels.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from mre_jax.errors import ConfigError

ATTENTION = ("auto", "xla", "cudnn", "splash", "cpu")
CONV = ("auto", "xla", "winograd")
NORM = ("auto", "xla", "cpu")
_CHOICES = {"attention": ATTENTION, "conv": CONV, "norm": NORM}


@dataclasses.dataclass(frozen=True)
class Kernels:
  """Which kernel family each kind of layer runs.

  attention: auto (GPU: cuDNN flash attention for half-precision self-attention; TPU: splash for
    self-attention; CPU: the C++ kernel), xla, cudnn, splash or cpu.
  conv: auto (CPU: Winograd for wide float32 3x3 convolutions, matmuls for 1x1), xla, winograd.
  norm: auto (CPU: the C++ GroupNorm for float32), xla or cpu.
  """

  attention: str = "auto"
  conv: str = "auto"
  norm: str = "auto"

  def __post_init__(self):
    for field, choices in _CHOICES.items():
      if getattr(self, field) not in choices:
        raise ValueError(f"{field}={getattr(self, field)!r}: expected one of {', '.join(choices)}")

  @classmethod
  def from_config(cls, config: Any, where: str = "config") -> "Kernels":
    """Reads fields `attention`, `conv`, `norm` ("auto" where absent) of a ConfigDict or mapping.

    A bad value raises ConfigError (a ValueError) naming `<where>.<field>`.
    """
    get = config.get if hasattr(config, "get") else lambda k, d: getattr(config, k, d)
    values = {field: get(field, "auto") for field in _CHOICES}
    for field, choices in _CHOICES.items():
      if values[field] not in choices:
        raise ConfigError(f"{where}.{field}={values[field]!r}: expected one of {', '.join(choices)}")
    return cls(**values)

  def to_json(self) -> dict[str, str]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, data: Mapping[str, str] | None, where: str = "kernels") -> "Kernels":
    return cls.from_config(dict(data or {}), where)
