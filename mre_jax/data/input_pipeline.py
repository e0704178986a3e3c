"""Input pipeline: TFDS builders in data/ -> grain over array_record -> per-process batches.

Data flows: `build_dataset` prepares a builder (first use) -> `builder.as_data_source(split)`
(random access, decoded numpy examples) -> `create_dataset` (global shuffle, joint
resize/crop/flip, instruction choice, per-process slice, batch, tokenize) ->
`create_iterator` (threads or worker processes; `get_state()` / `set_state()` checkpoint it).

A batch is a dict of numpy arrays (no strings reach the device):
  original, edited: float32 [B, H, W, 3] in [-1, 1]  (truth too, with keep_truth=True)
  instruction_ids, reward_ids: int32 [B, 77]
  scores: float32 [B, 3] in [0, 5]
with B = global_batch_size // process_count on each process.
"""

from __future__ import annotations

import functools
import importlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import grain
import jax
import numpy as np
from absl import flags
from PIL import Image

from mre_jax.data import tokens

if TYPE_CHECKING:
  import tensorflow_datasets as tfds

Example = dict[str, Any]  # a decoded TFDS example, or one prepared for batching
TokenizeFn = Callable[[Sequence[str]], np.ndarray]  # texts -> int32 ids [N, 77] (tokens.tokenize_fn)

DATA_ROOT = Path(__file__).absolute().parents[2] / "data"  # the TFDS builders, data/<name>/
RESIZE_POLICIES = ("short_side", "square")
BEST_SCORES = (5.0, 5.0, 5.0)
BEST_REWARD_TEXTS = ("None", "None", "None")


# ------------------------------------------------------------------------ builders

def builder_class(name: str) -> type[tfds.core.DatasetBuilder]:
  """The `Builder` class of data/<name>/<name>_dataset_builder.py (imported once)."""
  module = f"{name}.{name}_dataset_builder"
  path = DATA_ROOT / name / f"{name}_dataset_builder.py"
  if module not in sys.modules:
    if not path.exists():
      raise ValueError(f"unknown dataset {name!r}: expected a TFDS builder at {path}")
    # Same module name as `tfds build data/<name>` uses, so TFDS registers it once.
    if str(DATA_ROOT) not in sys.path:
      sys.path.append(str(DATA_ROOT))
    importlib.import_module(module)
  return sys.modules[module].Builder


def build_dataset(name: str, data_dir: str, manual_dir: str | None = None,
                  **builder_kwargs: Any) -> tfds.core.DatasetBuilder:
  """A prepared TFDS builder for data/<name>, built into `data_dir` on first use.

  Args:
    name: folder under data/ (e.g. "synthetic_edit", "reward_edit").
    data_dir: where TFDS writes / finds the prepared dataset.
    manual_dir: source files for the manual-download builders (see each builder's README).
    **builder_kwargs: passed to the builder, e.g. `config="tiny"`.
  """
  import tensorflow_datasets as tfds  # Only building needs TF; reading does not.
  builder = builder_class(name)(data_dir=data_dir, **builder_kwargs)
  config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
  builder.download_and_prepare(download_config=config)
  return builder


def data_source(builder: tfds.core.DatasetBuilder, split: str) -> grain.sources.RandomAccessDataSource:
  """Random-access source of decoded examples (dicts of numpy / bytes) for one split."""
  return builder.as_data_source(split=split)


# ------------------------------------------------------------------- augmentation

def _text(value):
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def resized_shape(height: int, width: int, crop_size: int, resize: str = "short_side",
                  resize_size: int | None = None) -> tuple[int, int]:
  """(H, W) to resize to before the crop: the short side to `resize_size` (default the
  crop size), keeping the aspect ratio; or ("square") both sides to the crop size."""
  if resize not in RESIZE_POLICIES:
    raise ValueError(f"resize must be one of {RESIZE_POLICIES}, got {resize!r}")
  if resize == "square":
    return crop_size, crop_size
  short = resize_size or crop_size
  if short < crop_size:
    raise ValueError(f"resize_size {short} is smaller than crop_size {crop_size}")
  scale = short / min(height, width)
  return max(short, round(height * scale)), max(short, round(width * scale))


def _resize(img, shape):
  if img.shape[:2] == tuple(shape):
    return img
  return np.asarray(Image.fromarray(img).resize((shape[1], shape[0]), Image.BICUBIC))


def augment_images(images: Sequence[np.ndarray], rng: np.random.Generator, *, crop_size: int,
                   resize: str = "short_side", resize_size: int | None = None, flip: bool = True) -> list[np.ndarray]:
  """The same resize, random crop and horizontal flip applied to every image.

  Args:
    images: list of uint8 [h, w, 3] (sizes may differ; all are resized to the shape the
      first image gets).
    rng: np.random.Generator that draws the crop offset and the flip.
  Returns:
    list of float32 [crop_size, crop_size, 3] in [-1, 1].
  """
  shape = resized_shape(*images[0].shape[:2], crop_size, resize, resize_size)
  top = int(rng.integers(0, shape[0] - crop_size + 1))
  left = int(rng.integers(0, shape[1] - crop_size + 1))
  mirror = flip and rng.random() < 0.5
  out = []
  for img in images:
    img = _resize(np.asarray(img, np.uint8), shape)[top:top + crop_size, left:left + crop_size]
    if mirror:
      img = img[:, ::-1]
    out.append(img.astype(np.float32) / 127.5 - 1.0)
  return out


def prepare_example(example: Example, rng: np.random.Generator, *, crop_size: int, resize: str = "short_side",
                    resize_size: int | None = None, flip: bool = True, keep_truth: bool = False) -> Example:
  """A decoded TFDS example -> augmented images, one instruction, the reward.

  Examples without rewards (InstructPix2Pix) get the best reward (5, 5, 5; "None; ...").
  Returns a dict: original, edited (and truth) float32 [C, C, 3]; instruction, reward_text
  (str); scores float32 [3].
  """
  names = ["original", "edited"] + (["truth"] if keep_truth else [])
  images = augment_images([example[k] for k in names], rng, crop_size=crop_size,
                          resize=resize, resize_size=resize_size, flip=flip)
  choices = list(example.get("instructions", []))
  if len(choices) > 1:
    instruction = choices[int(rng.integers(len(choices)))]
  else:
    instruction = example["instruction"] if "instruction" in example else choices[0]
  texts = example.get("reward_texts", BEST_REWARD_TEXTS)
  out = dict(zip(names, images))
  out["instruction"] = _text(instruction)
  out["reward_text"] = "; ".join(_text(t) for t in texts)
  out["scores"] = np.asarray(example.get("scores", BEST_SCORES), np.float32)
  return out


def tokenize_batch(batch: dict[str, Any], *, tokenize_fn: TokenizeFn) -> dict[str, np.ndarray]:
  """Replaces the text fields of a batch by token ids: instruction_ids, reward_ids [B, 77]."""
  out = {k: v for k, v in batch.items() if k not in ("instruction", "reward_text")}
  for key, name in (("instruction", "instruction_ids"), ("reward_text", "reward_ids")):
    ids = np.asarray(tokenize_fn([str(t) for t in batch[key]]), np.int32)
    if ids.shape != (len(batch[key]), tokens.MAX_LENGTH):
      raise ValueError(f"tokenize_fn returned shape {ids.shape} for {key}, "
                       f"expected ({len(batch[key])}, {tokens.MAX_LENGTH})")
    out[name] = ids
  return out


# ------------------------------------------------------------------------ pipeline

def _process_layout(global_batch_size, process_index, process_count):
  if process_index is None or process_count is None:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} is not divisible by "
                     f"process_count {process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  return process_index, process_count


def create_dataset(source: grain.sources.RandomAccessDataSource, *, global_batch_size: int,
                   crop_size: int | None = None, tokenize_fn: TokenizeFn | None = None,
                   seed: int, resize: str = "short_side", resize_size: int | None = None, flip: bool = True,
                   shuffle: bool = True, num_epochs: int | None = None, process_index: int | None = None,
                   process_count: int | None = None, keep_truth: bool = False,
                   prepare_fn: Callable[[Example, np.random.Generator], Example] | None = None) -> grain.MapDataset:
  """A grain MapDataset of this process's batches.

  The record order is one global shuffle per epoch (by `seed`); global batch i holds the
  records [i * G, (i + 1) * G) of that order, and process p takes its p-th contiguous block of
  G / process_count records, so the processes' i-th batches, concatenated in process order, are
  the single-process i-th batch for any process count.
  Augmentation draws from an rng keyed by (seed, position in the global order).

  Args:
    source: random-access source of decoded examples (`data_source`).
    global_batch_size: examples per step over all processes.
    num_epochs: None repeats forever; otherwise the last partial global batch is dropped.
    process_index, process_count: default to jax.process_index() / jax.process_count().
    prepare_fn: `fn(example, rng) -> example` replacing decode/augment/tokenize (e.g. for
      precomputed latents, see `latent_cache`).
  """
  index, count = _process_layout(global_batch_size, process_index, process_count)
  if len(source) == 0:
    raise ValueError("the data source is empty")
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  if num_epochs is not None:
    ds = ds[:len(ds) // global_batch_size * global_batch_size]
  ds = ds.random_map(prepare_fn or functools.partial(
      prepare_example, crop_size=crop_size, resize=resize, resize_size=resize_size, flip=flip,
      keep_truth=keep_truth), seed=seed)
  # Process p takes the p-th contiguous block of each global batch, so the global array
  # assembled in process order is exactly the single-process batch.
  ds = ds.batch(global_batch_size // count, drop_remainder=True)[index::count]
  if prepare_fn is not None:
    return ds
  return ds.map(functools.partial(tokenize_batch, tokenize_fn=tokenize_fn))


def create_iterator(dataset: grain.MapDataset, *, worker_count: int = 0, worker_buffer_size: int = 2,
                    num_threads: int = 4, prefetch_buffer_size: int = 8) -> grain.DatasetIterator:
  """A checkpointable iterator over `dataset` (`get_state()` / `set_state()`).

  worker_count > 0 reads in that many processes (each prefetching `worker_buffer_size`
  batches); otherwise `num_threads` threads prefetch `prefetch_buffer_size` elements.
  """
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)
  ds = dataset.to_iter_dataset(options)
  if worker_count > 0:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside app.run none are parsed
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=worker_count, per_worker_buffer_size=worker_buffer_size))
  return iter(ds)


def create_input_iterator(builder: tfds.core.DatasetBuilder, split: str, *, global_batch_size: int, crop_size: int,
                          tokenize_fn: TokenizeFn, seed: int, worker_count: int = 0,
                          prefetch_buffer_size: int = 8, **dataset_kwargs: Any) -> grain.DatasetIterator:
  """`create_iterator(create_dataset(data_source(builder, split), ...))` in one call."""
  ds = create_dataset(data_source(builder, split), global_batch_size=global_batch_size,
                      crop_size=crop_size, tokenize_fn=tokenize_fn, seed=seed, **dataset_kwargs)
  return create_iterator(ds, worker_count=worker_count, prefetch_buffer_size=prefetch_buffer_size)
