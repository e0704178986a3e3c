"""The one atomic file writer: a reader of `path` sees the old file or the whole new one, never a part.

The data goes to a temporary sibling (same folder, so the rename never crosses file systems),
is flushed and fsynced, and is renamed over `path` with os.replace. A failure anywhere (the
serialiser raising, a full disk, a failed rename) leaves `path` as it was and no temporary file.
Folders are published the same way by checkpointing.staging_dir / publish.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable

import numpy as np
from PIL import Image

_COUNTER = itertools.count()  # with the pid and thread: no two writers ever share a temporary name


def temp_sibling(path: Path) -> Path:
  """A hidden, unique name next to `path` (`.<name>.tmp-<pid>-<thread>-<n>`)."""
  return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}-{next(_COUNTER)}")


def write_atomic(path: str | os.PathLike, data: bytes | str | Callable[[BinaryIO], Any]) -> Path:
  """Writes `data` to `path` atomically; makes the parent folder if needed; returns `path`.

  data: bytes, text (written as UTF-8), or a function that writes into the open binary file
  (e.g. `lambda f: np.save(f, array)`), so large outputs are never held twice in memory.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = temp_sibling(path)
  try:
    with open(tmp, "xb") as f:  # the process umask applies, as for any other file we write
      if callable(data):
        data(f)
      else:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)
  return path


def write_json(path: str | os.PathLike, value: Any, **dumps_kwargs: Any) -> Path:
  """`value` as JSON (json.dumps keyword arguments pass through), ending in a newline."""
  return write_atomic(path, json.dumps(value, **dumps_kwargs) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any], **dumps_kwargs: Any) -> Path:
  """One JSON value per line."""
  return write_atomic(path, "".join(json.dumps(r, **dumps_kwargs) + "\n" for r in rows))


def write_image(path: str | os.PathLike, image: Image.Image | np.ndarray, format: str = "PNG") -> Path:
  """A PIL image or a uint8 [H, W, 3] array, encoded by PIL as `format` (PNG, JPEG, WEBP, ...)."""
  pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
  return write_atomic(path, lambda f: pil.save(f, format=format))
