"""Prints the input pipeline's throughput (examples/s) at 256 px crops.

  PYTHONPATH=. python benchmarks/input_pipeline.py [--source=synthetic|memory] \
      [--data_dir=/tmp/mre_tfds] [--workers=0] [--batch=16] [--steps=30]

`synthetic` reads data/synthetic_edit (64 px, built on first use, upscaled to 256);
`memory` reads 512x512 uint8 arrays from memory (the size of InsPix2Pix images), which
measures resize + crop + flip + tokenization without decoding.
"""
import os
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mre_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top

_SOURCE = flags.DEFINE_enum("source", "synthetic", ["synthetic", "memory"], "What to read.")
_DATA_DIR = flags.DEFINE_string("data_dir", os.path.join(tempfile.gettempdir(), "mre_tfds"),
                                "TFDS data dir for --source=synthetic.")
_WORKERS = flags.DEFINE_integer("workers", 0, "grain worker processes (0: threads).")
_BATCH = flags.DEFINE_integer("batch", 16, "Global batch size.")
_STEPS = flags.DEFINE_integer("steps", 30, "Batches to time (after 3 warm-up batches).")
_CROP = flags.DEFINE_integer("crop", 256, "Crop size in pixels.")


def _tokenize(texts):
  """A stand-in for the CLIP tokenizer (character codes): int32 [N, 77]."""
  out = np.zeros((len(texts), 77), np.int32)
  for i, text in enumerate(texts):
    codes = [ord(c) for c in text[:77]]
    out[i, :len(codes)] = codes
  return out


def _source():
  if _SOURCE.value == "memory":
    rng = np.random.default_rng(0)
    return [{"original": rng.integers(0, 256, (512, 512, 3), np.uint8),
             "edited": rng.integers(0, 256, (512, 512, 3), np.uint8),
             "instruction": b"make it winter", "scores": np.array([4, 5, 3], np.float32),
             "reward_texts": [b"None", b"the sky changed", b"None"]} for _ in range(64)]
  builder = input_pipeline.build_dataset("synthetic_edit", _DATA_DIR.value, config="64px")
  return input_pipeline.data_source(builder, "train")


def main(argv):
  del argv
  ds = input_pipeline.create_dataset(_source(), global_batch_size=_BATCH.value,
                                     crop_size=_CROP.value, tokenize_fn=_tokenize, seed=0,
                                     process_index=0, process_count=1)
  it = input_pipeline.create_iterator(ds, worker_count=_WORKERS.value)
  for _ in range(3):
    next(it)
  start = time.perf_counter()
  for _ in range(_STEPS.value):
    batch = next(it)
  seconds = time.perf_counter() - start
  print(f"source={_SOURCE.value} crop={_CROP.value} batch={_BATCH.value} "
        f"workers={_WORKERS.value}: {_STEPS.value * _BATCH.value / seconds:.1f} examples/s "
        f"(batch original {batch['original'].shape})")


if __name__ == "__main__":
  app.run(main)
