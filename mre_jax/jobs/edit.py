"""The `edit` job: one image (single mode) or every line of a requests file (batch mode).

```
python main.py --config=configs/edit.py --config.checkpoint=DIR --config.image=in.jpg \
    --config.instruction="make it winter" --config.output=out.png
python main.py --config=configs/edit.py --config.checkpoint=DIR --config.requests=edits.jsonl
```

The model, image preparation and sampler are mre_jax.infer.edit's (`load_editor`, `edit_images`).
Every input is checked before the model loads. Outputs are written to a temporary sibling file
and renamed into place, so a failed edit never leaves a partial file. In batch mode a bad line
or a failed edit becomes an error record and the rest run; the records go to the results JSONL.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from absl import logging
from PIL import Image
from tqdm import tqdm

from mre_jax import models, ops
from mre_jax.errors import ConfigError, require
from mre_jax.infer import edit as editing
from mre_jax.infer import sampling
from mre_jax.infer.sizes import SIZE_MULTIPLE, check_size_rule, output_size
from mre_jax.io import files

# ----------------------------------------------------------------------------- validation


def check_instruction(value: Any, field: str) -> str:
  """A non-empty instruction string (ConfigError naming `field` otherwise)."""
  if not isinstance(value, str) or not value.strip():
    raise ConfigError(f"{field}={value!r}: the instruction must be a non-empty string")
  return value


def check_seed(value: Any, field: str) -> int:
  """An integer seed in [0, 2^32) (ConfigError naming `field` otherwise)."""
  if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2 ** 32:
    raise ConfigError(f"{field}={value!r}: expected an integer in [0, 2^32)")
  return value


@dataclasses.dataclass(frozen=True)
class Settings:
  """Validated job settings shared by every request."""

  steps: int
  scheduler: str
  text_guidance: float
  image_guidance: float
  resolution: int
  size_rule: str
  scores: tuple[float, float, float]
  reward_text: str
  seed: int


def check_config(config: ml_collections.ConfigDict) -> Settings:
  """Validates the job's value fields (ConfigError naming the field and value)."""
  require(config, "checkpoint")
  steps, resolution = config.steps, config.resolution
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
    raise ConfigError(f"config.steps={steps!r}: expected an integer >= 1")
  if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1 or resolution % SIZE_MULTIPLE:
    raise ConfigError(f"config.resolution={resolution!r}: expected a positive multiple of {SIZE_MULTIPLE}")
  check_size_rule(config.size_rule, "config.size_rule")
  if config.scheduler not in sampling.SCHEDULERS:
    raise ConfigError(f"config.scheduler={config.scheduler!r}: expected one of {', '.join(sampling.SCHEDULERS)}")
  models.parse_dtype(config.dtype, "config.dtype")
  if isinstance(config.batch_size, bool) or not isinstance(config.batch_size, int) or config.batch_size < 1:
    raise ConfigError(f"config.batch_size={config.batch_size!r}: expected an integer >= 1")
  for field in ("text_guidance", "image_guidance"):
    if not math.isfinite(float(config[field])):
      raise ConfigError(f"config.{field}={config[field]!r}: expected a finite number")
  if not isinstance(config.reward_text, str):
    raise ConfigError(f"config.reward_text={config.reward_text!r}: expected a string")
  ops.Kernels.from_config(config, "config")
  return Settings(steps, config.scheduler, float(config.text_guidance), float(config.image_guidance), resolution,
                  config.size_rule, editing.check_scores(config.scores, "config.scores"), config.reward_text,
                  check_seed(config.seed, "config.seed"))


# ----------------------------------------------------------------------------- output files


def image_format(path: Path, field: str) -> str:
  """PIL save format for an output path, from its extension (.png, .jpg, .webp, ...)."""
  fmt = Image.registered_extensions().get(path.suffix.lower())
  if fmt is None or fmt not in Image.SAVE:
    raise ConfigError(f"{field}={path}: unknown image extension {path.suffix!r} (use .png, .jpg, .webp, ...)")
  return fmt


def check_output_path(path: Path, field: str, overwrite: bool) -> None:
  """The output's folder must exist and be writable; an existing file needs overwrite."""
  image_format(path, field)
  folder = path.parent
  if not folder.is_dir():
    raise FileNotFoundError(f"{field}={path}: folder {folder} does not exist")
  if path.exists() and not overwrite:
    raise FileExistsError(f"{field}={path}: exists (set overwrite=True to replace it)")
  check_writable(folder, f"{field}={path}: folder")


def check_writable(folder: Path, what: str) -> None:
  """Creates and removes a probe file in `folder` (os.access is blind to root and read-only mounts)."""
  try:
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
      pass
  except OSError as e:
    raise PermissionError(f"{what} {folder} is not writable ({e.strerror or e})") from None


def save_image(image: Image.Image, path: Path) -> None:
  """In the format of `path`'s extension, atomically (no partial file is ever visible at `path`)."""
  files.write_image(path, image, image_format(path, "output"))


# ----------------------------------------------------------------------------- the job


def edit(config: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None) -> list[dict]:
  """Job: edit `config.image` (single) or every line of `config.requests` (batch).

  Returns the result records (batch: also written to the results JSONL).
  """
  del workdir  # outputs go where config.output / the requests say
  settings = check_config(config)
  if config.requests and config.image:
    raise ConfigError("config.image and config.requests are exclusive: set one")
  if config.requests:
    return _edit_batch(config, settings)
  return [_edit_single(config, settings)]


def _load(config: ml_collections.ConfigDict) -> editing.Editor:
  return editing.load_editor(config.checkpoint, step=config.step, use_ema=config.use_ema, dtype=config.dtype,
                             kernels=ops.Kernels.from_config(config, "config"))


def _sampler_kwargs(settings: Settings) -> dict:
  return dict(steps=settings.steps, scheduler=settings.scheduler, text_guidance=settings.text_guidance,
              image_guidance=settings.image_guidance)


def _edit_single(config: ml_collections.ConfigDict, settings: Settings) -> dict:
  image_path = Path(require(config, "image"))
  instruction = check_instruction(config.instruction, "config.instruction")
  output = Path(require(config, "output"))
  check_output_path(output, "config.output", config.overwrite)
  image = editing.read_image(image_path, "config.image")
  editor = _load(config)
  start = time.perf_counter()
  with tqdm(total=settings.steps, desc="edit", unit="step") as bar:
    sampling.set_progress_bar(bar)
    try:
      [result] = editing.edit_images(editor, [image], [instruction], resolution=settings.resolution,
                                     size_rule=settings.size_rule, seeds=[settings.seed], scores=[settings.scores],
                                     reward_texts=[settings.reward_text], **_sampler_kwargs(settings))
    finally:
      sampling.set_progress_bar(None)
  save_image(result, output)
  seconds = time.perf_counter() - start
  print(f"wrote {output} ({result.size[0]}x{result.size[1]}, {seconds:.1f} s)")
  return dict(image=str(image_path), instruction=instruction, output=str(output), status="ok", seconds=seconds)


# ----------------------------------------------------------------------------- batch mode


@dataclasses.dataclass
class _Request:
  """One line of the requests file: its result record and, once validated, its prepared input."""

  record: dict
  image: Image.Image | None = None
  pixels: np.ndarray | None = None

  def fail(self, error: BaseException | str) -> None:
    self.record.update(status="error", error=str(error))
    self.pixels = None


def _edit_batch(config: ml_collections.ConfigDict, settings: Settings) -> list[dict]:
  requests_path = Path(config.requests)
  if not requests_path.is_file():
    raise FileNotFoundError(f"config.requests={requests_path}: no such file")
  out_dir = Path(config.output) if config.output else requests_path.parent / "edits"
  out_dir.mkdir(parents=True, exist_ok=True)
  results_path = Path(config.results) if config.results else out_dir / "results.jsonl"
  check_writable(results_path.parent, f"config.results={results_path}: folder")
  requests = _read_requests(requests_path, out_dir, config, settings)
  pending = [r for r in requests if r.pixels is not None]
  if pending:
    editor = _load(config)
    with tqdm(total=len(pending), desc="edit", unit="request") as bar:
      for group in _batches(pending, config.batch_size):
        _run_batch(editor, group, settings, config.batch_size)
        bar.update(len(group))
  records = [r.record for r in requests]
  files.write_jsonl(results_path, records)
  failed = sum(r["status"] != "ok" for r in records)
  print(f"{len(records) - failed} of {len(records)} requests edited; results in {results_path}")
  if records and failed == len(records):
    raise ValueError(f"config.requests={requests_path}: all {failed} requests failed (reasons in {results_path})")
  return records


def _read_requests(path: Path, out_dir: Path, config: ml_collections.ConfigDict,
                   settings: Settings) -> list[_Request]:
  """Parses and validates every non-blank line; a bad line becomes a failed request, not an error."""
  requests, outputs = [], {}
  for number, line in enumerate(path.read_text().splitlines(), start=1):
    if not line.strip():
      continue
    request = _Request({"line": number, "status": "ok"})
    try:
      _prepare_request(request, line, path.parent, out_dir, config, settings)
      output = request.record["output"]
      if output in outputs:
        raise ConfigError(f"output={output}: also the output of line {outputs[output]}")
      outputs[output] = number
    except (ValueError, OSError) as e:
      request.fail(e)
    requests.append(request)
  return requests


def _prepare_request(request: _Request, line: str, base: Path, out_dir: Path, config: ml_collections.ConfigDict,
                     settings: Settings) -> None:
  number = request.record["line"]
  try:
    raw = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f"not a JSON object: {e}") from None
  if not isinstance(raw, dict):
    raise ValueError(f"not a JSON object: {line[:80]!r}")
  unknown = set(raw) - {"image", "instruction", "output", "scores", "seed", "reward_text"}
  if unknown:
    raise ConfigError(f"unknown keys {sorted(unknown)} (known: image, instruction, output, scores, seed, reward_text)")
  if not isinstance(raw.get("image"), str) or not raw["image"]:
    raise ConfigError(f"image={raw.get('image')!r}: expected an image path")
  image_path = base / raw["image"]
  output = base / raw["output"] if raw.get("output") else out_dir / f"{number:04d}-{Path(raw['image']).stem}.png"
  request.record.update(image=str(image_path), instruction=raw.get("instruction"), output=str(output))
  request.record.update(
      instruction=check_instruction(raw.get("instruction"), "instruction"),
      scores=list(editing.check_scores(raw.get("scores", settings.scores), "scores")),
      seed=check_seed(raw.get("seed", settings.seed), "seed"),
      reward_text=raw.get("reward_text", settings.reward_text))
  if not isinstance(request.record["reward_text"], str):
    raise ConfigError(f"reward_text={request.record['reward_text']!r}: expected a string")
  check_output_path(output, "output", config.overwrite)
  request.image = editing.read_image(image_path, "image")
  request.pixels = editing.prepare_image(request.image, settings.resolution, settings.size_rule)


def _batches(requests: list[_Request], batch_size: int) -> list[list[_Request]]:
  """Requests grouped by working size (one program each), in chunks of at most batch_size."""
  by_shape: dict = {}
  for r in requests:
    by_shape.setdefault(r.pixels.shape, []).append(r)
  return [group[i:i + batch_size] for group in by_shape.values() for i in range(0, len(group), batch_size)]


def _run_batch(editor: editing.Editor, group: list[_Request], settings: Settings, batch_size: int) -> None:
  """Edits one chunk and saves each output.

  A short chunk is padded to batch_size by repeating its last request: one compiled program per
  image size, and each example's result depends only on its own seed.
  """
  padded = group + [group[-1]] * (batch_size - len(group))
  start = time.perf_counter()
  try:
    images, finite = editing.sample_arrays(
        editor, np.stack([r.pixels for r in padded]), [r.record["instruction"] for r in padded],
        seeds=[r.record["seed"] for r in padded], scores=[r.record["scores"] for r in padded],
        reward_texts=[r.record["reward_text"] for r in padded], **_sampler_kwargs(settings))
  except (ValueError, OSError) as e:
    logging.warning("edit batch failed: %s", e)
    for r in group:
      r.fail(e)
    return
  seconds = (time.perf_counter() - start) / len(group)
  for r, array, ok in zip(group, images, finite):
    if not ok:
      r.fail("non-finite values (NaN/inf) in the decoded image; with dtype=bfloat16 try float32")
      continue
    try:
      size = output_size(r.image.size, settings.resolution, settings.size_rule)
      save_image(editing.to_image(array, size), Path(r.record["output"]))
      r.record["seconds"] = round(seconds, 3)
    except (ValueError, OSError) as e:
      r.fail(f"cannot write output: {e}")
