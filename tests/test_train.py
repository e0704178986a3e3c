"""Training: runs, resumes exactly (also after SIGKILL), shards, stops on NaN, rejects bad configs."""

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import numpy as np
import pytest
from PIL import Image

from configs import train as train_config
from mre_jax import testing
from mre_jax.errors import ConfigError
from mre_jax.io import checkpointing
from mre_jax.train import loop, precompute, samples, trainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  from mre_jax.data import input_pipeline
  path = tmp_path_factory.mktemp("tfds")
  input_pipeline.build_dataset("synthetic_edit", str(path), config="tiny")
  return str(path)


def _config(tfds_dir, **overrides):
  config = train_config.get_config("tiny")
  config.data.data_dir = tfds_dir
  config.data.builder_config = "tiny"
  config.batch_size = 4
  config.num_steps = 6
  config.checkpoint.every = 1
  config.checkpoint.async_save = False
  config.log_every = 2
  config.sample.every = 0
  for key, value in overrides.items():
    target = config
    *path, leaf = key.split(".")
    for p in path:
      target = target[p]
    target[leaf] = value
  return config


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(tree))]


def _assert_trees_equal(got, want):
  """Every leaf of two trees of the same structure (no silent zip truncation) is bit-identical."""
  got, want = jax.device_get(got), jax.device_get(want)
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree_util.tree_leaves(want)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def _cli_flags(tfds_dir, workdir, steps):
  """main.py's flags for the tests' training run (the `reference` fixture's settings but the checkpoints)."""
  return ["--config=configs/train.py:tiny", f"--workdir={workdir}", f"--config.data.data_dir={tfds_dir}",
          "--config.data.builder_config=tiny", "--config.batch_size=4", f"--config.num_steps={steps}",
          "--config.log_every=1", "--config.sample.every=0"]


SYNC_EVERY_STEP = ["--config.checkpoint.every=1", "--config.checkpoint.async_save=False"]

# Runs main.py (flags after the first two arguments) and holds it at a chosen point, so that a test
# signals it at a known step instead of racing a clock. Writes the marker file once it holds.
#   kill:N    hold forever when step N asks for its batch (steps 1..N-1 done)
#   commit:N  hold forever in the rename that would commit checkpoint N (its files are written)
#   sigterm:N hold when step N asks for its batch, until SIGTERM arrived (the run's own handler
#             runs too), then go on
_HELD_RUN = """
import os, runpy, signal, sys, threading, time
from mre_jax.train import sharding
marker, (mode, n) = sys.argv[1], sys.argv[2].split(":")
n, calls = int(n), [0]

def hold():
  if mode != "sigterm":
    open(marker, "w").close()
    threading.Event().wait()
  arrived, previous = [], signal.getsignal(signal.SIGTERM)
  signal.signal(signal.SIGTERM, lambda *a: (arrived.append(1), previous(*a)))
  open(marker, "w").close()
  while not arrived:
    time.sleep(0.01)  # sleep returns to run the handler; the wait ends on the signal, not a clock
  signal.signal(signal.SIGTERM, previous)

real_batch = sharding.global_batch
def global_batch(*args, **kwargs):
  calls[0] += 1
  if mode in ("kill", "sigterm") and calls[0] == n:
    hold()
  return real_batch(*args, **kwargs)
sharding.global_batch = global_batch

def held_rename(real):
  def rename(src, dst, *args, **kwargs):
    if mode == "commit" and os.path.basename(os.fspath(dst)) == str(n):
      hold()
    return real(src, dst, *args, **kwargs)
  return rename
os.rename, os.replace = held_rename(os.rename), held_rename(os.replace)
sys.argv = ["main.py"] + sys.argv[3:]
runpy.run_path("main.py", run_name="__main__")
"""


def _start_held(flags, hold, marker, **popen):
  """Starts main.py with `flags` under _HELD_RUN; returns the process once it holds at `hold`."""
  proc = subprocess.Popen([sys.executable, "-c", _HELD_RUN, str(marker), hold, *flags], cwd=ROOT, **popen)
  while not marker.exists():
    assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before it held at {hold}"
    time.sleep(0.05)
  return proc


def _saved_steps(workdir):
  return sorted(int(p.name) for p in (workdir / "state").iterdir() if p.name.isdigit())


def _logged_steps(workdir):
  return [json.loads(l)["step"] for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def _restart(tfds_dir, workdir, capsys, saved):
  """Restarts a stopped run to the reference's 6 steps; checks that it began at the saved step."""
  logged_before = len(_logged_steps(workdir))
  capsys.readouterr()
  state = loop.train_and_evaluate(_config(tfds_dir, log_every=1), str(workdir))
  out = capsys.readouterr().out
  assert f"resuming from step {saved} of {workdir}" in out, out
  # its metrics: one line per step after the saved one, none repeated (log_every=1)
  assert _logged_steps(workdir)[logged_before:] == list(range(saved + 1, 7))
  assert "done: step 6/6" in out
  return state


@pytest.fixture(scope="module")
def reference(tfds_dir, tmp_path_factory):
  """An uninterrupted 6-step run that saves every step: (workdir, final state)."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  return workdir, loop.train_and_evaluate(_config(tfds_dir, **{"sample.every": 6}), str(workdir))


def _copy_run(reference, target, last_step):
  shutil.copytree(reference, target)
  for p in (target / "state").iterdir():
    if p.name.isdigit() and int(p.name) > last_step:
      shutil.rmtree(p)
  return target


def _check_tensorboard(workdir, lines, grid):
  """The event files, read by TensorFlow's reader (not by the writer's code): the scalars of
  metrics.jsonl at their steps and the sample grid as a PNG."""
  import tensorflow as tf
  scalars, images = {}, []
  for path in sorted((workdir / "tensorboard").iterdir()):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for v in event.summary.value:
        if v.HasField("image"):
          images.append((event.step, v.tag, tf.io.decode_png(v.image.encoded_image_string).numpy()))
        elif v.HasField("simple_value"):
          scalars[(event.step, v.tag)] = v.simple_value
  expected = {(l["step"], k): v for l in lines for k, v in l.items() if k != "step"}
  assert scalars.keys() == expected.keys()
  np.testing.assert_allclose([scalars[k] for k in expected], list(expected.values()), rtol=1e-6)
  assert [(step, tag) for step, tag, _ in images] == [(6, "samples")]
  np.testing.assert_array_equal(images[0][2], grid)


def test_train_writes_checkpoints_logs_and_learns(reference, tfds_dir):
  workdir, state = reference
  assert int(state.step) == 6 and checkpointing.is_checkpoint(workdir)
  assert sorted(int(p.name) for p in (workdir / "state").iterdir()) == [4, 5, 6]  # keep=3
  assert list((workdir / "tensorboard").iterdir())
  grid = np.asarray(Image.open(workdir / "samples" / "step_0000006.png"))
  # A 24 px header, then 4 held-out examples x (input | truth | target | edit@5,5,5 | edit@own).
  assert grid.shape == (24 + 4 * 32, 5 * 32, 3)
  assert (grid[:24] < 128).any() and (grid[:24] == 255).mean() > 0.8  # dark labels on white
  from mre_jax.data import input_pipeline
  first = input_pipeline.data_source(input_pipeline.build_dataset("synthetic_edit", tfds_dir, config="tiny"), "test")[0]
  np.testing.assert_array_equal(grid[24:56, :32], first["original"])
  np.testing.assert_array_equal(grid[24:56, 32:64], first["truth"])
  np.testing.assert_array_equal(grid[24:56, 64:96], first["edited"])
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [2, 4, 6] and all(np.isfinite(l["loss"]) for l in lines)
  _check_tensorboard(workdir, lines, grid)
  _, params = checkpointing.restore_params(workdir, use_ema=False)
  _, ema = checkpointing.restore_params(workdir, use_ema=True)
  assert any(np.abs(a - b).max() > 0 for a, b in zip(_leaves(params), _leaves(ema)))
  # it learns: on fixed examples, noise and timesteps the loss falls (measured: 1.107 -> 0.969)
  initial, trained = _fixed_batch_loss(workdir, tfds_dir, [_initial_params(workdir), params])
  assert trained < 0.95 * initial, (initial, trained)


def _fixed_batch(workdir, tfds_dir, prediction_type=None):
  """(U-Net, frozen parts (with `prediction_type` in their scheduler config, if given), their params,
  the first 16 training examples) of a run."""
  import dataclasses
  from mre_jax import models
  from mre_jax.data import input_pipeline, tokens
  spec = checkpointing.read_spec(workdir)
  frozen, fparams = trainer.load_frozen(workdir, np.float32)
  if prediction_type:
    frozen = dataclasses.replace(frozen, scheduler_config={**frozen.scheduler_config, "prediction_type": prediction_type})
  source = input_pipeline.data_source(input_pipeline.build_dataset("synthetic_edit", tfds_dir, config="tiny"), "train")
  batch = input_pipeline.create_dataset(
      source, global_batch_size=16, crop_size=32, tokenize_fn=tokens.tokenize_fn(frozen.tokenizer),
      seed=0, flip=False, shuffle=False, process_index=0, process_count=1)[0]
  return (models.RewardUNet(spec.unet, reward=spec.reward), frozen, fparams,
          {k: batch[k] for k in trainer.BATCH_KEYS})


def _fixed_batch_loss(workdir, tfds_dir, param_sets) -> list[float]:
  """The training loss of each U-Net params tree on the first 16 training examples, with the
  same noise, timesteps and dropout for all (the mean over 4 draws)."""
  from mre_jax.infer import diffusion
  unet, frozen, fparams, batch = _fixed_batch(workdir, tfds_dir)
  loss_fn = jax.jit(functools.partial(trainer.loss_fn, unet=unet, frozen=frozen, fparams=fparams,
                                      schedule=diffusion.make_schedule(), config=_config(tfds_dir)))
  keys = jax.random.split(jax.random.PRNGKey(1), 4)
  return [float(np.mean([loss_fn(params, batch, k) for k in keys])) for params in param_sets]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_snr_gamma_weights_each_example_by_its_own_timestep(reference, tfds_dir, prediction_type):
  """loss_fn with config.snr_gamma = 5 is the mean of the per-example losses times Min-SNR-5 weights
  computed here from SD 1.5's schedule by hand; with 0 it is their plain mean."""
  from mre_jax.infer import diffusion
  workdir = reference[0]
  unet, frozen, fparams, batch = _fixed_batch(workdir, tfds_dir, prediction_type)
  _, params = checkpointing.restore_params(workdir, use_ema=False)
  kwargs = dict(unet=unet, frozen=frozen, fparams=fparams, schedule=diffusion.make_schedule())
  key = jax.random.PRNGKey(3)
  losses, t = trainer.per_example_loss(params, batch, key, config=_config(tfds_dir), **kwargs)
  losses, t = np.asarray(losses, np.float64), np.asarray(t)
  assert losses.shape == t.shape == (16,) and len(set(t.tolist())) > 8
  alpha_bar = np.cumprod(1 - np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2)[t]  # scaled_linear
  snr = alpha_bar / (1 - alpha_bar)
  weights = np.minimum(snr, 5.0) / (snr if prediction_type == "epsilon" else snr + 1)
  expected = np.mean(losses * weights)
  assert abs(expected - np.mean(losses) * np.mean(weights)) > 1e-3 * expected  # the per-example pairing matters
  weighted = trainer.loss_fn(params, batch, key, config=_config(tfds_dir, snr_gamma=5.0), **kwargs)
  np.testing.assert_allclose(float(weighted), expected, rtol=1e-4)
  plain = trainer.loss_fn(params, batch, key, config=_config(tfds_dir), **kwargs)
  np.testing.assert_allclose(float(plain), np.mean(losses), rtol=1e-5)


def test_resume_from_a_checkpoint_ends_with_the_uninterrupted_parameters(reference, tfds_dir, tmp_path, capsys):
  workdir = _copy_run(reference[0], tmp_path / "run", last_step=4)
  # what a run stopped after its step-4 save has logged
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  (workdir / "metrics.jsonl").write_text("".join(l + "\n" for l in lines if json.loads(l)["step"] <= 4))
  resumed = _restart(tfds_dir, workdir, capsys, saved=4)
  assert _logged_steps(workdir) == [2, 4, 5, 6]
  _assert_trees_equal(resumed, reference[1])  # params, EMA, optimiser state, step


def test_rerunning_a_finished_run_says_it_is_complete(reference, tfds_dir, tmp_path, capsys):
  workdir = _copy_run(reference[0], tmp_path / "run", last_step=6)
  logged = (workdir / "metrics.jsonl").read_text()
  capsys.readouterr()
  state = loop.train_and_evaluate(_config(tfds_dir), str(workdir))
  out = capsys.readouterr().out
  assert f"resuming from step 6 of {workdir}" in out
  assert "the run is already complete at step 6 (config.num_steps=6)" in out, out
  assert "done:" not in out and "nan" not in out
  assert (workdir / "metrics.jsonl").read_text() == logged and _saved_steps(workdir) == [4, 5, 6]
  _assert_trees_equal(state, reference[1])


def test_sigkill_then_restart_ends_with_the_uninterrupted_parameters(reference, tfds_dir, tmp_path, capsys):
  workdir = tmp_path / "killed"
  proc = _start_held(_cli_flags(tfds_dir, workdir, 6) + SYNC_EVERY_STEP, "kill:4", tmp_path / "held",
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  proc.send_signal(signal.SIGKILL)  # steps 1-3 done and saved, step 4 about to run
  proc.wait()
  assert _saved_steps(workdir) == [1, 2, 3] and _logged_steps(workdir) == [1, 2, 3]
  _assert_trees_equal(_restart(tfds_dir, workdir, capsys, saved=3), reference[1])


def test_sigkill_during_an_async_save_restarts_from_the_last_complete_checkpoint(reference, tfds_dir, tmp_path,
                                                                                 capsys):
  workdir = tmp_path / "killed"
  flags = _cli_flags(tfds_dir, workdir, 6) + ["--config.checkpoint.every=2"]  # async_save: the default
  proc = _start_held(flags, "commit:4", tmp_path / "held", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  proc.send_signal(signal.SIGKILL)  # checkpoint 4 written but not committed
  proc.wait()
  assert _saved_steps(workdir) == [2]
  assert [p.name for p in (workdir / "state").iterdir() if p.name.startswith("4.")]  # the unfinished save
  _assert_trees_equal(_restart(tfds_dir, workdir, capsys, saved=2), reference[1])


def test_sigterm_with_default_checkpointing_saves_the_step_reached_and_restarts_from_it(reference, tfds_dir,
                                                                                       tmp_path, capsys):
  workdir = tmp_path / "term"
  config = train_config.get_config("tiny").checkpoint
  assert (config.every, config.async_save) == (100, True)  # the run below keeps these defaults
  proc = _start_held(_cli_flags(tfds_dir, workdir, 10_000), "sigterm:3", tmp_path / "held",
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  proc.send_signal(signal.SIGTERM)  # step 3 is held until it arrives, then runs
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-2000:]
  assert "SIGTERM: saved step 3 and stopped" in err and "done: step 3/10000" in out, err[-2000:]
  assert _saved_steps(workdir) == [3] and _logged_steps(workdir) == [1, 2, 3]
  # the run's settings but num_steps, which does not change a step (constant lr): the reference's steps 4-6
  _assert_trees_equal(_restart(tfds_dir, workdir, capsys, saved=3), reference[1])


def _saved_state(workdir) -> dict:
  """{"params", "ema_params", "opt_state"} of a run's latest checkpoint as numpy trees on this process.

  The optimiser state is restored into the structure optax builds (`opt_state[1][0]` is Adam's).
  """
  import orbax.checkpoint as ocp
  step, params = checkpointing.restore_params(workdir, use_ema=False)
  _, ema = checkpointing.restore_params(workdir, use_ema=True)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.eval_shape(trainer.make_optimizer(train_config.get_config("tiny").optim).init, params)
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
  handler = ocp.StandardCheckpointHandler()
  try:
    opt_state = handler.restore(workdir / "state" / str(step) / "opt_state", args=ocp.args.StandardRestore(abstract))
  finally:
    handler.close()
  return jax.device_get({"step": step, "params": params, "ema_params": ema, "opt_state": opt_state})


def _initial_params(workdir):
  return trainer.initial_params(train_config.get_config("tiny"), checkpointing.read_spec(workdir))


def _rel(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def _assert_same_training(got: dict, want: dict, initial) -> None:
  """Two runs of the same steps on different device layouts (`_saved_state`s) trained alike.

  Leaf by leaf, relative: the updates (params and EMA params minus `initial`) within 1e-2 and
  Adam's moments within 1e-3. Float rounding alone moved no update by more than 1e-3 of it and no
  moment by 1e-4 (measured after 6 steps: updates 3.4e-4 with 8 devices, 9.5e-4 with 2 processes;
  moments 8.4e-5 and 5.3e-5); a garbled batch shard is off by ~1 (checked: 1.33), as is a run
  that never updated. (A gradient summed instead of averaged is clipped back to the same update
  here: `_assert_same_metrics` compares the norms before clipping.) Leaves whose gradient is zero
  in exact arithmetic (biases before a GroupNorm, the attention's key bias) hold only rounding
  noise, which Adam turns into updates of up to lr per step: both runs must find that gradient
  zero, and keep those updates in bound.
  """
  assert got["step"] == want["step"] >= 5
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  adam_got, adam_want = got["opt_state"][1][0], want["opt_state"][1][0]
  np.testing.assert_array_equal(adam_got.count, adam_want.count)
  flat = lambda tree: {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  init, mu, nu = flat(initial), flat(adam_want.mu), flat(adam_want.nu)
  mu_got, nu_got = flat(adam_got.mu), flat(adam_got.nu)
  scale = np.sqrt(np.mean(np.concatenate([v.ravel() for v in mu.values()]) ** 2))  # rms of the first moments
  bound = want["step"] * train_config.get_config("tiny").optim.lr
  gradient_free = 0
  for tree in ("params", "ema_params"):
    for name, value in flat(got[tree]).items():
      update, want_update = value - init[name], flat(want[tree])[name] - init[name]
      if np.sqrt(np.mean(mu[name] ** 2)) < 1e-4 * scale:  # no gradient in exact arithmetic
        gradient_free += tree == "params"
        assert np.abs(mu_got[name]).max() < 1e-4 * scale, f"{name}: a gradient where the reference has none"
        assert np.abs(update).max() <= bound and np.abs(want_update).max() <= bound, name
        continue
      assert _rel(update, want_update) < 1e-2, f"{tree}{name}: update off by {_rel(update, want_update):.2e}"
      assert _rel(mu_got[name], mu[name]) < 1e-3, f"mu{name}: off by {_rel(mu_got[name], mu[name]):.2e}"
      assert _rel(nu_got[name], nu[name]) < 1e-3, f"nu{name}: off by {_rel(nu_got[name], nu[name]):.2e}"
  assert gradient_free < len(mu) // 10, gradient_free  # the rule above covers a few leaves, not the tree


def _assert_same_metrics(workdir, reference_workdir, steps) -> None:
  """The same loss and gradient norm at every logged step. The norm is taken before clipping, so
  it shows a gradient summed over devices instead of averaged, which clipping at 1.0 would hide
  from the parameters here (the tiny model's gradient norms are ~3)."""
  got, want = ([json.loads(l) for l in (w / "metrics.jsonl").read_text().splitlines()]
               for w in (workdir, reference_workdir))
  assert [l["step"] for l in got] == [l["step"] for l in want] == steps
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose([l[key] for l in got], [l[key] for l in want], rtol=1e-4, err_msg=key)


def test_two_processes_train_together_and_match_one_process(reference, tfds_dir, tmp_path):
  workdir = tmp_path / "multi"
  # The coordinator's port: bound here (port 0, read back) and held for the whole run with
  # SO_REUSEPORT, which the coordinator's gRPC server also sets: it binds the same port, and no
  # other program can take it between here and there. This socket never listens, so every
  # connection reaches the coordinator.
  with socket.socket() as held:
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    held.bind(("127.0.0.1", 0))
    port = held.getsockname()[1]
    procs = [subprocess.Popen(
        [sys.executable, "main.py", *_cli_flags(tfds_dir, workdir, 6), "--config.log_every=2",
         "--config.distributed.initialize=True", f"--config.distributed.coordinator_address=127.0.0.1:{port}",
         "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
    errors = [p.communicate(timeout=400)[1] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], errors[0][-3000:] + errors[1][-3000:]
  # one log, written by process 0, with the 1-process run's figures for the same global batches
  _assert_same_metrics(workdir, reference[0], steps=[2, 4, 6])
  _assert_same_training(_saved_state(workdir), _saved_state(reference[0]), _initial_params(workdir))


def test_export_and_edit_use_the_ema_parameters_unless_told_otherwise(reference, tmp_path):
  """After 6 steps the EMA params differ from the raw ones: the exported U-Net and the editor's are
  the EMA tree by default, the raw tree with use_ema=False (compared with the run's own state)."""
  from configs import export as export_config
  from mre_jax.infer import edit
  from mre_jax.io import export
  from mre_jax.jobs import export as export_job
  workdir, state = reference
  assert all(np.abs(a - b).max() > 0 for a, b in zip(_leaves(state.params), _leaves(state.ema_params)))
  in_channels = checkpointing.read_spec(workdir).unet.in_channels
  for use_ema, want in ((None, state.ema_params), (True, state.ema_params), (False, state.params)):
    config = export_config.get_config()
    config.checkpoint, config.output_dir = str(workdir), str(tmp_path / f"export_{use_ema}")
    if use_ema is not None:
      config.use_ema = use_ema
    exported = export.unet_from_diffusers(export_job.export(config), in_channels=in_channels)[1]
    _assert_trees_equal(exported, want)
    kwargs = {} if use_ema is None else {"use_ema": use_ema}
    _assert_trees_equal(edit.load_editor(workdir, **kwargs).unet_params, want)


def test_interrupted_save_is_never_picked_up(reference, tmp_path):
  workdir = _copy_run(reference[0], tmp_path / "run", last_step=5)
  (workdir / "state" / "9.orbax-checkpoint-tmp-1234").mkdir()  # a save killed mid-write
  assert checkpointing.restore_params(workdir)[0] == 5


@pytest.mark.parametrize("overrides", [
    {},  # a save every step: each step's metrics come to the host alone
    # no log step before the end: steps 5 and 6 come to the host together before the save at 6
    {"num_steps": 8, "checkpoint.every": 2, "log_every": 100},
])
def test_nan_loss_stops_naming_the_step_and_is_not_saved(reference, tfds_dir, tmp_path, monkeypatch, overrides):
  workdir = _copy_run(reference[0], tmp_path / "run", last_step=4)
  real_loss = trainer.loss_fn
  monkeypatch.setattr(trainer, "loss_fn", lambda *a, **kw: real_loss(*a, **kw) * np.nan)
  with pytest.raises(FloatingPointError, match="step 5: loss is nan"):
    loop.train_and_evaluate(_config(tfds_dir, **overrides), str(workdir))
  assert checkpointing.restore_params(workdir)[0] == 4


def test_metrics_reach_the_host_at_log_steps_and_the_grid_is_traced_once(tfds_dir, tmp_path, monkeypatch,
                                                                         sampler_traces):
  """log_every=3, one save (at the end), a grid every 2 steps: the step metrics come to the host in
  two transfers of 3 steps each, and the grid's program is traced at the first of its 3 grids."""
  real_get, fetched = jax.device_get, []  # the losses of each transfer that holds any

  def device_get(tree):
    got = real_get(tree)
    losses = [x for path, x in jax.tree_util.tree_flatten_with_path(got)[0]
              if jax.tree_util.keystr(path).endswith("['loss']")]
    if losses:
      fetched.append(losses)
    return got

  monkeypatch.setattr(jax, "device_get", device_get)
  chex.clear_trace_counter()
  monkeypatch.setattr(samples, "_grid_edits", chex.assert_max_traces(samples._grid_edits, n=1))
  real_grid, traces, guidance = samples._sample_grid, [], []
  monkeypatch.setattr(samples, "_sample_grid",
                      lambda *a: (real_grid(*a), traces.append(sum(sampler_traces.since().values())),
                                  guidance.append(a[1]["guidance"].tolist()))[0])
  loop.train_and_evaluate(_config(tfds_dir, **{"log_every": 3, "checkpoint.every": 6, "sample.every": 2,
                                               "sample.text_guidance": 2.5, "sample.image_guidance": 1.25}),
                          str(tmp_path))
  assert [len(losses) for losses in fetched] == [3, 3]
  assert traces == [1, 1, 1], traces  # sampler traces after each grid: one, at the first
  assert guidance == [[2.5, 1.25]] * 3  # the config's, not the release's 7.5 / 1.5
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [3, 6]
  # a line holds the mean over its interval's steps
  np.testing.assert_allclose([l["loss"] for l in lines], [np.mean(losses) for losses in fetched], rtol=1e-6)


def test_latent_cache_holds_the_frozen_encoders_outputs_and_trains(tfds_dir, tmp_path):
  from mre_jax.data import input_pipeline, latent_cache, tokens
  from mre_jax.io import pretrained
  cache = str(tmp_path / "cache")
  precompute.precompute_latents(_config(tfds_dir, **{"data.latent_cache": cache}), str(tmp_path / "encoders"))
  with pytest.raises(FileExistsError, match="already holds a cache"):
    precompute.precompute_latents(_config(tfds_dir, **{"data.latent_cache": cache}), str(tmp_path / "encoders"))
  # independent of the job: encode the first examples here and compare
  frozen, fparams = trainer.load_frozen(tmp_path / "encoders", np.float32)
  source = input_pipeline.data_source(input_pipeline.build_dataset("synthetic_edit", tfds_dir, config="tiny"), "train")
  images = input_pipeline.create_dataset(
      source, global_batch_size=4, crop_size=32, tokenize_fn=tokens.tokenize_fn(frozen.tokenizer),
      seed=0, flip=False, shuffle=False, process_index=0, process_count=1)[0]
  expected = trainer.encode_batch(frozen, fparams, {k: images[k] for k in trainer.BATCH_KEYS})
  cached = latent_cache.CacheSource(cache)
  assert len(cached) == len(source)
  for i in range(4):
    row = cached[i]
    for field in ("latent_mean", "latent_logvar", "cond", "reward_embeds", "scores"):
      np.testing.assert_allclose(row[field], expected[field][i], rtol=1e-4, atol=1e-5)
    # the instruction is one of the example's wordings, fixed in the cache
    wordings = [w.decode() for w in source[i]["instructions"]]
    contexts = pretrained.encode_text(frozen.text_encoder, fparams["text"],
                                      tokens.tokenize(frozen.tokenizer, wordings))[0]
    assert min(np.abs(np.asarray(c) - row["context"]).max() for c in contexts) < 1e-4
  state = loop.train_and_evaluate(_config(tfds_dir, **{"data.latent_cache": cache, "num_steps": 2}),
                                   str(tmp_path / "cached"))
  assert int(state.step) == 2
  assert all(np.isfinite(json.loads(l)["loss"]) for l in (tmp_path / "cached" / "metrics.jsonl").read_text().splitlines())
  # the cache records what made it: other encoders (the tiny config's random ones follow the seed)
  # or other data settings are refused before training, naming the difference
  with pytest.raises(ValueError, match="another vae encoder"):
    loop.train_and_evaluate(_config(tfds_dir, **{"data.latent_cache": cache, "num_steps": 2, "seed": 1}),
                            str(tmp_path / "other_seed"))
  with pytest.raises(ValueError, match=r"config.data.resize='square' \(the cache: 'short_side'\)"):
    loop.train_and_evaluate(_config(tfds_dir, **{"data.latent_cache": cache, "num_steps": 2, "data.resize": "square"}),
                            str(tmp_path / "other_resize"))
  assert not (tmp_path / "other_seed" / "metrics.jsonl").exists()


def test_latent_cache_source_ignores_the_decoder_and_old_caches_are_read_unchecked(tmp_path, capsys):
  from mre_jax.data import latent_cache
  from mre_jax.io import pretrained
  from mre_jax.models import tiny
  data = train_config.get_config().data
  _, vae = pretrained.load_vae(tiny.vae_folder("synthetic_64px"))
  text = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
  source = latent_cache.describe_source(data, vae, text)
  bump = lambda tree: jax.tree_util.tree_map(lambda x: np.asarray(x) + np.float32(1e-3), tree)
  # a new decoder (synthetic_64px_sharp's case) reads the same cache; a new encoder or text encoder does not
  assert latent_cache.describe_source(data, {**vae, "decoder": bump(vae["decoder"])}, text) == source
  assert latent_cache.describe_source(data, {**vae, "quant_conv": bump(vae["quant_conv"])}, text)["vae_encoder"] != source["vae_encoder"]
  assert latent_cache.describe_source(data, vae, bump(text))["text_encoder"] != source["text_encoder"]
  # the shipped sharp VAE shares synthetic_64px's encoder
  _, sharp = pretrained.load_vae(tiny.vae_folder("synthetic_64px_sharp"))
  assert latent_cache.describe_source(data, sharp, text) == source
  latent_cache.write_shard(tmp_path, "part-0-of-1", {f: np.zeros((2, 1)) for f in latent_cache.FIELDS})
  latent_cache.write_index(tmp_path, ["part-0-of-1"], source)
  assert latent_cache.check_source(tmp_path, source)
  latent_cache.write_index(tmp_path, ["part-0-of-1"])  # a cache from before the record
  assert not latent_cache.check_source(tmp_path, source)
  assert "used unchecked" in capsys.readouterr().out


def test_stage1_from_sd15_style_folder_and_stage2_from_its_checkpoint(tfds_dir, tmp_path):
  import dataclasses

  from mre_jax import models
  from mre_jax.io import export
  from mre_jax.models import tiny
  sd = testing.write_tiny_model_folder(tmp_path / "sd", seed=4, unet=dataclasses.replace(tiny.UNET, in_channels=4),
                                    reward=False)
  stage1 = tmp_path / "stage1"
  loop.train_and_evaluate(_config(tfds_dir, **{"stage": 1, "num_steps": 2, "model.init": "pretrained",
                                                "model.pretrained": str(sd)}), str(stage1))
  spec = checkpointing.read_spec(stage1)
  assert spec.unet.in_channels == 8 and not spec.reward
  _, first = checkpointing.restore_params(stage1, step=1, use_ema=False)
  source = export.unet_from_diffusers(sd, reward=False)[1]
  # one optimiser step from the widened SD weights: close to them, not equal
  delta = np.abs(first["conv_out"]["kernel"] - source["conv_out"]["kernel"]).max()
  assert 0 < delta < 1e-2
  stage2 = tmp_path / "stage2"
  state = loop.train_and_evaluate(_config(tfds_dir, **{"num_steps": 2, "model.init": "pretrained",
                                                        "model.pretrained": str(stage1)}), str(stage2))
  assert checkpointing.read_spec(stage2).reward and set(models.REWARD_MODULES) <= set(state.params)


def test_bfloat16_compute_with_remat_and_accumulation_trains(tfds_dir, tmp_path):
  state = loop.train_and_evaluate(
      _config(tfds_dir, **{"model.dtype": "bfloat16", "model.remat": True, "grad_accum_steps": 2,
                           "optim.warmup_steps": 2, "num_steps": 2, "log_every": 1}), str(tmp_path))
  assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(state.params))
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [l["lr"] for l in lines] == pytest.approx([0.0, 1.5e-4])  # linear warm-up to 3e-4
  assert all(np.isfinite(l["loss"]) and l["grad_norm"] > 0 for l in lines)


def test_labelled_grid_upscales_tiles_by_nearest_neighbour():
  columns = [np.random.default_rng(i).uniform(size=(2, 8, 8, 3)) for i in range(3)]
  grid = samples.labelled_grid(columns, ("a", "b", "c"), tile=20)  # 8 px -> x3 = 24 px tiles
  assert grid.shape == (24 + 2 * 24, 3 * 24, 3)
  tile = grid[24 + 24:24 + 48, 2 * 24:3 * 24].astype(np.float64)  # example 1, column 2
  expected = np.repeat(np.repeat(np.round(columns[2][1] * 255), 3, axis=0), 3, axis=1)
  np.testing.assert_array_equal(tile, expected)


@pytest.mark.parametrize("override,message", [
    ({"optim.lr": -1.0}, "config.optim.lr=-1.0"),
    ({"batch_size": 6, "grad_accum_steps": 4}, "config.batch_size=6 is not divisible"),
    ({"stage": 3}, "config.stage=3"),
    ({"snr_gamma": -5.0}, r"config.snr_gamma=-5.0: must be >= 0"),
    ({"model.dtype": "float16"}, "config.model.dtype='float16': expected one of float32, bfloat16"),
    ({"model.init": "pretrained", "model.pretrained": "/no/such/folder"}, "config.model.pretrained='/no/such/folder'"),
])
def test_bad_config_fails_before_compiling(override, message, tmp_path):
  with pytest.raises(ConfigError, match=message):
    loop.train_and_evaluate(_config("unused", **override), str(tmp_path))
  assert not (tmp_path / "state").exists()


def test_ema_decay_matches_diffusers_ema_model():
  torch = pytest.importorskip("torch")
  from diffusers.training_utils import EMAModel
  config = train_config.get_config("tiny")
  ema = EMAModel([torch.nn.Parameter(torch.zeros(1))])
  for step in (1, 2, 3, 10, 1000, 10**6):
    assert float(trainer.ema_decay(np.int32(step), config.ema)) == pytest.approx(ema.get_decay(step), rel=1e-6)


def test_8_simulated_devices_match_1_device(tfds_dir, tmp_path):
  """data 2 x fsdp 4 (parameters, EMA and optimiser state split 4 ways) against one device, 6 steps."""
  overrides = {"batch_size": 8, "log_every": 1, "mesh.fsdp_min_size": 1024}
  one = tmp_path / "one"
  loop.train_and_evaluate(_config(tfds_dir, **overrides), str(one))
  eight = tmp_path / "eight"
  code = (
      "import sys, jax\n"
      "from test_train import _config\nfrom mre_jax.train import loop\n"
      f"cfg = _config(sys.argv[1], **{overrides!r}, **{{'mesh.data': 2, 'mesh.fsdp': 4}})\n"
      "state = loop.train_and_evaluate(cfg, sys.argv[2])\n"
      "print('devices', jax.device_count(), 'sharded', sum(not l.sharding.is_fully_replicated "
      "for l in jax.tree_util.tree_leaves(state.params)))\n")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
  out = subprocess.run([sys.executable, "-c", code, tfds_dir, str(eight)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "devices 8" in out.stdout and "sharded 0" not in out.stdout
  _assert_same_metrics(eight, one, steps=[1, 2, 3, 4, 5, 6])
  _assert_same_training(_saved_state(eight), _saved_state(one), _initial_params(one))


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_lr_schedule_warms_up_then_stays_or_decays_by_a_cosine(schedule):
  optim = train_config.get_config().optim
  optim.lr, optim.warmup_steps, optim.schedule = 1e-3, 100, schedule
  lr = trainer.lr_schedule(optim, num_steps=500)
  # Warm-up: linear from 0 to 1e-3 over 100 steps.
  np.testing.assert_allclose([float(lr(s)) for s in (0, 50, 100)], [0.0, 5e-4, 1e-3], atol=1e-9)
  # Then constant, or 1e-3 * (1 + cos(pi * k / 400)) / 2 at k steps after the warm-up: 0 at step 500.
  expected = [1e-3] * 4 if schedule == "constant" else [5e-4, 1e-3 * (1 - np.sqrt(0.5)) / 2, 0.0, 0.0]
  np.testing.assert_allclose([float(lr(s)) for s in (300, 400, 500, 900)], expected, rtol=1e-5, atol=1e-9)


def test_lr_schedule_rejects_an_unknown_schedule_and_a_cosine_without_steps():
  optim = train_config.get_config().optim
  optim.schedule = "linear"
  with pytest.raises(ValueError, match="config.optim.schedule: 'linear'"):
    trainer.lr_schedule(optim, 500)
  optim.schedule = "cosine"
  with pytest.raises(ValueError, match="num_steps"):
    trainer.lr_schedule(optim)
