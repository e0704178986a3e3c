"""Training of stage 1 (InstructPix2Pix) and stage 2 (MRE), SPEC section 3.

Data flows: grain batches (per process) -> global sharded arrays -> `train_step` (pure, jitted
once with explicit shardings, state donated) -> metrics / checkpoints / samples.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import signal
import time
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging

from mre_jax import (checkpointing, diffusion, edit, export, latent_cache, models, ops, pretrained, sampling, sharding,
                     tiny)
from mre_jax.errors import ConfigError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


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


# ----------------------------------------------------------------------------- config checks


def validate(config, num_devices: int) -> None:
  """Fails on bad values before anything is compiled, naming the field."""
  if config.optim.lr <= 0:
    raise ConfigError(f"config.optim.lr={config.optim.lr}: must be > 0")
  if config.num_steps < 1:
    raise ConfigError(f"config.num_steps={config.num_steps}: must be >= 1")
  if config.stage not in (1, 2):
    raise ConfigError(f"config.stage={config.stage!r}: expected 1 (InstructPix2Pix) or 2 (MRE)")
  if config.model.dtype not in DTYPES:
    raise ConfigError(f"config.model.dtype={config.model.dtype!r}: expected one of {sorted(DTYPES)}")
  ops.Kernels.from_config(config.model, "config.model")  # a bad kernel name is a ConfigError
  if config.model.init not in ("tiny", "pretrained"):
    raise ConfigError(f"config.model.init={config.model.init!r}: expected 'tiny' or 'pretrained'")
  if config.model.init == "pretrained" and not Path(config.model.pretrained or "/nonexistent").is_dir():
    raise ConfigError(f"config.model.pretrained={config.model.pretrained!r}: not a folder (a diffusers-format "
                      "model folder or a project checkpoint)")
  micro = config.batch_size // max(config.grad_accum_steps, 1)
  if config.grad_accum_steps < 1 or config.batch_size % config.grad_accum_steps:
    raise ConfigError(f"config.batch_size={config.batch_size} is not divisible by "
                      f"config.grad_accum_steps={config.grad_accum_steps}")
  if micro % num_devices:
    raise ConfigError(f"config.batch_size={config.batch_size} / grad_accum_steps={config.grad_accum_steps} = "
                      f"{micro} is not divisible by the {num_devices} devices of the mesh")
  if config.noise_offset < 0:
    raise ConfigError(f"config.noise_offset={config.noise_offset}: must be >= 0")
  if not 0 <= config.noise_pyramid < 1:
    raise ConfigError(f"config.noise_pyramid={config.noise_pyramid}: must be in [0, 1)")
  if not 0 <= config.cond_dropout < 1 / 3:
    raise ConfigError(f"config.cond_dropout={config.cond_dropout}: must be in [0, 1/3)")


# ----------------------------------------------------------------------------- model setup


def prepare_workdir(config, workdir: Path) -> tuple[checkpointing.ModelSpec, Any]:
  """Writes the frozen parts into a new workdir; reads the spec of an old one.

  Returns (spec, U-Net params when they had to be loaded to learn the spec, else None).
  """
  if checkpointing.is_checkpoint(workdir):
    return checkpointing.read_spec(workdir), None
  reward = config.stage == 2 and config.model.reward
  if config.model.init == "tiny":
    unet_cfg = dataclasses.replace(tiny.UNET, **config.model.get("unet", {}))
    spec, params = checkpointing.ModelSpec(unet_cfg, reward, source="random tiny"), None
  elif checkpointing.is_checkpoint(config.model.pretrained):
    source = checkpointing.read_spec(config.model.pretrained)
    spec, params = dataclasses.replace(source, reward=reward), None
  else:
    spec, params = export.unet_from_diffusers(config.model.pretrained, reward=reward, seed=config.seed)
  if jax.process_index() == 0:
    tmp = checkpointing.staging_dir(workdir / checkpointing.FROZEN_DIR)
    if config.model.init == "tiny":
      tiny.write_frozen_parts(tmp, seed=config.seed, vae=config.model.get("vae", ""),
                              scheduler=dict(config.model.get("scheduler", {})))
    else:
      source = config.model.pretrained
      source = checkpointing.frozen_dir(source) if checkpointing.is_checkpoint(source) else source
      tmp.rmdir()
      export.copy_frozen_parts(source, tmp)
    checkpointing.publish(tmp, workdir / checkpointing.FROZEN_DIR)
  _sync("frozen parts written")
  return spec, params


def initial_params(config, spec: checkpointing.ModelSpec) -> Any:
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


def load_frozen(workdir: Path, dtype, kernels: ops.Kernels = ops.Kernels()) -> tuple[Frozen, dict]:
  """(modules, host params {"vae", "text", "empty_ids" [1, 77]}) of a workdir's frozen parts."""
  folder = checkpointing.frozen_dir(workdir)
  vae, vae_params = pretrained.load_vae(folder, dtype, kernels)
  text_encoder, text_params = pretrained.load_text_encoder(folder, dtype, kernels)
  tokenizer = pretrained.load_tokenizer(folder)
  frozen = Frozen(vae, text_encoder, tokenizer, float(vae.config.scaling_factor), export.read_scheduler_config(folder))
  return frozen, {"vae": vae_params, "text": text_params, "empty_ids": pretrained.tokenize(tokenizer, [""])}


def lr_schedule(optim) -> optax.Schedule:
  """Constant lr after an optional linear warm-up (the release: no warm-up)."""
  if optim.warmup_steps <= 0:
    return optax.constant_schedule(optim.lr)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, optim.lr, optim.warmup_steps), optax.constant_schedule(optim.lr)],
      [optim.warmup_steps])


def make_optimizer(optim) -> optax.GradientTransformation:
  """AdamW with global-norm clipping."""
  return optax.chain(
      optax.clip_by_global_norm(optim.clip_norm),
      optax.adamw(lr_schedule(optim), b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay))


def ema_decay(step: jax.Array, ema) -> jax.Array:
  """diffusers EMAModel's decay at optimisation step `step` (1-based): (1+s)/(10+s), capped."""
  s = jnp.maximum(step - ema.update_after_step - 1, 0).astype(jnp.float32)
  if ema.use_warmup:
    value = 1 - (1 + s / ema.inv_gamma) ** -ema.power
  else:
    value = (1 + s) / (10 + s)
  value = jnp.clip(value, ema.min_decay, ema.decay)
  return jnp.where(s <= 0, 0.0, value)


# ----------------------------------------------------------------------------- the step


def encode_batch(frozen: Frozen, fparams, batch) -> dict:
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


def loss_fn(params, batch, rng, *, unet, frozen: Frozen, fparams, schedule, config):
  """MSE between the U-Net's output and its target for one microbatch (SPEC section 3): the noise, or
  the velocity when the model's scheduler config says prediction_type v_prediction."""
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
  if frozen.scheduler_config.get("prediction_type", "epsilon") == "v_prediction":
    target = diffusion.velocity(schedule, latents, noise, t)
  else:
    target = noise
  return jnp.mean((eps.astype(jnp.float32) - target) ** 2)


def train_step(state: TrainState, batch, fparams, rng, *, unet, frozen, tx, schedule, config):
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


# ----------------------------------------------------------------------------- checkpoints


def _save(manager, state: TrainState, data_iter) -> None:
  step = int(jax.device_get(state.step))
  items = dict(params=ocp.args.StandardSave(state.params), ema_params=ocp.args.StandardSave(state.ema_params),
               opt_state=ocp.args.StandardSave(state.opt_state))
  if data_iter is not None:
    import grain
    items["data"] = grain.checkpoint.CheckpointSave(data_iter)
  manager.save(step, args=ocp.args.Composite(**items), force=True)


def _restore(manager, abstract: TrainState, data_iter) -> TrainState:
  step = manager.latest_step()
  items = dict(params=ocp.args.StandardRestore(abstract.params),
               ema_params=ocp.args.StandardRestore(abstract.ema_params),
               opt_state=ocp.args.StandardRestore(abstract.opt_state))
  if data_iter is not None:
    import grain
    items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  step_array = jax.device_put(np.int32(step), abstract.step.sharding)
  return TrainState(step_array, restored["params"], restored["ema_params"], restored["opt_state"])


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------- the loop

BATCH_KEYS = ("original", "edited", "instruction_ids", "reward_ids", "scores")


def _builder(config, workdir: Path):
  """The prepared TFDS builder of `config.data` (process 0 builds it on first use)."""
  from mre_jax import input_pipeline
  data = config.data
  data_dir = data.data_dir or str(workdir / "tfds")
  kwargs = {"config": data.builder_config} if data.builder_config else {}
  if jax.process_index() == 0:  # one process builds; the others read what it wrote
    input_pipeline.build_dataset(data.name, data_dir, data.manual_dir or None, **kwargs)
  _sync("dataset built")
  return input_pipeline.build_dataset(data.name, data_dir, data.manual_dir or None, **kwargs)


def cache_path(config, workdir: Path) -> str:
  """The latent cache to train from: "" (none), `<workdir>/latents` for "auto", else the field."""
  cache = config.data.latent_cache
  return str(workdir / "latents") if cache == "auto" else cache


def make_data_iterator(config, frozen: Frozen, workdir: Path, builder):
  """(checkpointable iterator of this process's batches, sample-grid batch)."""
  from mre_jax import input_pipeline
  data = config.data
  tokenize_fn = input_pipeline.clip_tokenize_fn(frozen.tokenizer)
  cache = cache_path(config, workdir)
  if cache:  # precomputed encoder outputs
    ds = input_pipeline.create_dataset(
        latent_cache.CacheSource(cache), global_batch_size=config.batch_size, seed=config.seed,
        prepare_fn=functools.partial(latent_cache.prepare, flip=data.flip))
    data_iter = input_pipeline.create_iterator(ds, worker_count=data.worker_count, prefetch_buffer_size=data.prefetch)
  else:
    data_iter = input_pipeline.create_input_iterator(
        builder, data.split, global_batch_size=config.batch_size, crop_size=data.crop_size, tokenize_fn=tokenize_fn,
        seed=config.seed, resize=data.resize, flip=data.flip, worker_count=data.worker_count,
        prefetch_buffer_size=data.prefetch)
  if builder is None or not config.sample.every:
    return data_iter, None
  # The same first examples on every process, unshuffled and unflipped: the sample grid's inputs
  # (held out from training where the builder has the sample split).
  split = config.sample.split if config.sample.split in builder.info.splits else data.split
  sample_ds = input_pipeline.create_dataset(
      input_pipeline.data_source(builder, split), global_batch_size=config.sample.count,
      crop_size=data.crop_size, tokenize_fn=tokenize_fn, seed=config.seed, resize=data.resize, flip=False,
      shuffle=False, process_index=0, process_count=1, keep_truth="truth" in builder.info.features)
  return data_iter, sample_ds[0]


def _initialize_distributed(config) -> None:
  d = config.distributed
  if not d.initialize:
    return
  kwargs = {}  # fields left unset come from the environment (SLURM, Cloud TPU, ...)
  if d.coordinator_address:
    kwargs["coordinator_address"] = d.coordinator_address
  if d.num_processes > 0:
    kwargs["num_processes"] = d.num_processes
  if d.process_id >= 0:
    kwargs["process_id"] = d.process_id
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU-only runs need it; GPUs ignore it
  jax.distributed.initialize(**kwargs)


class _StopFlag:
  """Set by SIGTERM: the loop saves a checkpoint after the current step and exits."""

  def __init__(self):
    self.requested = False
    signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True


def train_and_evaluate(config, workdir: str | None) -> TrainState:
  """Job: trains `config.num_steps` optimiser steps, resuming from `workdir` if it holds a run."""
  if not workdir:
    raise ConfigError("--workdir is required: checkpoints, logs and samples are written there")
  _initialize_distributed(config)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  validate(config, mesh.size)
  workdir = Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  spec, loaded_params = prepare_workdir(config, workdir)
  kernels = ops.Kernels.from_config(config.model, "config.model")
  spec = dataclasses.replace(spec, kernels=kernels)
  if jax.process_index() == 0 and not checkpointing.is_checkpoint(workdir):
    checkpointing.write_spec(workdir, spec)
  frozen, fparams = load_frozen(workdir, DTYPES[config.model.dtype], kernels)
  vae_config = pretrained.read_config(checkpointing.frozen_dir(workdir) / "vae")
  edit.check_channels(spec.unet, int(vae_config.get("latent_channels", 4)),
                      f"{workdir} (config.model.unet.in_channels / out_channels)")
  unet = models.RewardUNet(spec.unet, reward=spec.reward, dtype=DTYPES[config.model.dtype],
                           remat=config.model.remat, reward_dropout=config.model.reward_dropout, kernels=kernels)
  tx = make_optimizer(config.optim)

  # Shardings, derived from shapes.
  param_shapes = models.unet_param_shapes(unet)
  abstract = jax.eval_shape(lambda p: TrainState(jnp.zeros((), jnp.int32), p, p, tx.init(p)), param_shapes)
  state_sh = sharding.tree_shardings(abstract, mesh, config.mesh.fsdp_min_size)
  abstract = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
  repl = sharding.replicated(mesh)
  fparams = sharding.place(fparams, jax.tree_util.tree_map(lambda _: repl, fparams))

  cache = cache_path(config, workdir)
  have_cache = bool(cache) and (Path(cache) / latent_cache.INDEX).exists()
  builder = _builder(config, workdir) if not have_cache or config.sample.every or config.eval.count else None
  if cache and not have_cache:
    if config.data.latent_cache != "auto":
      raise FileNotFoundError(f"config.data.latent_cache={cache}: no latent cache there (make one with "
                              "--config.job=precompute, or set it to 'auto')")
    write_latent_cache(config, builder, frozen, jax.device_get(fparams), Path(cache))
  data_iter, sample_batch = make_data_iterator(config, frozen, workdir, builder)
  manager = checkpointing.make_manager(workdir, max_to_keep=config.checkpoint.keep,
                                       async_save=config.checkpoint.async_save)
  if manager.latest_step() is not None:
    state = _restore(manager, abstract, data_iter)
    if jax.process_index() == 0:
      print(f"resuming from step {int(jax.device_get(state.step))} of {workdir}", flush=True)
  else:
    host = initial_params(config, spec) if loaded_params is None else loaded_params
    params, ema = sharding.place(host, state_sh.params), sharding.place(host, state_sh.ema_params)
    opt_state = jax.jit(tx.init, out_shardings=state_sh.opt_state)(params)
    state = TrainState(jax.device_put(np.int32(0), state_sh.step), params, ema, opt_state)

  step_fn = jax.jit(
      functools.partial(train_step, unet=unet, frozen=frozen, tx=tx, schedule=training_schedule(frozen),
                        config=config),
      in_shardings=(state_sh, sharding.batch_sharding(mesh), repl, repl), out_shardings=(state_sh, repl),
      donate_argnums=0)
  sample_fn = None if sample_batch is None else make_sample_grid_fn(config, unet, frozen, sample_batch)
  try:
    state = _loop(config, workdir, state, step_fn, fparams, data_iter, manager, mesh, sample_fn)
  finally:
    manager.wait_until_finished()
    manager.close()
  if config.eval.count and jax.process_index() == 0 and int(jax.device_get(state.step)) == config.num_steps:
    from mre_jax import synthetic_eval
    synthetic_eval.evaluate_run(config, workdir, builder, config.num_steps)
  return state


def _loop(config, workdir, state, step_fn, fparams, data_iter, manager, mesh, sample_fn) -> TrainState:
  from tqdm import tqdm
  main_process = jax.process_index() == 0
  start = int(jax.device_get(state.step))
  if start >= config.num_steps:  # a rerun of a finished run: no step to take, no loss to report
    if main_process:
      print(f"the run is already complete at step {start} (config.num_steps={config.num_steps}); "
            f"checkpoints in {workdir / checkpointing.STATE_DIR}")
    return state
  writer = _metric_writer(workdir) if main_process else None
  stop = _StopFlag()
  rng = jax.random.PRNGKey(config.seed)
  bar = tqdm(total=config.num_steps, initial=start, disable=not main_process, unit="step")
  t0, images, metrics = time.time(), 0, {}
  for step in range(start + 1, config.num_steps + 1):
    local = next(data_iter)
    keys = latent_cache.FIELDS if config.data.latent_cache else BATCH_KEYS
    batch = sharding.global_batch({k: local[k] for k in keys}, mesh)
    state, metrics = step_fn(state, batch, fparams, rng)
    metrics = jax.device_get(metrics)
    if not np.isfinite(metrics["loss"]):
      raise FloatingPointError(f"step {step}: loss is {metrics['loss']}; stopping (this state is not saved)")
    images += config.batch_size
    if step % config.log_every == 0 or step == config.num_steps:
      rate = images / max(time.time() - t0, 1e-9)
      scalars = {**{k: float(v) for k, v in metrics.items()}, "images_per_sec": rate,
                 "lr": float(lr_schedule(config.optim)(step - 1))}
      if writer is not None:
        writer.write(step, scalars)
      bar.set_postfix(loss=f"{scalars['loss']:.4f}", img_s=f"{rate:.1f}")
      t0, images = time.time(), 0
    bar.update(1)
    if sample_fn is not None and config.sample.every and (step % config.sample.every == 0 or step == config.num_steps):
      grid = sample_fn(state.ema_params, fparams)
      if main_process:
        _write_png(grid, workdir / "samples" / f"step_{step:07d}.png")
        writer.image("samples", grid, step)
    if step % config.checkpoint.every == 0 or step == config.num_steps or stop.requested:
      _save(manager, state, data_iter)
    if stop.requested:
      logging.warning("SIGTERM: saved step %d and stopped", step)
      break
  bar.close()
  if main_process:
    print(f"done: step {int(jax.device_get(state.step))}/{config.num_steps}, "
          f"loss {float(metrics.get('loss', float('nan'))):.4f}, checkpoints in {workdir / checkpointing.STATE_DIR}")
  return state


# ----------------------------------------------------------------------------- samples and logs


GRID_HEADER = 24  # pixels of the label row
GRID_LABELS = ("input", "truth", "target", "edit at 5,5,5", "edit at target's rewards")


def make_sample_grid_fn(config, unet, frozen: Frozen, batch):
  """fn(ema_params, fparams) -> uint8 grid image of `batch` (see `_sample_grid`), built once per run."""
  spec = sampling.spec_from_scheduler_config(frozen.scheduler_config, "euler_ancestral", config.sample.steps)
  sample_fn = sampling.make_sample_fn(unet, frozen.vae, frozen.scaling_factor, spec)
  encode = jax.jit(functools.partial(pretrained.encode_text, frozen.text_encoder))
  return functools.partial(_sample_grid, sample_fn, encode, batch, frozen, config.sample.tile)


def _sample_grid(sample_fn, encode, batch, frozen: Frozen, tile: int, ema_params, fparams) -> np.ndarray:
  """uint8 grid: a header row of labels, then per example: input | truth (if the data has it) |
  target | edit at (5, 5, 5) and "None; None; None" | edit at the target's own rewards; tiles
  upscaled (nearest) to at least `tile` pixels."""
  from mre_jax import input_pipeline, sampling
  n = batch["original"].shape[0]
  best_text = pretrained.tokenize(frozen.tokenizer, ["; ".join(input_pipeline.BEST_REWARD_TEXTS)] * n)
  context, _ = encode(fparams["text"], batch["instruction_ids"])
  null_context, _ = encode(fparams["text"], jnp.broadcast_to(fparams["empty_ids"], batch["instruction_ids"].shape))
  _, best = encode(fparams["text"], best_text)
  _, own = encode(fparams["text"], batch["reward_ids"])
  best_scores = np.tile(np.asarray(input_pipeline.BEST_SCORES, np.float32), (n, 1))
  cond = sampling.Conditioning(batch["original"], context, null_context, best_scores, best,
                               sampling.seed_keys(range(n)))
  guidance = np.asarray([sampling.TEXT_GUIDANCE, sampling.IMAGE_GUIDANCE], np.float32)
  at_best, _ = sample_fn(ema_params, fparams["vae"], cond, guidance)
  at_own, _ = sample_fn(ema_params, fparams["vae"], cond._replace(scores=batch["scores"], reward_embeds=own), guidance)
  to01 = lambda x: np.clip(np.asarray(x) / 2 + 0.5, 0, 1)
  columns = [to01(batch["original"])] + ([to01(batch["truth"])] if "truth" in batch else [])
  columns += [to01(batch["edited"]), np.asarray(at_best), np.asarray(at_own)]
  labels = GRID_LABELS if "truth" in batch else GRID_LABELS[:1] + GRID_LABELS[2:]
  return labelled_grid(columns, labels, tile)


def labelled_grid(columns: list[np.ndarray], labels, tile: int) -> np.ndarray:
  """uint8 [header + n * T, len(columns) * T, 3] from columns of float [n, H, W, 3] in [0, 1]:
  each image upscaled by nearest neighbour to T = H * ceil(tile / H) pixels, one label per column."""
  from PIL import Image, ImageDraw, ImageFont
  scale = max(1, -(-tile // columns[0].shape[1]))
  up = [np.repeat(np.repeat(np.asarray(c), scale, axis=1), scale, axis=2) for c in columns]
  body = np.concatenate([np.concatenate(list(c), axis=0) for c in up], axis=1)
  body = (np.clip(body, 0, 1) * 255).round().astype(np.uint8)
  header = Image.new("RGB", (body.shape[1], GRID_HEADER), (255, 255, 255))
  draw = ImageDraw.Draw(header)
  width = up[0].shape[2]
  font = ImageFont.load_default(size=max(8, min(16, width // 12)))
  for i, label in enumerate(labels):
    draw.text((i * width + 4, 4), label, fill=(0, 0, 0), font=font)
  return np.concatenate([np.asarray(header), body], axis=0)


def _write_png(image: np.ndarray, path: Path) -> None:
  from PIL import Image
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp")
  Image.fromarray(image).save(tmp, format="PNG")
  tmp.replace(path)


class _MetricWriter:
  """TensorBoard event files (through tf.summary, outside the train step) and metrics.jsonl."""

  def __init__(self, workdir: Path):
    import tensorflow as tf
    self._tf = tf
    self._writer = tf.summary.create_file_writer(str(workdir / "tensorboard"))
    self._jsonl = open(workdir / "metrics.jsonl", "a")

  def write(self, step: int, scalars: dict[str, float]) -> None:
    with self._writer.as_default():
      for name, value in scalars.items():
        self._tf.summary.scalar(name, value, step=step)
    self._writer.flush()
    self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self._jsonl.flush()

  def image(self, name: str, image: np.ndarray, step: int) -> None:
    """image: uint8 [H, W, 3]."""
    with self._writer.as_default():
      self._tf.summary.image(name, image[None], step=step)


def _metric_writer(workdir: Path) -> _MetricWriter:
  return _MetricWriter(workdir)


# ----------------------------------------------------------------------------- latent cache


def precompute_latents(config, workdir: str | None) -> Path:
  """Job (configs/train.py with --config.job=precompute): encodes the training data once.

  Writes `config.data.latent_cache` (see latent_cache); training with that field set then runs
  only the U-Net. Images are encoded uncropped-at-random and unflipped; each process encodes
  its slice on its own devices.
  """
  if not workdir:
    raise ConfigError("--workdir is required: the frozen encoders are read from (or written to) it")
  if not config.data.latent_cache or config.data.latent_cache == "auto":
    raise ConfigError("config.data.latent_cache is required (job 'precompute'): the folder to write")
  cache = Path(config.data.latent_cache).absolute()
  if (cache / latent_cache.INDEX).exists():
    raise FileExistsError(f"config.data.latent_cache={cache}: already holds a cache")
  _initialize_distributed(config)
  workdir = Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  prepare_workdir(config, workdir)
  frozen, fparams = load_frozen(workdir, jnp.float32, ops.Kernels.from_config(config.model, "config.model"))
  return write_latent_cache(config, _builder(config, workdir), frozen, fparams, cache)


def write_latent_cache(config, builder, frozen: Frozen, fparams, cache: Path) -> Path:
  """Encodes `config.data.split` of `builder` with the frozen encoders into `cache`."""
  from mre_jax import input_pipeline
  data = config.data
  ds = input_pipeline.create_dataset(
      input_pipeline.data_source(builder, data.split), global_batch_size=config.batch_size,
      crop_size=data.crop_size, tokenize_fn=input_pipeline.clip_tokenize_fn(frozen.tokenizer), seed=config.seed,
      resize=data.resize, flip=False, shuffle=False, num_epochs=1)
  encode = jax.jit(functools.partial(encode_batch, frozen))
  fparams = jax.device_put(fparams, jax.local_devices()[0])
  rows = {f: [] for f in latent_cache.FIELDS}
  for batch in ds:
    out = jax.device_get(encode(fparams, {k: batch[k] for k in BATCH_KEYS}))
    for f in latent_cache.FIELDS:
      rows[f].append(np.asarray(out[f], np.float32))
  index, count = jax.process_index(), jax.process_count()
  shards = [f"part-{i}-of-{count}" for i in range(count)]
  latent_cache.write_shard(cache, shards[index], {f: np.concatenate(v) for f, v in rows.items()})
  _sync("latent cache written")
  if index == 0:
    latent_cache.write_index(cache, shards)
    print(f"wrote latent cache {cache}: {sum(len(v) for v in rows['scores'])} examples per process")
  _sync("latent cache indexed")
  return cache
