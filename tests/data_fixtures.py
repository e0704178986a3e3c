"""Small helpers shared by the data tests: a tiny CLIP tokenizer and image files."""
import io
import json
import os

import numpy as np
from PIL import Image


def make_tokenizer(folder):
  """A transformers CLIPTokenizer over a character vocabulary (no download, no merges)."""
  from transformers import CLIPTokenizer
  chars = [chr(c) for c in range(33, 127)]
  vocab = {}
  for token in chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]:
    vocab[token] = len(vocab)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "vocab.json"), "w") as f:
    json.dump(vocab, f)
  with open(os.path.join(folder, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n")
  return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"))


def hash_tokenize(texts):
  """texts -> int32 [N, 77]: a dependency-free stand-in tokenizer (character codes)."""
  out = np.zeros((len(texts), 77), np.int32)
  for i, text in enumerate(texts):
    codes = [ord(c) % 1000 for c in text][:77]
    out[i, :len(codes)] = codes
  return out


def random_image(rng, height, width):
  return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def image_bytes(img, fmt="JPEG", mode=None):
  """Encodes uint8 [H, W, 3] (converted to `mode` first if given) as file bytes."""
  pil = Image.fromarray(img)
  if mode is not None:
    pil = pil.convert(mode)
  buf = io.BytesIO()
  pil.save(buf, format=fmt)
  return buf.getvalue()


def write_image(path, img, fmt="JPEG", mode=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(image_bytes(img, fmt, mode))
  return path
