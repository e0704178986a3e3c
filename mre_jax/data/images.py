"""One RGB conversion for every image that enters the project: training records and edits.

A transparent PNG must become the same RGB whether it is a training example or a photo to edit,
so both `records` (the TFDS builders' decoding) and `edit` (the CLI, the app, evaluation) call
`to_rgb_array`.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

_WIDE_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # 16- and 32-bit integer grey


def to_rgb_array(image: Image.Image) -> np.ndarray:
  """uint8 [H, W, 3] of a PIL image of any mode.

  - transparency (RGBA, LA, PA, and P or L/RGB with a transparency entry) is composited over
    white, not dropped (dropping it shows whatever colour sits under alpha 0, often black);
  - 16-bit grey is scaled to 8 bits (value / 257, rounded); 32-bit integer grey too when it
    exceeds 255, else taken as 8-bit values;
  - float grey ("F") in [0, 1] is scaled by 255, otherwise taken as 0..255;
  - everything else (CMYK, YCbCr, 1-bit, palettes without transparency, ...) as PIL converts it.
  """
  mode = image.mode
  if mode in _WIDE_GREY:
    arr = np.asarray(image, np.float64)
    scale = 257.0 if mode.startswith("I;16") or arr.max() > 255 else 1.0
    grey = np.clip(np.round(arr / scale), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)
  if mode == "F":
    arr = np.asarray(image, np.float64)
    grey = np.clip(np.round(arr * (255.0 if arr.max() <= 1.0 else 1.0)), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)
  if mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), np.uint8)
  return np.asarray(image.convert("RGB"), np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
  """`to_rgb_array` as a PIL RGB image (an RGB input is returned as is)."""
  return image if image.mode == "RGB" and "transparency" not in image.info else Image.fromarray(to_rgb_array(image))
