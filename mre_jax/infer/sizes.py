"""The editor's working sizes (SPEC section 4), apart from mre_jax.infer.edit so that the evaluation
can fit photos as the editor does without importing JAX and the model code.

Two rules map a photo's (width, height) and a resolution R to the size the model sees:
  release     the release's evaluation: longer side near R, the shorter rounded up to a
              multiple of 64 (1536x1024 -> 576x384), in the release's float arithmetic
  short_side  the paper's text: shorter side R, both rounded to the nearest multiple of 64
              (1536x1024 -> 768x512)
"""

from __future__ import annotations

import math
from typing import Any

from PIL import Image, ImageOps

from mre_jax.errors import ConfigError

SIZE_MULTIPLE = 64
SIZE_RULES = ("release", "short_side")


def check_size_rule(value: Any, field: str) -> str:
  if value not in SIZE_RULES:
    raise ConfigError(f"{field}={value!r}: expected one of {', '.join(SIZE_RULES)}")
  return value


def scale_factor(size: tuple[int, int], resolution: int, size_rule: str = "release") -> float:
  """The factor from the input's (width, height) to the working scale.

  release (SPEC section 4): f = R / max(w, h), then f = ceil(min(w, h) * f / 64) * 64 / min(w, h):
  the shorter side rounded up to a multiple of 64. short_side: f = R / min(w, h).
  """
  check_size_rule(size_rule, "size_rule")
  short = min(size)
  if size_rule == "short_side":
    return resolution / short
  factor = resolution / max(size)
  return math.ceil(short * factor / SIZE_MULTIPLE) * SIZE_MULTIPLE / short


def working_size(size: tuple[int, int], resolution: int, size_rule: str = "release") -> tuple[int, int]:
  """(width, height) the model sees, multiples of 64 (at least 64).

  release: each side floor(side * f / 64) * 64, exactly as the release computes it in floats (so
  where side * f lands just under a multiple of 64, that side loses 64, as there: 98x98 at 512
  -> 448x448); short_side: each side rounded to the nearest multiple of 64.
  """
  factor = scale_factor(size, resolution, size_rule)
  if size_rule == "release":
    sides = (int((s * factor) // SIZE_MULTIPLE) * SIZE_MULTIPLE for s in size)
  else:
    sides = (int(s * factor / SIZE_MULTIPLE + 0.5) * SIZE_MULTIPLE for s in size)
  return tuple(max(SIZE_MULTIPLE, s) for s in sides)


def output_size(size: tuple[int, int], resolution: int, size_rule: str = "release") -> tuple[int, int]:
  """(width, height) of an edit's result: the input's aspect ratio at the working scale (round(side * f))."""
  factor = scale_factor(size, resolution, size_rule)
  return tuple(max(1, int(s * factor + 0.5)) for s in size)


def fit_image(rgb: Image.Image, resolution: int, size_rule: str = "release") -> Image.Image:
  """An RGB image at `working_size`, fitted as the release's evaluation fits it (`ImageOps.fit`,
  Lanczos): where the multiples of 64 change the aspect ratio, it is centre-cropped, not stretched."""
  size = working_size(rgb.size, resolution, size_rule)
  return rgb if rgb.size == size else ImageOps.fit(rgb, size, method=Image.Resampling.LANCZOS)
