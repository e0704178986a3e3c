"""The training job: grain batches (per process) -> global sharded arrays -> `trainer.train_step`
(pure, jitted once with explicit shardings, state donated) -> metrics / checkpoints / samples.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import PIL.Image
from absl import logging
from tqdm import tqdm

from mre_jax import models, ops
from mre_jax.data import latent_cache
from mre_jax.errors import require_workdir
from mre_jax.eval import synthetic_eval
from mre_jax.infer import edit
from mre_jax.io import checkpointing, files, pretrained
from mre_jax.train import sharding
from mre_jax.train.precompute import write_latent_cache
from mre_jax.train.samples import make_sample_grid_fn
from mre_jax.train.setup import (build_data, cache_path, initialize_distributed, make_data_iterator, prepare_workdir,
                                 validate)
from mre_jax.train.trainer import (BATCH_KEYS, Frozen, TrainState, initial_params, load_frozen, lr_schedule,
                                   make_optimizer, train_step, training_schedule)


def _save(manager, state: TrainState, data_iter) -> None:
  step = int(jax.device_get(state.step))
  items = dict(params=ocp.args.StandardSave(state.params), ema_params=ocp.args.StandardSave(state.ema_params),
               opt_state=ocp.args.StandardSave(state.opt_state))
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iter)
  manager.save(step, args=ocp.args.Composite(**items), force=True)


def _restore(manager, abstract: TrainState, data_iter) -> TrainState:
  step = manager.latest_step()
  items = dict(params=ocp.args.StandardRestore(abstract.params),
               ema_params=ocp.args.StandardRestore(abstract.ema_params),
               opt_state=ocp.args.StandardRestore(abstract.opt_state))
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  step_array = jax.device_put(np.int32(step), abstract.step.sharding)
  return TrainState(step_array, restored["params"], restored["ema_params"], restored["opt_state"])


class _StopFlag:
  """Set by SIGTERM: the loop saves a checkpoint after the current step and exits."""

  def __init__(self):
    self.requested = False
    signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike | None) -> TrainState:
  """Job: trains `config.num_steps` optimiser steps, resuming from `workdir` if it holds a run."""
  workdir = require_workdir(workdir, "checkpoints, logs and samples are written there")
  initialize_distributed(config)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  validate(config, mesh.size)
  workdir.mkdir(parents=True, exist_ok=True)
  spec, loaded_params, unet, frozen, fparams = _load_models(config, workdir)
  tx = make_optimizer(config.optim, config.num_steps)
  abstract, state_sh = _state_shardings(unet, tx, mesh, config.mesh.fsdp_min_size)
  repl = sharding.replicated(mesh)
  fparams = sharding.place(fparams, jax.tree_util.tree_map(lambda _: repl, fparams))
  builder, data_iter, sample_batch = _make_data(config, workdir, frozen, fparams)
  manager = checkpointing.make_manager(workdir, max_to_keep=config.checkpoint.keep,
                                       async_save=config.checkpoint.async_save)
  if manager.latest_step() is not None:
    state = _restore(manager, abstract, data_iter)
    if jax.process_index() == 0:
      print(f"resuming from step {int(jax.device_get(state.step))} of {workdir}", flush=True)
  else:
    state = _initial_state(initial_params(config, spec) if loaded_params is None else loaded_params, tx, state_sh)
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
    synthetic_eval.evaluate_run(config, workdir, builder, config.num_steps)
  return state


# ----------------------------------------------------------------------------- before the loop


def _load_models(config: ml_collections.ConfigDict, workdir: Path
                 ) -> tuple[checkpointing.ModelSpec, Any, models.RewardUNet, Frozen, dict]:
  """(spec, U-Net params loaded to learn the spec or None, the U-Net, frozen modules, their host
  params) of the workdir, whose frozen parts and spec are written on the first run."""
  spec, loaded_params = prepare_workdir(config, workdir)
  kernels = ops.Kernels.from_config(config.model, "config.model")
  spec = dataclasses.replace(spec, kernels=kernels)
  if jax.process_index() == 0 and not checkpointing.is_checkpoint(workdir):
    checkpointing.write_spec(workdir, spec)
  frozen, fparams = load_frozen(workdir, models.DTYPES[config.model.dtype], kernels)
  vae_config = pretrained.read_config(checkpointing.frozen_dir(workdir) / "vae")
  edit.check_channels(spec.unet, int(vae_config.get("latent_channels", 4)),
                      f"{workdir} (config.model.unet.in_channels / out_channels)")
  unet = models.RewardUNet(spec.unet, reward=spec.reward, dtype=models.DTYPES[config.model.dtype],
                           remat=config.model.remat, reward_dropout=config.model.reward_dropout, kernels=kernels)
  return spec, loaded_params, unet, frozen, fparams


def _state_shardings(unet: models.RewardUNet, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                     fsdp_min_size: int) -> tuple[TrainState, TrainState]:
  """(the TrainState's abstract arrays, carrying their shardings; the shardings), derived from shapes."""
  param_shapes = models.unet_param_shapes(unet)
  abstract = jax.eval_shape(lambda p: TrainState(jnp.zeros((), jnp.int32), p, p, tx.init(p)), param_shapes)
  state_sh = sharding.tree_shardings(abstract, mesh, fsdp_min_size)
  abstract = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
  return abstract, state_sh


def _make_data(config: ml_collections.ConfigDict, workdir: Path, frozen: Frozen, fparams: dict
               ) -> tuple[Any, grain.DatasetIterator, dict[str, np.ndarray] | None]:
  """(TFDS builder or None when nothing needs it, batch iterator, sample-grid batch or None); the
  latent cache is written first when config.data.latent_cache is "auto" and there is none yet."""
  cache = cache_path(config, workdir)
  have_cache = bool(cache) and (Path(cache) / latent_cache.INDEX).exists()
  builder = build_data(config, workdir) if not have_cache or config.sample.every or config.eval.count else None
  if cache and not have_cache and config.data.latent_cache != "auto":
    raise FileNotFoundError(f"config.data.latent_cache={cache}: no latent cache there (make one with "
                            "--config.job=precompute, or set it to 'auto')")
  if cache:  # the frozen params on the host, once: to write the cache, or to check whose it is
    host = jax.device_get(fparams)
    if have_cache:
      latent_cache.check_source(cache, latent_cache.describe_source(config.data, host["vae"], host["text"]))
    else:
      write_latent_cache(config, builder, frozen, host, Path(cache))
  data_iter, sample_batch = make_data_iterator(config, frozen, workdir, builder)
  return builder, data_iter, sample_batch


def _initial_state(host_params: Any, tx: optax.GradientTransformation, state_sh: TrainState) -> TrainState:
  """Step 0: `host_params` as params and EMA params, placed by `state_sh`, and a fresh optimiser state."""
  params, ema = sharding.place(host_params, state_sh.params), sharding.place(host_params, state_sh.ema_params)
  opt_state = jax.jit(tx.init, out_shardings=state_sh.opt_state)(params)
  return TrainState(jax.device_put(np.int32(0), state_sh.step), params, ema, opt_state)


# ----------------------------------------------------------------------------- the loop


def _loop(config, workdir, state, step_fn, fparams, data_iter, manager, mesh, sample_fn) -> TrainState:
  """Steps from the state's step to `config.num_steps`; returns the last state.

  The step metrics stay on device until a log step, a checkpoint save or the last step, then come
  to the host in one transfer. A metrics.jsonl / TensorBoard line at step s holds the step metrics
  (loss, grad_norm, ema_decay) averaged over the steps since the previous line (this process's
  steps: a resumed run starts its first interval at the resumed step), `lr` of step s, and
  `images_per_sec` over that interval.
  """
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
  t0, images = time.time(), 0
  pending, interval, last = [], [], {}  # device metrics not yet fetched; fetched since the last log line
  for step in range(start + 1, config.num_steps + 1):
    state, metrics = step_fn(state, _next_batch(data_iter, config, mesh), fparams, rng)
    pending.append((step, metrics))
    images += config.batch_size
    log_now = step % config.log_every == 0 or step == config.num_steps
    stopping = stop.requested  # read once: a SIGTERM between two reads must not skip the save
    save_now = step % config.checkpoint.every == 0 or step == config.num_steps or stopping
    if log_now or save_now:  # the host waits here only: a non-finite loss stops the run before a save
      interval += _fetch_metrics(pending)
      pending, last = [], interval[-1]
    if log_now:
      _log_interval(config, step, interval, images / max(time.time() - t0, 1e-9), writer, bar)
      t0, images, interval = time.time(), 0, []
    bar.update(1)
    if sample_fn is not None and config.sample.every and (step % config.sample.every == 0 or step == config.num_steps):
      _write_grid(sample_fn(state.ema_params, fparams), step, workdir, writer)
    if save_now:
      _save(manager, state, data_iter)
    if stopping:
      logging.warning("SIGTERM: saved step %d and stopped", step)
      break
  bar.close()
  if main_process:
    print(f"done: step {int(jax.device_get(state.step))}/{config.num_steps}, "
          f"loss {float(last.get('loss', float('nan'))):.4f}, checkpoints in {workdir / checkpointing.STATE_DIR}")
  return state


def _next_batch(data_iter: grain.DatasetIterator, config: ml_collections.ConfigDict,
                mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """This process's next batch as global arrays over `mesh`: the fields the step reads."""
  local = next(data_iter)
  keys = latent_cache.FIELDS if config.data.latent_cache else BATCH_KEYS
  return sharding.global_batch({k: local[k] for k in keys}, mesh)


def _log_interval(config: ml_collections.ConfigDict, step: int, interval: list[dict[str, np.ndarray]], rate: float,
                  writer: _MetricWriter | None, bar: tqdm) -> None:
  """The metrics line of `step`: the interval's mean step metrics, its images/s and the lr of `step`."""
  lr = float(lr_schedule(config.optim, config.num_steps)(step - 1))
  scalars = {**_mean_metrics(interval), "images_per_sec": rate, "lr": lr}
  if writer is not None:
    writer.write(step, scalars)
  bar.set_postfix(loss=f"{scalars['loss']:.4f}", img_s=f"{rate:.1f}")


def _write_grid(grid: np.ndarray, step: int, workdir: Path, writer: _MetricWriter | None) -> None:
  """The sample grid (uint8 [H, W, 3]) of `step` as samples/step_<step>.png and in TensorBoard, by
  the main process (the one with a `writer`)."""
  if writer is not None:
    files.write_image(workdir / "samples" / f"step_{step:07d}.png", grid)
    writer.image("samples", grid, step)


def _fetch_metrics(pending: list[tuple[int, dict]]) -> list[dict[str, np.ndarray]]:
  """Host copies of the metrics of `pending` (step, device metrics) pairs, in one transfer.

  Raises FloatingPointError naming the first step whose loss is NaN or inf: the loop fetches before
  every save, so no saved state has taken a step with a non-finite loss.
  """
  fetched = jax.device_get([metrics for _, metrics in pending])
  for (step, _), metrics in zip(pending, fetched):
    if not np.isfinite(metrics["loss"]):
      raise FloatingPointError(f"step {step}: loss is {metrics['loss']}; stopping (this state is not saved)")
  return fetched


def _mean_metrics(interval: list[dict[str, np.ndarray]]) -> dict[str, float]:
  """Each step metric (loss, grad_norm, ema_decay: scalars) averaged over the steps of `interval`."""
  return {k: float(np.mean([m[k] for m in interval])) for k in interval[0]}


class _MetricWriter:
  """TensorBoard event files and metrics.jsonl. The events are written with TensorBoard's own
  writer and protos (as torch.utils.tensorboard does), so training needs no TensorFlow: a GPU
  machine with JAX alone trains from data built elsewhere."""

  def __init__(self, workdir: Path):
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer import event_file_writer
    self._event, self._summary = event_pb2.Event, summary_pb2.Summary
    self._writer = event_file_writer.EventFileWriter(str(workdir / "tensorboard"))
    self._jsonl = open(workdir / "metrics.jsonl", "a")

  def _add(self, step: int, values: list) -> None:
    self._writer.add_event(self._event(wall_time=time.time(), step=step, summary=self._summary(value=values)))
    self._writer.flush()

  def write(self, step: int, scalars: dict[str, float]) -> None:
    self._add(step, [self._summary.Value(tag=name, simple_value=float(value)) for name, value in scalars.items()])
    self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self._jsonl.flush()

  def image(self, name: str, image: np.ndarray, step: int) -> None:
    """image: uint8 [H, W, 3], stored PNG-encoded."""
    buf = io.BytesIO()
    PIL.Image.fromarray(image).save(buf, format="PNG")
    encoded = self._summary.Image(height=image.shape[0], width=image.shape[1], colorspace=3,
                                  encoded_image_string=buf.getvalue())
    self._add(step, [self._summary.Value(tag=name, image=encoded)])


def _metric_writer(workdir: Path) -> _MetricWriter:
  return _MetricWriter(workdir)
