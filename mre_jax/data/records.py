"""Reading source records for the TFDS builders in data/: safe paths, images, rewards, skips.

Pure Python + PIL + numpy (no TensorFlow): the builders stay thin and these checks are
testable on their own. A record that cannot be used raises `BadRecord(reason, detail)`;
`checked_examples` turns those into counted, logged skips and fails the build when too many
records are bad. Nothing here ever writes a placeholder image.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from PIL import Image, ImageFile

from mre_jax.data.images import to_rgb_array as _to_rgb  # the same conversion as editing

# Real-Edit's edit categories (the paper's evaluation); the synthetic world edits in the same seven.
CATEGORIES = ("Local", "Remove", "Add", "Texture", "Background", "Global", "Style")

ImageFile.LOAD_TRUNCATED_IMAGES = False  # A truncated file is a bad record, never half an image.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
REASONS = ("missing_file", "bad_image", "unsafe_path", "bad_json", "empty_instruction",
           "bad_score", "wrong_reward_count", "bad_reward_text", "ambiguous_pair",
           "bad_instruction_format", "bad_category", "bad_entry")


class BadRecord(Exception):
  """A source record to skip: `reason` (one of REASONS) and a human-readable `detail`."""

  def __init__(self, reason, detail):
    assert reason in REASONS, reason
    super().__init__(f"{reason}: {detail}")
    self.reason, self.detail = reason, detail


# --------------------------------------------------------------------------- sources

def require_path(path: str | os.PathLike, builder: str, what: str, is_dir: bool = False) -> str:
  """Raises FileNotFoundError naming `path` and what it should hold, unless it exists."""
  ok = Path(path).is_dir() if is_dir else Path(path).is_file()
  if not ok:
    kind = "folder" if is_dir else "file"
    raise FileNotFoundError(f"{builder}: expected the {kind} {path}: {what} "
                            f"(see data/{builder}/README.md)")
  return str(path)


def safe_join(root: str | os.PathLike, relative: str | os.PathLike, field: str = "path") -> str:
  """root/relative, refusing absolute paths and any `..` that would leave `root`."""
  rel = str(relative)
  if not rel or Path(rel).is_absolute() or rel.startswith(("~", "\\")) or ".." in rel.replace("\\", "/").split("/"):
    raise BadRecord("unsafe_path", f"{field} {rel!r} must be a relative path inside {root}")
  path = Path(root, rel).resolve()
  if not path.is_relative_to(Path(root).resolve()):
    raise BadRecord("unsafe_path", f"{field} {rel!r} resolves outside {root}")
  return str(path)


def read_json(path: str | os.PathLike, what: str = "JSON") -> Any:
  """Parsed JSON; a missing file or bad JSON is a BadRecord naming the file."""
  if not Path(path).is_file():
    raise BadRecord("missing_file", f"{what} {path} does not exist")
  try:
    return json.loads(Path(path).read_text(encoding="utf-8"))
  except (ValueError, UnicodeDecodeError) as e:
    raise BadRecord("bad_json", f"{path}: {e}") from None


def load_source_json(path: str | os.PathLike, builder: str, what: str) -> Any:
  """Like read_json for a whole source file: errors are fatal (FileNotFoundError/ValueError)."""
  require_path(path, builder, what)
  try:
    return json.loads(Path(path).read_text(encoding="utf-8"))
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{builder}: {path} is not valid JSON ({what}): {e}") from None


# ---------------------------------------------------------------------------- images

def _decode(source, what):
  """(file bytes, loaded PIL image, name) of a path or bytes; BadRecord if unreadable."""
  if isinstance(source, (str, os.PathLike)):
    if not Path(source).is_file():
      raise BadRecord("missing_file", f"{what} {source} does not exist")
    name, data = str(source), Path(source).read_bytes()
  else:
    name, data = what, bytes(source or b"")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      img = Image.open(io.BytesIO(data))
      img.load()
  except Exception as e:  # PIL raises many types for broken files.
    raise BadRecord("bad_image", f"{name} cannot be decoded: {type(e).__name__}: {e}") from None
  if min(img.size) < 1:
    raise BadRecord("bad_image", f"{name} has size {img.size}")
  return data, img, name


def load_rgb(source: str | os.PathLike | bytes, min_side: int = 0, what: str = "image") -> np.ndarray:
  """Decodes an image (path or bytes) to uint8 [H, W, 3] RGB.

  Grayscale, RGBA, palette, CMYK and 16-bit images are converted to RGB. If the short side
  is under `min_side` pixels the image is upscaled (bicubic) so that it is `min_side`.
  Raises BadRecord ("missing_file", "bad_image") otherwise.
  """
  _, img, name = _decode(source, what)
  try:
    rgb = _to_rgb(img)
  except Exception as e:
    raise BadRecord("bad_image", f"{name} cannot be converted to RGB: {e}") from None
  return upscale_to(rgb, min_side)


def load_for_storage(source: str | os.PathLike | bytes, min_side: int = 0,
                     what: str = "image") -> bytes | np.ndarray:
  """What a builder should store for an image: the file's own bytes when it is an RGB JPEG
  that needs no upscaling (no second compression), else `load_rgb`'s uint8 [H, W, 3]."""
  data, img, _ = _decode(source, what)
  if img.format == "JPEG" and img.mode == "RGB" and min(img.size) >= min_side:
    return data
  return load_rgb(data, min_side, what)


def upscale_to(img: np.ndarray, min_side: int) -> np.ndarray:
  """uint8 [H, W, 3] -> short side at least `min_side` (bicubic, aspect kept)."""
  h, w = img.shape[:2]
  if min(h, w) >= min_side:
    return img
  scale = min_side / min(h, w)
  size = (max(min_side, round(w * scale)), max(min_side, round(h * scale)))
  return np.asarray(Image.fromarray(img).resize(size, Image.BICUBIC))


def find_image(folder: str | os.PathLike, stem: str) -> str | None:
  """folder/stem.<jpg|jpeg|png|webp>, the first that exists in that fixed order, or None."""
  for ext in IMAGE_EXTENSIONS:
    path = Path(folder, stem + ext)
    if path.is_file():
      return str(path)
  return None


# --------------------------------------------------------------------- text & rewards

def parse_instructions(value: Any, where: str) -> list[str]:
  """`edit` of prompt.json (a string or list of strings) -> non-empty list of str."""
  items = value if isinstance(value, list) else [value]
  texts = [t.strip() for t in items if isinstance(t, str) and t.strip()]
  if not texts:
    raise BadRecord("empty_instruction", f"{where}: no non-empty instruction in {value!r}")
  return texts


def parse_rewards(entries: Any, where: str) -> tuple[np.ndarray, list[str]]:
  """RewardEdit entries [{"Score", "Negative Prompt"} x 3] -> (float32 [3], [str] * 3).

  Order: instruction following, detail preserving, generation quality.
  """
  if not isinstance(entries, list) or len(entries) != 3:
    count = len(entries) if isinstance(entries, list) else type(entries).__name__
    raise BadRecord("wrong_reward_count", f"{where}: expected 3 reward entries, got {count}")
  scores, texts = [], []
  for i, entry in enumerate(entries):
    if not isinstance(entry, dict):
      raise BadRecord("bad_entry", f"{where}[{i}]: expected an object, got {entry!r}")
    score = entry.get("Score")
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score) \
        or not 0 <= score <= 5:
      raise BadRecord("bad_score", f"{where}[{i}].Score = {score!r}: need a number in [0, 5]")
    text = entry.get("Negative Prompt")
    if not isinstance(text, str) or not text.strip():
      raise BadRecord("bad_reward_text", f"{where}[{i}]['Negative Prompt'] = {text!r}: need a "
                      "non-empty string (\"None\" when there is no failure)")
    scores.append(float(score))
    texts.append(text.strip())
  return np.array(scores, np.float32), texts


# ----------------------------------------------------------------------- skipping

class SkipLog:
  """Counts kept and skipped records per reason; keeps a few examples of each."""

  def __init__(self, builder, split):
    self.builder, self.split = builder, split
    self.kept = 0
    self.counts = collections.Counter()
    self.examples = collections.defaultdict(list)

  def skip(self, key, error):
    self.counts[error.reason] += 1
    if len(self.examples[error.reason]) < 5:
      self.examples[error.reason].append(f"{key}: {error.detail}")
    logging.warning("%s/%s: skipping %s: %s", self.builder, self.split, key, error)

  @property
  def total(self):
    return self.kept + sum(self.counts.values())

  def summary(self):
    """JSON-able: total, kept, skipped (reason -> count), examples (reason -> details)."""
    return {"total": self.total, "kept": self.kept, "skipped": dict(sorted(self.counts.items())),
            "examples": {k: list(v) for k, v in sorted(self.examples.items())}}

  def check(self, max_bad_fraction):
    """Raises ValueError with the summary when no record is usable or too many are bad."""
    bad = sum(self.counts.values())
    if self.kept == 0 or bad > max_bad_fraction * self.total:
      summary = self.summary()
      raise ValueError(
          f"{self.builder}/{self.split}: {bad} of {self.total} records are bad (allowed share "
          f"{max_bad_fraction}); skipped by reason: {json.dumps(summary['skipped'])}; "
          f"examples: {json.dumps(summary['examples'], indent=1)}")


def checked_examples(records: Iterable[tuple[str, Any]], make_fn: Callable[[Any], dict], *, builder: str, split: str,
                     max_bad_fraction: float, metadata: dict | None = None) -> Iterator[tuple[str, dict]]:
  """Yields (key, example) for each good record; skips BadRecords with their reason.

  Args:
    records: iterable of (key, record).
    make_fn: record -> example dict; raises BadRecord to skip. A record that is itself a
      BadRecord (the listing found it broken) is skipped without calling make_fn.
    metadata: a dict (the builder's `info.metadata`) that receives the skip summary under
      "skipped/<split>", so it is saved with the dataset.
  Raises ValueError at the end when more than `max_bad_fraction` of the records are bad.
  """
  log = SkipLog(builder, split)
  for key, record in records:
    try:
      if isinstance(record, BadRecord):
        raise record
      example = make_fn(record)
    except BadRecord as e:
      log.skip(key, e)
      continue
    log.kept += 1
    yield key, example
  summary = log.summary()
  logging.info("%s/%s: kept %d of %d records; skipped by reason: %s", builder, split,
               log.kept, log.total, summary["skipped"])
  if metadata is not None:
    metadata[f"skipped/{split}"] = summary
  log.check(max_bad_fraction)
