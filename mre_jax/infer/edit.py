"""Instruction-based editing with reward conditions: the `Editor` and the `edit` job (SPEC section 4).

```
python main.py --config=configs/edit.py --config.checkpoint=DIR --config.image=in.jpg \
    --config.instruction="make it winter" --config.output=out.png
python main.py --config=configs/edit.py --config.checkpoint=DIR --config.requests=edits.jsonl
```

`load_editor` reads a project checkpoint (EMA params by default) or a diffusers-format folder
(e.g. the release's stage-2 folder). Images are prepared as the release's evaluation does (SPEC
section 4, `size_rule="release"`; sizes in mre_jax.infer.sizes): any mode -> RGB, scaled so that the
longer side is near `resolution` (512) with the shorter side rounded up to a multiple of 64,
the longer one down, and fitted (Lanczos, centre crop) to that size; a 1536x1024 photo is
edited at 576x384. The paper's rule, `size_rule="short_side"`, scales the shorter side to
`resolution` and rounds both to the nearest multiple of 64 (768x512). The result is resized to
the input's aspect ratio at the same scale. Outputs are written to a temporary sibling file and
renamed into place, so a failed edit never leaves a partial file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from mre_jax import models, ops
from mre_jax.data import tokens
from mre_jax.data.images import to_rgb  # the same RGB conversion as the training records
from mre_jax.errors import ConfigError, require
from mre_jax.infer import sampling
from mre_jax.infer.sizes import SIZE_MULTIPLE, check_size_rule, fit_image, output_size, working_size  # noqa: F401 (edit.working_size)
from mre_jax.io import checkpointing, export, files, pretrained
from mre_jax.train import sharding

DEFAULT_SCORES = (5.0, 5.0, 5.0)  # following, preserving, quality: the best (SPEC section 4)
DEFAULT_REWARD_TEXT = "None; None; None"
MAX_SCORE = 5.0


# ----------------------------------------------------------------------------- the editor


@dataclasses.dataclass
class Editor:
  """Everything an edit needs, loaded once: U-Net, VAE, text encoder, tokenizer, scheduler config.

  Edits run data parallel over `mesh` (default: every local device): the U-Net and VAE params are
  replicated on it (`load_editor`) and each sampler call splits its batch over it.
  """

  unet: models.RewardUNet
  unet_params: Any
  vae: Any
  vae_params: Any
  scaling_factor: float
  text_encoder: Any
  text_params: Any
  tokenizer: Any
  scheduler_config: dict
  source: str
  mesh: Mesh = dataclasses.field(default_factory=sharding.local_mesh)
  _text_cache: dict = dataclasses.field(default_factory=dict, repr=False)


def load_editor(path: str | os.PathLike, *, step: int | None = None, use_ema: bool = True,
                dtype: str = "float32", kernels: ops.Kernels = ops.Kernels()) -> Editor:
  """An `Editor` from a project checkpoint or a diffusers-format folder.

  Args:
    path: a project checkpoint (`mre_model.json`, `frozen/`, `state/`) or a diffusers-format
      InstructPix2Pix folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`).
    step: checkpoint step (None or < 0: latest); ignored for diffusers folders.
    use_ema: use the checkpoint's EMA params (default) rather than the raw ones.
    dtype: U-Net compute dtype, "float32" or "bfloat16" (params stay float32; the VAE and text
      encoder always run in float32).
    kernels: the kernel families of the U-Net, VAE and text encoder (config: attention, conv, norm).
  """
  path = Path(path)
  compute_dtype = models.parse_dtype(dtype, "dtype")
  if checkpointing.is_checkpoint(path):
    spec = checkpointing.read_spec(path)
    step, params = checkpointing.restore_params(path, step=step, use_ema=use_ema)
    frozen, source = checkpointing.frozen_dir(path), f"{path} step {step} ({'EMA' if use_ema else 'raw'} params)"
  elif (path / "unet").is_dir():
    spec, params = export.unet_from_diffusers(path)
    frozen, source = path, str(path)
  else:
    raise FileNotFoundError(f"{path}: neither a project checkpoint ({checkpointing.MODEL_FILE}) nor a "
                            "diffusers-format folder (unet/, vae/, text_encoder/, tokenizer/)")
  vae, vae_params = pretrained.load_vae(frozen, kernels=kernels)
  vae_config = pretrained.read_config(Path(frozen) / "vae")
  check_channels(spec.unet, int(vae_config.get("latent_channels", 4)), str(path))
  text_encoder, text_params = pretrained.load_text_encoder(frozen, kernels=kernels)
  scheduler_config = export.read_scheduler_config(frozen)
  unet = models.RewardUNet(spec.unet, reward=spec.reward, dtype=compute_dtype, kernels=kernels)
  mesh = sharding.local_mesh()
  replicated = sharding.replicated(mesh)
  return Editor(unet, jax.device_put(params, replicated), vae, jax.device_put(vae_params, replicated),
                float(vae_config.get("scaling_factor", 0.18215)),
                text_encoder, jax.device_put(text_params), pretrained.load_tokenizer(frozen), scheduler_config,
                source, mesh)


def check_channels(unet_config, latent_channels: int, where: str) -> None:
  """An editing U-Net reads noisy latents and image latents (2 C channels) and predicts C."""
  if (unet_config.in_channels, unet_config.out_channels) != (2 * latent_channels, latent_channels):
    raise ValueError(f"{where}: the U-Net maps {unet_config.in_channels} -> {unet_config.out_channels} channels; "
                     f"editing with a VAE of {latent_channels} latent channels needs {2 * latent_channels} -> "
                     f"{latent_channels} (noisy latents + image latents -> noise)")


_ENCODE_FNS: dict = {}


def encode_texts(editor: Editor, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """Texts -> (CLIP last hidden states float32 [N, 77, D], pooled outputs float32 [N, D]).

  Each distinct text is encoded once per editor (one [1, 77] program, whatever N is).
  """
  key = repr(editor.text_encoder)
  if key not in _ENCODE_FNS:
    module = editor.text_encoder
    _ENCODE_FNS[key] = jax.jit(lambda params, ids: pretrained.encode_text(module, params, ids))
  for text in dict.fromkeys(texts):
    if text not in editor._text_cache:
      ids = tokens.tokenize(editor.tokenizer, [text])
      hidden, pooled = _ENCODE_FNS[key](editor.text_params, ids)
      editor._text_cache[text] = (np.asarray(hidden[0]), np.asarray(pooled[0]))
  return (np.stack([editor._text_cache[t][0] for t in texts]), np.stack([editor._text_cache[t][1] for t in texts]))


def edit_arrays(editor: Editor, pixels: np.ndarray, instructions: Sequence[str], *, seeds: Sequence[int],
                scores: Sequence[Sequence[float]] | None = None, reward_texts: Sequence[str] | None = None,
                steps: int = 30, scheduler: str = "euler_ancestral",
                text_guidance: float = sampling.TEXT_GUIDANCE, image_guidance: float = sampling.IMAGE_GUIDANCE,
                init_noise: np.ndarray | None = None) -> np.ndarray:
  """Edits a batch of prepared images.

  Args:
    pixels: float32 [B, H, W, 3] in [-1, 1], H and W multiples of 8.
    instructions: B edit instructions.
    seeds: B ints; example b's noise comes from seeds[b] alone.
    scores: B triples in [0, 5] (default 5, 5, 5 each).
    reward_texts: B reward texts (default "None; None; None").
    init_noise: optional float32 [B, h, w, C] unit Gaussian initial latents (overrides seeds
      for the start; Euler ancestral still draws its step noise from the seeds).
  Returns:
    float32 [B, H, W, 3] in [0, 1]. Raises `sampling.NonFiniteError` on NaN/inf output.
  """
  images, finite = sample_arrays(editor, pixels, instructions, seeds=seeds, scores=scores, reward_texts=reward_texts,
                                 steps=steps, scheduler=scheduler, text_guidance=text_guidance,
                                 image_guidance=image_guidance, init_noise=init_noise)
  sampling.check_finite(finite)
  return images


def sample_arrays(editor: Editor, pixels, instructions, *, seeds, scores=None, reward_texts=None, steps=30,
                  scheduler="euler_ancestral", text_guidance=sampling.TEXT_GUIDANCE,
                  image_guidance=sampling.IMAGE_GUIDANCE, init_noise=None) -> tuple[np.ndarray, np.ndarray]:
  """`edit_arrays` without the check: (images float32 [B, H, W, 3] in [0, 1], finite bool [B]).

  The batch is padded to a multiple of the editor's device count and split over its mesh; each
  example's result depends on its own seed only, so not on the device count.
  """
  cond = make_conditioning(editor, pixels, instructions, seeds=seeds, scores=scores, reward_texts=reward_texts)
  if init_noise is not None:
    cond = cond._replace(init_noise=np.asarray(init_noise, np.float32))
  cond, batch = sharding.pad_batch(cond, editor.mesh.size)
  guidance = np.asarray([text_guidance, image_guidance], np.float32)
  images, finite = sampler(editor, steps, scheduler)(editor.unet_params, editor.vae_params, cond, guidance)
  return np.asarray(images)[:batch], np.asarray(finite)[:batch]


def make_conditioning(editor: Editor, pixels, instructions, *, seeds, scores=None,
                      reward_texts=None) -> sampling.Conditioning:
  """The sampler's per-example inputs (see `edit_arrays` for the arguments)."""
  batch = len(instructions)
  scores = np.asarray(scores if scores is not None else [DEFAULT_SCORES] * batch, np.float32).reshape(batch, 3)
  reward_texts = list(reward_texts) if reward_texts is not None else [DEFAULT_REWARD_TEXT] * batch
  context, _ = encode_texts(editor, list(instructions))
  null_context, _ = encode_texts(editor, [""] * batch)
  _, reward_embeds = encode_texts(editor, reward_texts)
  return sampling.Conditioning(np.asarray(pixels, np.float32), context, null_context, scores, reward_embeds,
                               sampling.seed_keys(seeds))


def sampler(editor: Editor, steps: int, scheduler: str):
  """The editor's jitted sampler (`sampling.make_sample_fn` over `editor.mesh`), shared by every call in this
  process; its batch must be a multiple of `editor.mesh.size` (`sample_arrays` pads it)."""
  spec = sampling.spec_from_scheduler_config(editor.scheduler_config, scheduler, steps)
  return sampling.cached_sample_fn(editor.unet, editor.vae, editor.scaling_factor, spec, mesh=editor.mesh)


# ----------------------------------------------------------------------------- images


def prepare_image(image: Image.Image, resolution: int, size_rule: str = "release") -> np.ndarray:
  """Any PIL image -> float32 [H, W, 3] in [-1, 1] at `working_size` (RGB, `sizes.fit_image`)."""
  return np.asarray(fit_image(to_rgb(image), resolution, size_rule), np.float32) / 127.5 - 1.0





def to_image(array: np.ndarray, size: tuple[int, int]) -> Image.Image:
  """float [H, W, 3] in [0, 1] -> PIL RGB resized (Lanczos) to size=(width, height)."""
  image = Image.fromarray((np.asarray(array) * 255.0).round().astype(np.uint8))
  return image if image.size == tuple(size) else image.resize(tuple(size), Image.Resampling.LANCZOS)


def edit_images(editor: Editor, images: Sequence[Image.Image], instructions: Sequence[str], *,
                resolution: int = 512, size_rule: str = "release", **kwargs) -> list[Image.Image]:
  """Edits PIL images whose working sizes agree; returns PIL RGB images at `output_size`.

  kwargs: those of `edit_arrays` (seeds required).
  """
  pixels = [prepare_image(image, resolution, size_rule) for image in images]
  if len({p.shape for p in pixels}) > 1:
    raise ValueError(f"edit_images: one batch needs one working size, got {sorted({p.shape for p in pixels})}")
  out = edit_arrays(editor, np.stack(pixels), instructions, **kwargs)
  return [to_image(o, output_size(image.size, resolution, size_rule)) for o, image in zip(out, images)]


def read_image(path: str | os.PathLike, field: str) -> Image.Image:
  """Opens and fully decodes an image file (EXIF orientation applied); errors name `field` and the path."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{field}={path}: no such file")
  try:
    with Image.open(path) as image:
      image.load()
      image = ImageOps.exif_transpose(image)  # camera photos: upright, as viewers show them
      return image.convert("RGBA") if image.mode == "P" else image.copy()
  except UnidentifiedImageError as e:
    raise ValueError(f"{field}={path}: not an image (PIL cannot identify it)") from e
  except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
    raise ValueError(f"{field}={path}: unreadable image: {e}") from e


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


# ----------------------------------------------------------------------------- validation


def check_scores(value: Any, field: str) -> tuple[float, float, float]:
  """Three finite numbers in [0, 5] (following, preserving, quality)."""
  try:
    scores = tuple(float(v) for v in value)
  except (TypeError, ValueError):
    raise ConfigError(f"{field}={value!r}: expected three numbers in [0, 5]") from None
  if len(scores) != 3:
    raise ConfigError(f"{field}={value!r}: expected three numbers (following, preserving, quality), "
                      f"got {len(scores)}")
  if not all(math.isfinite(s) and 0.0 <= s <= MAX_SCORE for s in scores):
    raise ConfigError(f"{field}={value!r}: every score must be in [0, 5]")
  return scores


def check_instruction(value: Any, field: str) -> str:
  if not isinstance(value, str) or not value.strip():
    raise ConfigError(f"{field}={value!r}: the instruction must be a non-empty string")
  return value


def check_seed(value: Any, field: str) -> int:
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


def check_config(config) -> Settings:
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
                  config.size_rule, check_scores(config.scores, "config.scores"), config.reward_text,
                  check_seed(config.seed, "config.seed"))


# ----------------------------------------------------------------------------- the job


def edit(config, workdir: str | None = None) -> list[dict]:
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


def _load(config) -> Editor:
  return load_editor(config.checkpoint, step=config.step, use_ema=config.use_ema, dtype=config.dtype,
                     kernels=ops.Kernels.from_config(config, "config"))


def _sampler_kwargs(settings: Settings) -> dict:
  return dict(steps=settings.steps, scheduler=settings.scheduler, text_guidance=settings.text_guidance,
              image_guidance=settings.image_guidance)


def _edit_single(config, settings: Settings) -> dict:
  image_path = Path(require(config, "image"))
  instruction = check_instruction(config.instruction, "config.instruction")
  output = Path(require(config, "output"))
  check_output_path(output, "config.output", config.overwrite)
  image = read_image(image_path, "config.image")
  editor = _load(config)
  start = time.perf_counter()
  with tqdm(total=settings.steps, desc="edit", unit="step") as bar:
    sampling.set_progress_bar(bar)
    try:
      [result] = edit_images(editor, [image], [instruction], resolution=settings.resolution,
                             size_rule=settings.size_rule, seeds=[settings.seed],
                             scores=[settings.scores], reward_texts=[settings.reward_text], **_sampler_kwargs(settings))
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


def _edit_batch(config, settings: Settings) -> list[dict]:
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


def _read_requests(path: Path, out_dir: Path, config, settings: Settings) -> list[_Request]:
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


def _prepare_request(request: _Request, line: str, base: Path, out_dir: Path, config, settings: Settings) -> None:
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
      scores=list(check_scores(raw.get("scores", settings.scores), "scores")),
      seed=check_seed(raw.get("seed", settings.seed), "seed"),
      reward_text=raw.get("reward_text", settings.reward_text))
  if not isinstance(request.record["reward_text"], str):
    raise ConfigError(f"reward_text={request.record['reward_text']!r}: expected a string")
  check_output_path(output, "output", config.overwrite)
  request.image = read_image(image_path, "image")
  request.pixels = prepare_image(request.image, settings.resolution, settings.size_rule)


def _batches(requests: list[_Request], batch_size: int) -> list[list[_Request]]:
  """Requests grouped by working size (one program each), in chunks of at most batch_size."""
  by_shape: dict = {}
  for r in requests:
    by_shape.setdefault(r.pixels.shape, []).append(r)
  return [group[i:i + batch_size] for group in by_shape.values() for i in range(0, len(group), batch_size)]


def _run_batch(editor: Editor, group: list[_Request], settings: Settings, batch_size: int) -> None:
  """Edits one chunk and saves each output.

  A short chunk is padded to batch_size by repeating its last request: one compiled program per
  image size, and each example's result depends only on its own seed.
  """
  padded = group + [group[-1]] * (batch_size - len(group))
  start = time.perf_counter()
  try:
    images, finite = sample_arrays(
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
      save_image(to_image(array, size), Path(r.record["output"]))
      r.record["seconds"] = round(seconds, 3)
    except (ValueError, OSError) as e:
      r.fail(f"cannot write output: {e}")


def make_edit_fn(config) -> Callable[[Sequence[Image.Image], Sequence[str]], list[Image.Image]]:
  """The Real-Edit runner's edit function (`configs/evaluate.py`: `checkpoint`, `edit.*`).

  Returns edit_fn(images, instructions) -> edited PIL images, every pair edited with the
  configured sampler, seed and reward condition.
  """
  opts = config.edit
  size_rule = check_size_rule(opts.size_rule, "config.edit.size_rule")
  editor = load_editor(require(config, "checkpoint"), step=opts.step, use_ema=opts.use_ema, dtype=opts.dtype,
                       kernels=ops.Kernels.from_config(opts, "config.edit"))
  scores = check_scores(opts.scores, "config.edit.scores")

  def edit_fn(images, instructions):
    n = len(instructions)
    return edit_images(editor, [to_rgb(im) for im in images], list(instructions), resolution=opts.resolution,
                       size_rule=size_rule, seeds=[opts.seed] * n, scores=[scores] * n, reward_texts=[opts.reward_text] * n,
                       steps=opts.steps, scheduler=opts.scheduler, text_guidance=opts.text_guidance,
                       image_guidance=opts.image_guidance)
  return edit_fn
