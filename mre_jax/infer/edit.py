"""Instruction-based editing with reward conditions: the `Editor` (SPEC section 4).

The `edit` job (mre_jax/jobs/edit.py), the Real-Edit runner (`make_edit_fn`), the web page
(mre_jax/app/serve.py) and the study edit through it.

`load_editor` reads a project checkpoint (EMA params by default) or a diffusers-format folder
(e.g. the release's stage-2 folder). Images are prepared as the release's evaluation does (SPEC
section 4, `size_rule="release"`; sizes in mre_jax.infer.sizes): any mode -> RGB, scaled so that the
longer side is near `resolution` (512) with the shorter side rounded up to a multiple of 64,
the longer one down, and fitted (Lanczos, centre crop) to that size; a 1536x1024 photo is
edited at 576x384. The paper's rule, `size_rule="short_side"`, scales the shorter side to
`resolution` and rounds both to the nearest multiple of 64 (768x512). The result is resized to
the input's aspect ratio at the same scale.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh
from PIL import Image, ImageOps, UnidentifiedImageError

from mre_jax import models, ops
from mre_jax.data import tokens
from mre_jax.data.images import to_rgb  # the same RGB conversion as the training records
from mre_jax.errors import ConfigError, require
from mre_jax.infer import sampling
from mre_jax.infer.sizes import check_size_rule, fit_image, output_size, working_size  # noqa: F401 (edit.working_size)
from mre_jax.io import checkpointing, export, pretrained
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


def check_channels(unet_config: models.UNetConfig, latent_channels: int, where: str) -> None:
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


def sample_arrays(editor: Editor, pixels: np.ndarray, instructions: Sequence[str], *, seeds: Sequence[int],
                  scores: Sequence[Sequence[float]] | None = None, reward_texts: Sequence[str] | None = None,
                  steps: int = 30, scheduler: str = "euler_ancestral", text_guidance: float = sampling.TEXT_GUIDANCE,
                  image_guidance: float = sampling.IMAGE_GUIDANCE,
                  init_noise: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
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


def make_conditioning(editor: Editor, pixels: np.ndarray, instructions: Sequence[str], *, seeds: Sequence[int],
                      scores: Sequence[Sequence[float]] | None = None,
                      reward_texts: Sequence[str] | None = None) -> sampling.Conditioning:
  """The sampler's per-example inputs (see `edit_arrays` for the arguments)."""
  batch = len(instructions)
  scores = np.asarray(scores if scores is not None else [DEFAULT_SCORES] * batch, np.float32).reshape(batch, 3)
  reward_texts = list(reward_texts) if reward_texts is not None else [DEFAULT_REWARD_TEXT] * batch
  context, _ = encode_texts(editor, list(instructions))
  null_context, _ = encode_texts(editor, [""] * batch)
  _, reward_embeds = encode_texts(editor, reward_texts)
  return sampling.Conditioning(np.asarray(pixels, np.float32), context, null_context, scores, reward_embeds,
                               sampling.seed_keys(seeds))


def sampler(editor: Editor, steps: int, scheduler: str) -> Callable:
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


# ----------------------------------------------------------------------------- reward conditions


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


# ----------------------------------------------------------------------------- the Real-Edit runner


def make_edit_fn(config: ml_collections.ConfigDict) -> Callable[[Sequence[Image.Image], Sequence[str]], list]:
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
                       size_rule=size_rule, seeds=[opts.seed] * n, scores=[scores] * n,
                       reward_texts=[opts.reward_text] * n, steps=opts.steps, scheduler=opts.scheduler,
                       text_guidance=opts.text_guidance, image_guidance=opts.image_guidance)
  return edit_fn
