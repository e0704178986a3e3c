"""SD 1.5 noise schedule and samplers as pure JAX functions (SPEC sections 2-4).

Everything here is stateless: the schedule is a `Schedule` NamedTuple (a pytree of float32
arrays), timestep tables are plain arrays, and every step function maps arrays to arrays, so
all of it can run under `jax.jit` and inside `jax.lax.fori_loop` (index the tables with the
loop's traced step index).

Numerics follow diffusers' PyTorch schedulers with SD 1.5's `scheduler_config.json`
(1000 steps, scaled_linear betas 0.00085..0.012, epsilon prediction, steps_offset 1,
timestep_spacing "leading", clip_sample False, set_alpha_to_one False):

- `add_noise`: `DDPMScheduler.add_noise`.
- `euler_ancestral_*`: `EulerAncestralDiscreteScheduler` (the release's inference sampler).
- `euler_*`: `EulerDiscreteScheduler` with its defaults (s_churn 0: deterministic).
- `ddim_*`: `DDIMScheduler` with eta 0.

Units: a timestep `t` is an index into the 1000-step training schedule; `sigma` is the
noise-to-signal ratio sqrt((1 - alpha_bar_t) / alpha_bar_t) of the variance-exploding view
used by the Euler samplers (x_ve = x_vp / sqrt(alpha_bar_t)). Latents are NHWC [B, h, w, 4],
but the step functions work elementwise and accept any shape.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SPACINGS = ("leading", "linspace", "trailing")


class Schedule(NamedTuple):
  """DDPM training schedule; every field is float32 [T] (T = num_train_timesteps).

  betas: per-step noise variance beta_t.
  alphas: 1 - beta_t.
  alphas_cumprod: alpha_bar_t = prod_{s <= t} alpha_s.
  sigmas: sqrt((1 - alpha_bar_t) / alpha_bar_t), increasing in t (Euler noise levels).
  """

  betas: jax.Array
  alphas: jax.Array
  alphas_cumprod: jax.Array
  sigmas: jax.Array

  @property
  def num_train_timesteps(self) -> int:
    """T, the number of training timesteps (static: read from the array shape)."""
    return self.betas.shape[0]


def make_schedule(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                  beta_end: float = 0.012, beta_schedule: str = "scaled_linear",
                  rescale_betas_zero_snr: bool = False) -> Schedule:
  """Builds the DDPM schedule (SD 1.5 defaults).

  Follows diffusers' float32 arithmetic, which matters at small t where 1 - alpha_bar_t
  cancels: betas rounded to float32, alphas = 1 - betas in float32, alpha_bar accumulated in
  float64 (as torch's CPU cumprod does) then rounded, sigmas computed in float32 from the
  rounded alpha_bar. Agrees with diffusers' PyTorch schedulers to ~5e-7 relative everywhere.

  Args:
    num_train_timesteps: T.
    beta_start, beta_end: first and last beta.
    beta_schedule: "scaled_linear" (linear in sqrt(beta), SD) or "linear".
    rescale_betas_zero_snr: rescale the betas so that alpha_bar_{T-1} = 0 (Lin et al. 2023,
      "Common diffusion noise schedules and sample steps are flawed", diffusers' option of that
      name). SD's last alpha_bar is 0.0047: training images keep sqrt(0.0047) = 7% of their
      signal at the last step, so a model learns to take global colour from x_t there, and at
      sampling, where x_T is pure noise, it takes it from the noise. Needs v-prediction. The
      last sigma is then computed from alpha_bar = 2^-24 (diffusers' Euler schedulers' choice)
      instead of infinity.
  Returns:
    `Schedule` of float32 [T] arrays.
  """
  if beta_schedule == "scaled_linear":
    betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps) ** 2
  elif beta_schedule == "linear":
    betas = np.linspace(beta_start, beta_end, num_train_timesteps)
  else:
    raise ValueError(f"unsupported beta_schedule {beta_schedule!r}")
  betas = betas.astype(np.float32)
  if rescale_betas_zero_snr:
    betas = _rescale_zero_terminal_snr(betas)
  alphas = np.float32(1.0) - betas
  alphas_cumprod = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
  sigma_alphas_cumprod = alphas_cumprod.copy()
  if rescale_betas_zero_snr:
    sigma_alphas_cumprod[-1] = np.float32(2.0 ** -24)
  sigmas = np.sqrt((np.float32(1.0) - sigma_alphas_cumprod) / sigma_alphas_cumprod)
  return Schedule(*(jnp.asarray(a, jnp.float32) for a in (betas, alphas, alphas_cumprod, sigmas)))


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """float32 [T] betas whose sqrt(alpha_bar) is shifted to end at 0 and scaled to keep its start
  (Lin et al. 2023, algorithm 1); the last beta becomes 1."""
  sqrt_ab = np.sqrt(np.cumprod((np.float32(1.0) - betas).astype(np.float64)).astype(np.float32))
  first, last = sqrt_ab[0], sqrt_ab[-1]
  sqrt_ab = (sqrt_ab - last) * (first / (first - last))
  ab = sqrt_ab ** 2
  alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
  return (np.float32(1.0) - alphas).astype(np.float32)


def sample_timesteps(rng: jax.Array, batch: int, num_train_timesteps: int = 1000) -> jax.Array:
  """Training timesteps, uniform integers in [0, num_train_timesteps); int32 [batch]."""
  return jax.random.randint(rng, (batch,), 0, num_train_timesteps, dtype=jnp.int32)


PREDICTION_TYPES = ("epsilon", "v_prediction")


def min_snr_weights(schedule: Schedule, t: jax.Array, gamma: float, prediction_type: str) -> jax.Array:
  """Min-SNR-gamma loss weights (Hang et al. 2023; diffusers' `--snr_gamma`), float32 [B]: min(SNR_t,
  gamma) / SNR_t for an epsilon target, min(SNR_t, gamma) / (SNR_t + 1) for a velocity target, where
  SNR_t = alpha_bar_t / (1 - alpha_bar_t). Each caps the weight of the low-noise steps, whose
  target is easy, at gamma; with gamma = 0 the weights are 1 (the plain MSE)."""
  if gamma <= 0:
    return jnp.ones(t.shape, jnp.float32)
  if prediction_type not in PREDICTION_TYPES:
    raise ValueError(f"prediction_type={prediction_type!r}: expected one of {PREDICTION_TYPES}")
  a = schedule.alphas_cumprod[t]
  snr = a / (1.0 - a)
  capped = jnp.minimum(snr, gamma)
  return capped / snr if prediction_type == "epsilon" else capped / (snr + 1.0)


def velocity(schedule: Schedule, latents: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """The v-prediction target sqrt(alpha_bar_t) noise - sqrt(1 - alpha_bar_t) latents (diffusers'
  `get_velocity`), float32, same shape as `latents`."""
  a = _per_example(schedule.alphas_cumprod[t], latents.ndim)
  return jnp.sqrt(a) * noise.astype(jnp.float32) - jnp.sqrt(1.0 - a) * latents.astype(jnp.float32)


def v_to_eps(v: jax.Array, x_t: jax.Array, alpha_bar: jax.Array) -> jax.Array:
  """The noise a v-prediction implies: sqrt(a) v + sqrt(1 - a) x_t, for x_t the sample as the
  model saw it (variance-preserving scale) and a = alpha_bar at its noise level."""
  return jnp.sqrt(alpha_bar) * v + jnp.sqrt(1.0 - alpha_bar) * x_t


def training_noise(rng: jax.Array, shape: tuple[int, ...], offset: float = 0.0, pyramid: float = 0.0) -> jax.Array:
  """The noise a training step adds to latents [B, h, w, C].

  N(0, 1) per element, plus:
  - `offset` times N(0, 1) per (example, channel), shared by all pixels (diffusers' `noise_offset`);
  - with `pyramid` = d > 0, multi-resolution ("pyramid") noise: level i (1, 2, ... down to 1x1)
    adds d^i times N(0, 1) drawn at h / 2^i x w / 2^i and repeated over 2^i x 2^i blocks; the
    sum is divided by sqrt(sum of d^(2i)), so every element keeps unit variance.
  Why: the schedule's last step keeps sqrt(alphas_cumprod[T]) = 0.07 of the image, and in small
  latents its low frequencies (colours, layout) show through the noise, so a model learns to read
  them there. Sampling starts from noise without them: the model then keeps the start noise's
  low frequencies as colours. Extra low-frequency noise in training hides that leak, and the
  model learns to take colours and layout from its conditions instead.
  """
  k_pixel, k_offset, k_pyramid = jax.random.split(rng, 3)
  noise = jax.random.normal(k_pixel, shape)
  if pyramid:
    b, h, w, c = shape
    total, level = 1.0, 1
    while h >> (level - 1) > 1 and w >> (level - 1) > 1:
      f = 2 ** level
      coarse = jax.random.normal(jax.random.fold_in(k_pyramid, level), (b, -(-h // f), -(-w // f), c))
      coarse = jnp.repeat(jnp.repeat(coarse, f, axis=1), f, axis=2)[:, :h, :w]
      noise = noise + pyramid ** level * coarse
      total += pyramid ** (2 * level)
      level += 1
    noise = noise / jnp.sqrt(total)
  if offset:
    noise = noise + offset * jax.random.normal(k_offset, (shape[0],) + (1,) * (len(shape) - 2) + (shape[-1],))
  return noise


def _per_example(coef: jax.Array, ndim: int) -> jax.Array:
  """Reshapes per-example coefficients [B] to [B, 1, ..., 1] (ndim dims) for broadcasting."""
  return coef.reshape(coef.shape + (1,) * (ndim - coef.ndim))


def add_noise(schedule: Schedule, latents: jax.Array, noise: jax.Array,
              timesteps: jax.Array) -> jax.Array:
  """Forward diffusion q(x_t | x_0), as `DDPMScheduler.add_noise`.

  x_t = sqrt(alpha_bar_t) * x_0 + sqrt(1 - alpha_bar_t) * noise.

  Args:
    schedule: the training schedule.
    latents: x_0, [B, h, w, C] (any trailing shape).
    noise: unit Gaussian, same shape as `latents`.
    timesteps: integer t per example, [B], in [0, T).
  Returns:
    x_t, same shape and dtype as `latents`.
  """
  alpha_bar = schedule.alphas_cumprod[timesteps]
  scale = _per_example(jnp.sqrt(alpha_bar), latents.ndim).astype(latents.dtype)
  noise_scale = _per_example(jnp.sqrt(1.0 - alpha_bar), latents.ndim).astype(latents.dtype)
  return scale * latents + noise_scale * noise


# ---------------------------------------------------------------------------------------------
# Inference timestep tables (static: computed with numpy from Python ints).


def _spaced_timesteps(num_train_timesteps: int, num_steps: int, spacing: str,
                      steps_offset: int, integer: bool) -> np.ndarray:
  """Descending inference timesteps [num_steps], diffusers' `set_timesteps` spacings.

  `integer` selects the DDIM variant (linspace rounded to ints) over the Euler one (linspace
  kept fractional, float32).
  """
  if spacing == "linspace":
    ts = np.linspace(0, num_train_timesteps - 1, num_steps, dtype=np.float64 if integer else
                     np.float32)[::-1]
    ts = ts.round() if integer else ts
  elif spacing == "leading":
    ratio = num_train_timesteps // num_steps
    ts = (np.arange(0, num_steps) * ratio).round()[::-1] + steps_offset
  elif spacing == "trailing":
    ratio = num_train_timesteps / num_steps
    ts = np.arange(num_train_timesteps, 0, -ratio).round() - 1
  else:
    raise ValueError(f"timestep spacing must be one of {SPACINGS}, got {spacing!r}")
  return np.ascontiguousarray(ts).astype(np.int32 if integer else np.float32)


def euler_ancestral_timesteps(schedule: Schedule, num_steps: int, spacing: str = "leading",
                              steps_offset: int = 1) -> tuple[jax.Array, jax.Array]:
  """Timesteps and noise levels of `EulerAncestralDiscreteScheduler.set_timesteps`.

  Args:
    schedule: the training schedule.
    num_steps: N, number of sampling steps (static).
    spacing: "leading" (SD 1.5), "linspace" or "trailing" (static).
    steps_offset: added to "leading" timesteps (SD 1.5: 1).
  Returns:
    timesteps: float32 [N], descending, the U-Net's timestep input at each step.
    sigmas: float32 [N + 1], sigma at each timestep (linear interpolation of the training
      sigmas at fractional timesteps) followed by a final 0.
  """
  ts = _spaced_timesteps(schedule.num_train_timesteps, num_steps, spacing, steps_offset,
                         integer=False)
  grid = jnp.arange(schedule.num_train_timesteps, dtype=jnp.float32)
  sigmas = jnp.interp(jnp.asarray(ts), grid, schedule.sigmas)
  sigmas = jnp.concatenate([sigmas, jnp.zeros((1,), jnp.float32)]).astype(jnp.float32)
  return jnp.asarray(ts), sigmas


def euler_timesteps(schedule: Schedule, num_steps: int, spacing: str = "leading",
                    steps_offset: int = 1) -> tuple[jax.Array, jax.Array]:
  """Timesteps [N] and sigmas [N + 1] of `EulerDiscreteScheduler` (same tables as ancestral)."""
  return euler_ancestral_timesteps(schedule, num_steps, spacing, steps_offset)


def init_noise_sigma(sigmas: jax.Array, spacing: str = "leading") -> jax.Array:
  """Std of the initial latents for the Euler samplers; scalar float32.

  max(sigmas) for "linspace"/"trailing", sqrt(max(sigmas)^2 + 1) for "leading" (diffusers'
  rule). Initial latents are unit Gaussian times this value.
  """
  sigma_max = jnp.max(sigmas)
  if spacing in ("linspace", "trailing"):
    return sigma_max
  return jnp.sqrt(sigma_max ** 2 + 1.0)


def scale_model_input(x: jax.Array, sigma: jax.Array) -> jax.Array:
  """Euler samplers' U-Net input scaling x / sqrt(sigma^2 + 1); same shape as `x`.

  Applies to the noisy latents only (not to InstructPix2Pix's image latents).
  """
  return (x / jnp.sqrt(sigma ** 2 + 1.0)).astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# Step functions. Each returns the next sample with the dtype of `x`.


def euler_ancestral_step(eps: jax.Array, sigma: jax.Array, sigma_next: jax.Array,
                         x: jax.Array, noise: jax.Array) -> jax.Array:
  """One `EulerAncestralDiscreteScheduler.step` (epsilon prediction).

  Args:
    eps: predicted noise, same shape as `x`.
    sigma, sigma_next: scalars, sigmas[i] and sigmas[i + 1].
    x: current (unscaled) sample.
    noise: unit Gaussian, same shape as `x` (the draw diffusers makes inside `step`).
  Returns:
    sample at sigma_next.
  """
  xf = x.astype(jnp.float32)
  pred_x0 = xf - sigma * eps
  sigma_up = jnp.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2)
  sigma_down = jnp.sqrt(jnp.maximum(sigma_next ** 2 - sigma_up ** 2, 0.0))
  derivative = (xf - pred_x0) / sigma
  x_next = xf + derivative * (sigma_down - sigma) + noise * sigma_up
  return x_next.astype(x.dtype)


def euler_step(eps: jax.Array, sigma: jax.Array, sigma_next: jax.Array,
               x: jax.Array) -> jax.Array:
  """One `EulerDiscreteScheduler.step` (epsilon prediction, s_churn 0: no noise).

  Args:
    eps: predicted noise, same shape as `x`.
    sigma, sigma_next: scalars, sigmas[i] and sigmas[i + 1].
    x: current (unscaled) sample.
  Returns:
    sample at sigma_next.
  """
  xf = x.astype(jnp.float32)
  pred_x0 = xf - sigma * eps
  derivative = (xf - pred_x0) / sigma
  return (xf + derivative * (sigma_next - sigma)).astype(x.dtype)


def ddim_timesteps(schedule: Schedule, num_steps: int, spacing: str = "leading",
                   steps_offset: int = 1) -> tuple[jax.Array, jax.Array]:
  """Timesteps of `DDIMScheduler.set_timesteps` and the step each one jumps to.

  Args:
    schedule: the training schedule.
    num_steps: N (static).
    spacing: "leading" (SD 1.5), "linspace" or "trailing" (static).
    steps_offset: added to "leading" timesteps (SD 1.5: 1).
  Returns:
    timesteps: int32 [N], descending.
    prev_timesteps: int32 [N], t - T // N as in diffusers' `step` (whatever the spacing);
      negative means "the final step" (alpha_bar from `set_alpha_to_one`).
  """
  num_train = schedule.num_train_timesteps
  ts = _spaced_timesteps(num_train, num_steps, spacing, steps_offset, integer=True)
  prev = ts - num_train // num_steps
  return jnp.asarray(ts), jnp.asarray(prev.astype(np.int32))


def ddim_step(schedule: Schedule, eps: jax.Array, t: jax.Array, t_prev: jax.Array,
              x: jax.Array, set_alpha_to_one: bool = False) -> jax.Array:
  """One deterministic `DDIMScheduler.step` (eta 0, epsilon prediction, no clipping).

  Args:
    schedule: the training schedule.
    eps: predicted noise, same shape as `x`.
    t, t_prev: int scalars, timesteps[i] and prev_timesteps[i]; t_prev < 0 means final step.
    x: current sample x_t (variance-preserving; DDIM does no input scaling).
    set_alpha_to_one: alpha_bar for t_prev < 0 is 1 if True, else alpha_bar_0 (SD 1.5: False).
  Returns:
    x_{t_prev}.
  """
  ac = schedule.alphas_cumprod
  alpha_t = ac[t]
  final = jnp.float32(1.0) if set_alpha_to_one else ac[0]
  alpha_prev = jnp.where(t_prev >= 0, ac[jnp.maximum(t_prev, 0)], final)
  xf = x.astype(jnp.float32)
  pred_x0 = (xf - jnp.sqrt(1.0 - alpha_t) * eps) / jnp.sqrt(alpha_t)
  x_prev = jnp.sqrt(alpha_prev) * pred_x0 + jnp.sqrt(1.0 - alpha_prev) * eps
  return x_prev.astype(x.dtype)
