"""The editing sampler: three-way guided denoising and VAE decode under one `jax.jit` (SPEC section 4).

One compiled program per (U-Net, VAE, scheduler, steps, batch, image size, progress) does all
of an edit on device:

1. `cond = vae.encode(image).mode()` (the posterior mean, unscaled);
2. initial latents: unit Gaussian times the scheduler's initial sigma;
3. a `jax.lax.fori_loop` over the steps, each with ONE U-Net call on a batch of 3B, branch-major
   like diffusers' InstructPix2Pix pipeline:
     [instruction + image (B), "" + image (B), "" + zero image (B)],
   `eps = eps_uncond + g_text * (eps_text - eps_image) + g_image * (eps_image - eps_uncond)`;
   the scheduler's input scaling applies to the noisy latents only, the same reward condition
   (scores, reward-text pooled embedding) goes to all three branches;
4. decode `latents / scaling_factor` (an image-conditioned decoder also sees the input image), map
   [-1, 1] -> [0, 1], flag non-finite pixels.

Guidance scales, scores, embeddings and seeds are traced values: changing them never
recompiles. `make_sample_fn` returns the jitted function; callers keep it (the `Editor` caches
one per `SamplerSpec`) and jit's own cache then holds one program per input shape.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mre_jax import models
from mre_jax.infer import diffusion
from mre_jax.io import pretrained
from mre_jax.train import sharding

SCHEDULERS = ("euler_ancestral", "euler", "ddim")
TEXT_GUIDANCE = 7.5
IMAGE_GUIDANCE = 1.5

# How often each sampler body was traced, keyed by (scheduler, steps, image shape): a trace is a
# compile, so tests assert that repeated edits of one size leave this unchanged.
TRACES: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  """Static sampler settings (hashable: one compiled program each).

  scheduler: "euler_ancestral" (release default), "euler" or "ddim" (eta 0).
  num_steps: sampling steps N >= 1.
  The rest is the model folder's `scheduler_config.json` (SD 1.5 values by default).
  """

  scheduler: str = "euler_ancestral"
  num_steps: int = 30
  num_train_timesteps: int = 1000
  beta_start: float = 0.00085
  beta_end: float = 0.012
  beta_schedule: str = "scaled_linear"
  spacing: str = "leading"
  steps_offset: int = 1
  set_alpha_to_one: bool = False  # DDIM's final alpha_bar (SD 1.5: False)
  prediction_type: str = "epsilon"  # what the U-Net predicts: epsilon (SD 1.5) or v_prediction
  rescale_betas_zero_snr: bool = False  # zero terminal SNR (diffusion.make_schedule)

  def make_schedule(self) -> diffusion.Schedule:
    """The training-time noise schedule these settings describe."""
    return diffusion.make_schedule(self.num_train_timesteps, self.beta_start, self.beta_end, self.beta_schedule,
                                   self.rescale_betas_zero_snr)

  def __post_init__(self):
    if self.scheduler not in SCHEDULERS:
      raise ValueError(f"scheduler {self.scheduler!r}: expected one of {', '.join(SCHEDULERS)}")
    if not isinstance(self.num_steps, int) or self.num_steps < 1:
      raise ValueError(f"num_steps {self.num_steps!r}: expected an integer >= 1")
    if self.prediction_type not in diffusion.PREDICTION_TYPES:
      raise ValueError(f"scheduler config: prediction_type {self.prediction_type!r} is not supported (expected "
                       f"one of {', '.join(diffusion.PREDICTION_TYPES)})")
    if self.rescale_betas_zero_snr and self.scheduler == "ddim":
      # Our DDIM step works from eps, and x0 = (x - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) has
      # no value where alpha_bar = 0.
      raise ValueError("scheduler ddim: not supported with rescale_betas_zero_snr (alpha_bar reaches 0); "
                       "use euler_ancestral or euler")


def spec_from_scheduler_config(config: dict, scheduler: str, num_steps: int) -> SamplerSpec:
  """A `SamplerSpec` from a diffusers `scheduler_config.json` dict (missing keys: SD 1.5)."""
  if config.get("trained_betas") is not None:
    raise ValueError("scheduler config: trained_betas is not supported")
  default = SamplerSpec()
  return SamplerSpec(
      scheduler=scheduler, num_steps=int(num_steps),
      num_train_timesteps=int(config.get("num_train_timesteps", default.num_train_timesteps)),
      beta_start=float(config.get("beta_start", default.beta_start)),
      beta_end=float(config.get("beta_end", default.beta_end)),
      beta_schedule=str(config.get("beta_schedule", default.beta_schedule)),
      spacing=str(config.get("timestep_spacing", default.spacing)),
      steps_offset=int(config.get("steps_offset", default.steps_offset)),
      set_alpha_to_one=bool(config.get("set_alpha_to_one", default.set_alpha_to_one)),
      prediction_type=str(config.get("prediction_type", default.prediction_type)),
      rescale_betas_zero_snr=bool(config.get("rescale_betas_zero_snr", default.rescale_betas_zero_snr)))


class Conditioning(NamedTuple):
  """Per-example inputs of one sampler call (B examples).

  images: float32 [B, H, W, 3] in [-1, 1]; H, W multiples of 8 (of 64 for SD 1.5 edits).
  context: float32 [B, 77, D] CLIP last hidden states of the instructions.
  null_context: float32 [B, 77, D] the same for "" (the unconditional text branch).
  scores: float32 [B, 3] reward scores in [0, 5] (following, preserving, quality).
  reward_embeds: float32 [B, D] CLIP pooled output of the joined reward text.
  keys: uint32 [B, 2] one PRNG key per example (`seed_keys`): results do not depend on batching.
  init_noise: None (drawn from `keys`) or float32 [B, h, w, C] unit Gaussian initial latents.
  """

  images: jax.Array
  context: jax.Array
  null_context: jax.Array
  scores: jax.Array
  reward_embeds: jax.Array
  keys: jax.Array
  init_noise: jax.Array | None = None


def seed_keys(seeds: Sequence[int]) -> np.ndarray:
  """Python int seeds [B] -> uint32 [B, 2] PRNG keys (`jax.random.PRNGKey` each)."""
  return np.stack([np.asarray(jax.random.PRNGKey(int(s))) for s in seeds])


def guide(eps: jax.Array, text_guidance: jax.Array, image_guidance: jax.Array) -> jax.Array:
  """Three-way classifier-free guidance.

  Args:
    eps: [3B, ...] predictions, branch-major (instruction + image, "" + image, "" + zero image).
    text_guidance, image_guidance: scalars g_text, g_image.
  Returns:
    [B, ...] eps_uncond + g_text (eps_text - eps_image) + g_image (eps_image - eps_uncond).
  """
  eps_text, eps_image, eps_uncond = jnp.split(eps, 3, axis=0)
  return eps_uncond + text_guidance * (eps_text - eps_image) + image_guidance * (eps_image - eps_uncond)


# ----------------------------------------------------------------------------- scheduler tables


class _Tables(NamedTuple):
  timesteps: jax.Array  # [N] U-Net timestep input per step
  sigmas: jax.Array  # [N + 1] Euler noise levels (DDIM: unused zeros)
  prev_timesteps: jax.Array  # [N] DDIM targets (Euler: unused)
  init_sigma: jax.Array  # scalar std of the initial latents


def _tables(spec: SamplerSpec, schedule: diffusion.Schedule) -> _Tables:
  n = spec.num_steps
  if spec.scheduler == "ddim":
    ts, prev = diffusion.ddim_timesteps(schedule, n, spec.spacing, spec.steps_offset)
    return _Tables(ts, jnp.zeros((n + 1,), jnp.float32), prev, jnp.float32(1.0))
  ts, sigmas = diffusion.euler_ancestral_timesteps(schedule, n, spec.spacing, spec.steps_offset)
  return _Tables(ts, sigmas, jnp.zeros((n,), jnp.int32), diffusion.init_noise_sigma(sigmas, spec.spacing))


def _step(spec, schedule, tables, i, eps, x, noise):
  """One scheduler update of latents x [B, h, w, C] (float32) given guided eps."""
  if spec.scheduler == "ddim":
    return diffusion.ddim_step(schedule, eps, tables.timesteps[i], tables.prev_timesteps[i], x,
                               spec.set_alpha_to_one)
  sigma, sigma_next = tables.sigmas[i], tables.sigmas[i + 1]
  if spec.scheduler == "euler":
    return diffusion.euler_step(eps, sigma, sigma_next, x)
  return diffusion.euler_ancestral_step(eps, sigma, sigma_next, x, noise)


def _alpha_bar(spec, schedule, tables, i):
  """alpha_bar at step i's noise level (Euler: 1 / (sigma^2 + 1))."""
  if spec.scheduler == "ddim":
    return schedule.alphas_cumprod[tables.timesteps[i]]
  return 1.0 / (tables.sigmas[i] ** 2 + 1.0)


def _model_input(spec, tables, i, x):
  """The noisy latents as the U-Net sees them (Euler: scaled by 1/sqrt(sigma^2 + 1))."""
  return x if spec.scheduler == "ddim" else diffusion.scale_model_input(x, tables.sigmas[i])


# ----------------------------------------------------------------------------- the sampler


def _normal(keys: jax.Array, index: int | jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Unit Gaussian [B, *shape] float32, example b drawn from fold_in(keys[b], index)."""
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, index), shape, jnp.float32))(keys)


_PROGRESS_BAR: list = [None]  # the tqdm-like bar that `progress=True` samplers advance


def set_progress_bar(bar: Any | None) -> None:
  """Routes per-step progress of `progress=True` samplers to `bar` (anything with update(n); None: off)."""
  _PROGRESS_BAR[0] = bar


def _report_step(step: jax.Array) -> None:
  """Host side of the per-step callback."""
  del step
  if _PROGRESS_BAR[0] is not None:
    _PROGRESS_BAR[0].update(1)


def _sample(unet_params, vae_params, cond: Conditioning, guidance: jax.Array, *, unet, vae, scaling_factor: float,
            spec: SamplerSpec, progress: bool):
  """Body of the jitted sampler (see `make_sample_fn`)."""
  TRACES[(spec.scheduler, spec.num_steps, tuple(cond.images.shape))] += 1
  schedule = spec.make_schedule()
  tables = _tables(spec, schedule)
  batch = cond.images.shape[0]

  # The image condition, shared by the first two branches; the third sees zeros.
  image_latents = pretrained.vae_encode(vae, vae_params, cond.images)[0].astype(jnp.float32)
  image_latents = jnp.concatenate([image_latents, image_latents, jnp.zeros_like(image_latents)])
  context = jnp.concatenate([cond.context, cond.null_context, cond.null_context])
  scores = jnp.tile(cond.scores, (3, 1))
  reward_embeds = jnp.tile(cond.reward_embeds, (3, 1))
  latent_shape = image_latents.shape[1:]  # (h, w, the VAE's latent channels)

  init_noise = _normal(cond.keys, 0, latent_shape) if cond.init_noise is None else cond.init_noise
  x = init_noise.astype(jnp.float32) * tables.init_sigma

  def body(i, x):
    x_in = jnp.tile(_model_input(spec, tables, i, x), (3, 1, 1, 1))
    sample = jnp.concatenate([x_in, image_latents], axis=-1)
    t = jnp.broadcast_to(tables.timesteps[i], (3 * batch,))
    reward = (scores, reward_embeds) if unet.reward else (None, None)
    eps = unet.apply({"params": unet_params}, sample, t, context, *reward).astype(jnp.float32)
    if spec.prediction_type == "v_prediction":  # before guidance: the conversion is linear, x_in the same
      eps = diffusion.v_to_eps(eps, x_in.astype(jnp.float32), _alpha_bar(spec, schedule, tables, i))
    eps = guide(eps, guidance[0], guidance[1])
    noise = _normal(cond.keys, i + 1, latent_shape) if spec.scheduler == "euler_ancestral" else None
    if progress:
      jax.debug.callback(_report_step, i)
    return _step(spec, schedule, tables, i, eps, x, noise)

  latents = jax.lax.fori_loop(0, spec.num_steps, body, x)
  pixels = pretrained.vae_decode(vae, vae_params, latents / scaling_factor, cond.images).astype(jnp.float32)
  finite = jnp.all(jnp.isfinite(pixels), axis=(1, 2, 3))
  return jnp.clip(pixels / 2 + 0.5, 0.0, 1.0), finite


def make_sample_fn(unet: models.RewardUNet, vae: models.AutoencoderKL, scaling_factor: float, spec: SamplerSpec, *,
                   progress: bool = False, mesh: Mesh | None = None) -> Callable:
  """The jitted editing sampler for one model and scheduler setting.

  Args:
    unet: a `models.RewardUNet` (its `dtype` is the compute dtype; reward=False ignores rewards).
    vae: the Flax VAE module (`pretrained.load_vae`).
    scaling_factor: the VAE latent scaling factor (SD: 0.18215).
    spec: scheduler and step count.
    progress: call back to the host after every step (see `set_progress_bar`).
    mesh: None (placement follows the arguments) or a mesh (`sharding.local_mesh`) to split the
      batch over: params and guidance replicated, `cond` and the outputs split along the batch,
      whose size must then be a multiple of the mesh's device count (`sharding.pad_batch`).

  Returns:
    fn(unet_params, vae_params, cond: Conditioning, guidance: float32 [2] (g_text, g_image))
    -> (images float32 [B, H, W, 3] in [0, 1], finite bool [B]: False where the decode held
       NaN or inf before clipping). Compiled once per input shape.
  """
  fn = functools.partial(_sample, unet=unet, vae=vae, scaling_factor=float(scaling_factor), spec=spec,
                         progress=progress)
  if mesh is None:
    return jax.jit(fn)
  params, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return jax.jit(fn, in_shardings=(params, params, batch, params), out_shardings=(batch, batch))


class NonFiniteError(ValueError):
  """The sampler produced NaN or inf pixels (a ValueError: main.py reports it and exits 1)."""


_SAMPLE_FNS: dict = {}


def cached_sample_fn(unet: models.RewardUNet, vae: models.AutoencoderKL, scaling_factor: float, spec: SamplerSpec, *,
                     progress: bool = True, mesh: Mesh | None = None) -> Callable:
  """`make_sample_fn`, built once per (U-Net, VAE architecture, spec, progress, mesh) in this process.

  Editors loaded twice from the same (or an equal) model share the compiled programs. The VAE
  module is not hashable, so it is keyed by its repr (all of its attributes).
  """
  key = (unet, repr(vae), float(scaling_factor), spec, progress, mesh)
  if key not in _SAMPLE_FNS:
    _SAMPLE_FNS[key] = make_sample_fn(unet, vae, scaling_factor, spec, progress=progress, mesh=mesh)
  return _SAMPLE_FNS[key]


def check_finite(finite: np.ndarray, what: str = "edit") -> None:
  """Raises NonFiniteError naming the examples whose decode held NaN or inf."""
  bad = [int(i) for i in np.flatnonzero(~np.asarray(finite))]
  if bad:
    raise NonFiniteError(f"{what}: the decoded image of batch example(s) {bad} has non-finite values "
                             "(NaN/inf); with dtype=bfloat16 try float32")
