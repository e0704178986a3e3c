"""One RGB conversion: a file becomes the same RGB as a training record (records.load_rgb) and as
a photo to edit (edit.read_image -> edit.to_rgb). Expected pixels are derived by hand."""
import io

import numpy as np
import pytest
from PIL import Image

from mre_jax.data import records
from mre_jax.infer import edit


def _png(image: Image.Image, **save) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format="PNG" if image.mode != "CMYK" else "JPEG", **save)
  return buf.getvalue()


def _cases():
  rgba = Image.new("RGBA", (2, 1), (200, 10, 10, 0))  # pixel 0: fully transparent red
  rgba.putpixel((1, 0), (200, 10, 10, 255))
  la = Image.new("LA", (2, 1), (40, 0))
  la.putpixel((1, 0), (40, 255))
  p = Image.new("P", (2, 1), 0)
  p.putpalette([10, 20, 30, 90, 80, 70] + [0] * 762)
  p.putpixel((1, 0), 1)
  grey16 = Image.fromarray(np.array([[0, 65535]], np.uint16))
  half = Image.new("RGBA", (1, 1), (0, 0, 0, 128))  # black at alpha 128 over white
  return [
      ("RGBA", _png(rgba), {}, [[255, 255, 255], [200, 10, 10]]),
      ("LA", _png(la), {}, [[255, 255, 255], [40, 40, 40]]),
      ("P+transparency", _png(p, transparency=0), {}, [[255, 255, 255], [90, 80, 70]]),
      ("16-bit grey", _png(grey16), {}, [[0, 0, 0], [255, 255, 255]]),
      ("half alpha", _png(half), {}, [[127, 127, 127]]),  # 0 * 128/255 + 255 * 127/255, rounded
  ]


@pytest.mark.parametrize("name,data,_,want", _cases(), ids=[c[0] for c in _cases()])
def test_training_and_editing_see_the_same_rgb(name, data, _, want, tmp_path):
  path = tmp_path / "image.png"
  path.write_bytes(data)
  trained = records.load_rgb(str(path))
  edited = np.asarray(edit.to_rgb(edit.read_image(path, "config.image")))
  np.testing.assert_array_equal(trained, edited)
  np.testing.assert_allclose(trained[0].astype(int), np.array(want), atol=1)


def test_cmyk_converts_the_same_way(tmp_path):
  cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # no black, full magenta + yellow: red
  path = tmp_path / "image.jpg"
  cmyk.save(path, quality=95)
  trained = records.load_rgb(str(path))
  edited = np.asarray(edit.to_rgb(edit.read_image(path, "config.image")))
  np.testing.assert_array_equal(trained, edited)
  assert trained[0, 0, 0] > 200 and trained[0, 0, 1] < 60 and trained[0, 0, 2] < 60
