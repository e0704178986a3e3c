"""The trainer's state and its pure step (SPEC section 3): TrainState, the frozen encoders, the
optimiser and EMA, the loss, and `train_step`, jitted once by the loop with explicit shardings."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from mre_jax import models, ops
from mre_jax.data import tokens
from mre_jax.errors import ConfigError
from mre_jax.infer import diffusion, sampling
from mre_jax.io import checkpointing, export, pretrained


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # optimiser steps taken
  params: Any  # U-Net + reward modules, float32
  ema_params: Any
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class Frozen:
  """The frozen modules (VAE, CLIP text encoder, tokenizer); their params travel separately."""

  vae: Any
  text_encoder: Any
  tokenizer: Any
  scaling_factor: float
  scheduler_config: dict = dataclasses.field(
      default_factory=lambda: dict(export.SCHEDULER_CONFIG), compare=False)  # the noise schedule


def initial_params(config: ml_collections.ConfigDict, spec: checkpointing.ModelSpec) -> Any:
  """Host (numpy) U-Net params of a tiny model or of a project checkpoint to start from."""
  model = models.RewardUNet(spec.unet, reward=spec.reward)
  if config.model.init == "tiny":
    return models.init_unet_params(model, config.seed)
  _, params = checkpointing.restore_params(config.model.pretrained, use_ema=True)
  params = {k: v for k, v in params.items() if k not in models.REWARD_MODULES or spec.reward}
  if spec.reward:  # reward modules the checkpoint lacks start from the release's random init
    fresh = models.init_unet_params(model, config.seed)
    params = {**{k: v for k, v in fresh.items() if k in models.REWARD_MODULES}, **params}
  return params


def training_schedule(frozen: Frozen) -> diffusion.Schedule:
  """The noise schedule of the model's own scheduler config (frozen/scheduler/), as diffusers'
  training scripts read it: the sampler (edit, sample grids, evaluation) reads the same file."""
  return sampling.spec_from_scheduler_config(frozen.scheduler_config, "euler_ancestral", 1).make_schedule()


def load_frozen(workdir: Path, dtype: Any, kernels: ops.Kernels = ops.Kernels()) -> tuple[Frozen, dict]:
  """(modules, host params {"vae", "text", "empty_ids" [1, 77]}) of a workdir's frozen parts."""
  folder = checkpointing.frozen_dir(workdir)
  vae, vae_params = pretrained.load_vae(folder, dtype, kernels)
  text_encoder, text_params = pretrained.load_text_encoder(folder, dtype, kernels)
  tokenizer = pretrained.load_tokenizer(folder)
  frozen = Frozen(vae, text_encoder, tokenizer, float(vae.config.scaling_factor), export.read_scheduler_config(folder))
  return frozen, {"vae": vae_params, "text": text_params, "empty_ids": tokens.tokenize(tokenizer, [""])}


SCHEDULES = ("constant", "cosine")


def lr_schedule(optim: ml_collections.ConfigDict, num_steps: int = 0) -> optax.Schedule:
  """An optional linear warm-up over `optim.warmup_steps`, then `optim.schedule`: "constant" (the
  release) or "cosine", a cosine decay that reaches 0 at step `num_steps` (the run's last)."""
  schedule = optim.get("schedule", "constant")
  if schedule not in SCHEDULES:
    raise ConfigError(f"config.optim.schedule: {schedule!r} is not one of {SCHEDULES}")
  if schedule == "cosine":
    if num_steps <= optim.warmup_steps:
      raise ConfigError(f"config.optim.schedule cosine needs num_steps ({num_steps}) > warmup_steps "
                       f"({optim.warmup_steps})")
    after = optax.cosine_decay_schedule(optim.lr, num_steps - optim.warmup_steps)
  else:
    after = optax.constant_schedule(optim.lr)
  if optim.warmup_steps <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, optim.warmup_steps), after],
                              [optim.warmup_steps])


def make_optimizer(optim: ml_collections.ConfigDict, num_steps: int = 0) -> optax.GradientTransformation:
  """AdamW with global-norm clipping, on `lr_schedule(optim, num_steps)`."""
  return optax.chain(
      optax.clip_by_global_norm(optim.clip_norm),
      optax.adamw(lr_schedule(optim, num_steps), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                  weight_decay=optim.weight_decay))


def ema_decay(step: jax.Array, ema: ml_collections.ConfigDict) -> jax.Array:
  """diffusers EMAModel's decay at optimisation step `step` (1-based): (1+s)/(10+s), capped."""
  s = jnp.maximum(step - ema.update_after_step - 1, 0).astype(jnp.float32)
  if ema.use_warmup:
    value = 1 - (1 + s / ema.inv_gamma) ** -ema.power
  else:
    value = (1 + s) / (10 + s)
  value = jnp.clip(value, ema.min_decay, ema.decay)
  return jnp.where(s <= 0, 0.0, value)


BATCH_KEYS = ("original", "edited", "instruction_ids", "reward_ids", "scores")


def encode_batch(frozen: Frozen, fparams: dict[str, Any], batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Frozen encoders on an image batch: the fields a latent cache stores (see latent_cache)."""
  mean, logvar = pretrained.vae_encode(frozen.vae, fparams["vae"], batch["edited"])
  cond, _ = pretrained.vae_encode(frozen.vae, fparams["vae"], batch["original"])
  context, _ = pretrained.encode_text(frozen.text_encoder, fparams["text"], batch["instruction_ids"])
  _, reward_embeds = pretrained.encode_text(frozen.text_encoder, fparams["text"], batch["reward_ids"])
  return dict(latent_mean=mean, latent_logvar=logvar, cond=cond, context=context, reward_embeds=reward_embeds,
              scores=batch["scores"])


def _encode(frozen: Frozen, fparams, batch, rng):
  """(target latents, image cond, instruction context, reward embeddings, "" context), float32."""
  enc = batch if "latent_mean" in batch else encode_batch(frozen, fparams, batch)
  mean, logvar = enc["latent_mean"], enc["latent_logvar"]
  latents = (mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)) * frozen.scaling_factor
  empty, _ = pretrained.encode_text(frozen.text_encoder, fparams["text"], fparams["empty_ids"])
  out = (latents, enc["cond"], enc["context"], enc["reward_embeds"], jnp.broadcast_to(empty, enc["context"].shape))
  return jax.tree_util.tree_map(lambda x: jax.lax.stop_gradient(x.astype(jnp.float32)), out)


def prediction_type(frozen: Frozen) -> str:
  return frozen.scheduler_config.get("prediction_type", "epsilon")


def per_example_loss(params: Any, batch: dict[str, jax.Array], rng: jax.Array, *, unet: models.RewardUNet,
                     frozen: Frozen, fparams: dict[str, Any], schedule: diffusion.Schedule,
                     config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
  """(MSE per example [B], its timestep [B]) between the U-Net's output and its target for one
  microbatch (SPEC section 3): the noise, or the velocity when the model's scheduler config says
  prediction_type v_prediction."""
  k_lat, k_noise, k_t, k_drop, k_dropout = jax.random.split(rng, 5)
  latents, cond, context, reward_embeds, empty = _encode(frozen, fparams, batch, k_lat)
  b = latents.shape[0]
  noise = diffusion.training_noise(k_noise, latents.shape, config.noise_offset, config.noise_pyramid)
  t = diffusion.sample_timesteps(k_t, b, schedule.num_train_timesteps)
  noisy = diffusion.add_noise(schedule, latents, noise, t)
  p = config.cond_dropout
  r = jax.random.uniform(k_drop, (b, 1, 1))
  context = jnp.where(r < 2 * p, empty, context)
  cond = jnp.where(((r >= p) & (r < 3 * p))[..., None], 0.0, cond)
  eps = unet.apply({"params": params}, jnp.concatenate([noisy, cond], -1), t, context, batch["scores"],
                   reward_embeds, train=True, rngs={"dropout": k_dropout})
  if prediction_type(frozen) == "v_prediction":
    target = diffusion.velocity(schedule, latents, noise, t)
  else:
    target = noise
  return jnp.mean((eps.astype(jnp.float32) - target) ** 2, axis=tuple(range(1, target.ndim))), t


def loss_fn(params: Any, batch: dict[str, jax.Array], rng: jax.Array, *, frozen: Frozen,
            schedule: diffusion.Schedule, config: ml_collections.ConfigDict, **kwargs: Any) -> jax.Array:
  """The training loss of one microbatch: `per_example_loss`'s mean, each example weighted by
  Min-SNR-gamma (`config.snr_gamma` > 0) or not (0)."""
  losses, t = per_example_loss(params, batch, rng, frozen=frozen, schedule=schedule, config=config, **kwargs)
  return jnp.mean(losses * diffusion.min_snr_weights(schedule, t, config.snr_gamma, prediction_type(frozen)))


def train_step(state: TrainState, batch: dict[str, jax.Array], fparams: dict[str, Any], rng: jax.Array, *,
               unet: models.RewardUNet, frozen: Frozen, tx: optax.GradientTransformation, schedule: diffusion.Schedule,
               config: ml_collections.ConfigDict) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimiser step over `config.grad_accum_steps` microbatches; returns (state, metrics)."""
  rng = jax.random.fold_in(rng, state.step)
  accum = config.grad_accum_steps
  micro = jax.tree_util.tree_map(lambda x: x.reshape((accum, -1) + x.shape[1:]), batch)
  grad_fn = jax.value_and_grad(functools.partial(loss_fn, unet=unet, frozen=frozen, fparams=fparams,
                                                 schedule=schedule, config=config))

  def accumulate(carry, xs):
    loss_sum, grad_sum = carry
    i, mb = xs
    loss, grads = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
    return (loss_sum + loss, jax.tree_util.tree_map(jnp.add, grad_sum, grads)), None

  if accum == 1:  # no loop: XLA:CPU runs convolutions inside a while loop ~10x slower (no YNNPACK)
    loss, grads = grad_fn(state.params, batch, jax.random.fold_in(rng, 0))
  else:
    zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
    (loss, grads), _ = jax.lax.scan(accumulate, (0.0, zeros), (jnp.arange(accum), micro))
    loss, grads = loss / accum, jax.tree_util.tree_map(lambda g: g / accum, grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = ema_decay(state.step + 1, config.ema)
  ema = jax.tree_util.tree_map(lambda e, p: e - (1 - decay) * (e - p), state.ema_params, params)
  metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "ema_decay": decay}
  return TrainState(state.step + 1, params, ema, opt_state), metrics
