"""Training: runs, resumes exactly (also after SIGKILL), shards, stops on NaN, rejects bad configs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from configs import train as train_config
from mre_jax import checkpointing, train
from mre_jax.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  from mre_jax import input_pipeline
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


def _cli_args(tfds_dir, workdir, steps):
  return [sys.executable, "main.py", "--config=configs/train.py:tiny", f"--workdir={workdir}",
          f"--config.data.data_dir={tfds_dir}", "--config.data.builder_config=tiny", "--config.batch_size=4",
          f"--config.num_steps={steps}", "--config.checkpoint.every=1", "--config.checkpoint.async_save=False"]


@pytest.fixture(scope="module")
def reference(tfds_dir, tmp_path_factory):
  """An uninterrupted 6-step run that saves every step: (workdir, final state)."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  return workdir, train.train_and_evaluate(_config(tfds_dir, **{"sample.every": 6}), str(workdir))


def _copy_run(reference, target, last_step):
  shutil.copytree(reference, target)
  for p in (target / "state").iterdir():
    if p.name.isdigit() and int(p.name) > last_step:
      shutil.rmtree(p)
  return target


def test_train_writes_checkpoints_logs_and_learns(reference, tfds_dir):
  workdir, state = reference
  assert int(state.step) == 6 and checkpointing.is_checkpoint(workdir)
  assert sorted(int(p.name) for p in (workdir / "state").iterdir()) == [4, 5, 6]  # keep=3
  assert list((workdir / "tensorboard").iterdir())
  grid = np.asarray(Image.open(workdir / "samples" / "step_0000006.png"))
  # A 24 px header, then 4 held-out examples x (input | truth | target | edit@5,5,5 | edit@own).
  assert grid.shape == (24 + 4 * 32, 5 * 32, 3)
  assert (grid[:24] < 128).any() and (grid[:24] == 255).mean() > 0.8  # dark labels on white
  from mre_jax import input_pipeline
  first = input_pipeline.data_source(input_pipeline.build_dataset("synthetic_edit", tfds_dir, config="tiny"), "test")[0]
  np.testing.assert_array_equal(grid[24:56, :32], first["original"])
  np.testing.assert_array_equal(grid[24:56, 32:64], first["truth"])
  np.testing.assert_array_equal(grid[24:56, 64:96], first["edited"])
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [2, 4, 6] and all(np.isfinite(l["loss"]) for l in lines)
  _, params = checkpointing.restore_params(workdir, use_ema=False)
  _, ema = checkpointing.restore_params(workdir, use_ema=True)
  assert any(np.abs(a - b).max() > 0 for a, b in zip(_leaves(params), _leaves(ema)))


def test_resume_from_a_checkpoint_ends_with_the_uninterrupted_parameters(reference, tfds_dir, tmp_path):
  workdir = _copy_run(reference[0], tmp_path / "run", last_step=4)
  resumed = train.train_and_evaluate(_config(tfds_dir), str(workdir))
  for a, b in zip(_leaves(reference[1]), _leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def test_sigkill_then_restart_ends_with_the_uninterrupted_parameters(reference, tfds_dir, tmp_path):
  workdir = tmp_path / "killed"
  proc = subprocess.Popen(_cli_args(tfds_dir, workdir, 6), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and not (workdir / "state" / "2").is_dir():
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  saved = [int(p.name) for p in (workdir / "state").iterdir() if p.name.isdigit()]
  assert saved and max(saved) < 6, saved
  resumed = train.train_and_evaluate(_config(tfds_dir), str(workdir))
  for a, b in zip(_leaves(reference[1]), _leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def test_two_processes_train_together_and_checkpoint(reference, tfds_dir, tmp_path):
  import portpicker
  port = portpicker.pick_unused_port()
  workdir = tmp_path / "multi"
  procs = [subprocess.Popen(
      _cli_args(tfds_dir, workdir, 2) + [
          "--config.distributed.initialize=True", f"--config.distributed.coordinator_address=127.0.0.1:{port}",
          "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}", "--config.log_every=2"],
      cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
  errors = [p.communicate(timeout=400)[1] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], errors[0][-3000:] + errors[1][-3000:]
  assert checkpointing.restore_params(workdir)[0] == 2
  # one log, written by process 0, with the loss of the 1-process run of the same global batch
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  expected = [json.loads(l) for l in (reference[0] / "metrics.jsonl").read_text().splitlines()][0]
  assert len(lines) == 1 and lines[0]["step"] == expected["step"] == 2
  assert lines[0]["loss"] == pytest.approx(expected["loss"], rel=1e-5)


def test_sigterm_saves_and_stops(tfds_dir, tmp_path):
  workdir = tmp_path / "term"
  proc = subprocess.Popen(_cli_args(tfds_dir, workdir, 10_000), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and not (workdir / "state" / "2").is_dir():
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  saved = max(int(p.name) for p in (workdir / "state").iterdir() if p.name.isdigit())
  assert 2 <= saved < 10_000


def test_interrupted_save_is_never_picked_up(reference, tmp_path):
  workdir = _copy_run(reference[0], tmp_path / "run", last_step=5)
  (workdir / "state" / "9.orbax-checkpoint-tmp-1234").mkdir()  # a save killed mid-write
  assert checkpointing.restore_params(workdir)[0] == 5


def test_nan_loss_stops_naming_the_step_and_is_not_saved(reference, tfds_dir, tmp_path, monkeypatch):
  workdir = _copy_run(reference[0], tmp_path / "run", last_step=4)
  real_loss = train.loss_fn
  monkeypatch.setattr(train, "loss_fn", lambda *a, **kw: real_loss(*a, **kw) * np.nan)
  with pytest.raises(FloatingPointError, match="step 5: loss is nan"):
    train.train_and_evaluate(_config(tfds_dir), str(workdir))
  assert checkpointing.restore_params(workdir)[0] == 4


def test_latent_cache_holds_the_frozen_encoders_outputs_and_trains(tfds_dir, tmp_path):
  from mre_jax import input_pipeline, latent_cache, pretrained
  cache = str(tmp_path / "cache")
  train.precompute_latents(_config(tfds_dir, **{"data.latent_cache": cache}), str(tmp_path / "encoders"))
  with pytest.raises(FileExistsError, match="already holds a cache"):
    train.precompute_latents(_config(tfds_dir, **{"data.latent_cache": cache}), str(tmp_path / "encoders"))
  # independent of the job: encode the first examples here and compare
  frozen, fparams = train.load_frozen(tmp_path / "encoders", np.float32)
  source = input_pipeline.data_source(input_pipeline.build_dataset("synthetic_edit", tfds_dir, config="tiny"), "train")
  images = input_pipeline.create_dataset(
      source, global_batch_size=4, crop_size=32, tokenize_fn=input_pipeline.clip_tokenize_fn(frozen.tokenizer),
      seed=0, flip=False, shuffle=False, process_index=0, process_count=1)[0]
  expected = train.encode_batch(frozen, fparams, {k: images[k] for k in train.BATCH_KEYS})
  cached = latent_cache.CacheSource(cache)
  assert len(cached) == len(source)
  for i in range(4):
    row = cached[i]
    for field in ("latent_mean", "latent_logvar", "cond", "reward_embeds", "scores"):
      np.testing.assert_allclose(row[field], expected[field][i], rtol=1e-4, atol=1e-5)
    # the instruction is one of the example's wordings, fixed in the cache
    wordings = [w.decode() for w in source[i]["instructions"]]
    contexts = pretrained.encode_text(frozen.text_encoder, fparams["text"],
                                      pretrained.tokenize(frozen.tokenizer, wordings))[0]
    assert min(np.abs(np.asarray(c) - row["context"]).max() for c in contexts) < 1e-4
  state = train.train_and_evaluate(_config(tfds_dir, **{"data.latent_cache": cache, "num_steps": 2}),
                                   str(tmp_path / "cached"))
  assert int(state.step) == 2
  assert all(np.isfinite(json.loads(l)["loss"]) for l in (tmp_path / "cached" / "metrics.jsonl").read_text().splitlines())


def test_stage1_from_sd15_style_folder_and_stage2_from_its_checkpoint(tfds_dir, tmp_path):
  import dataclasses
  from mre_jax import export, models, tiny
  sd = tiny.write_tiny_model_folder(tmp_path / "sd", seed=4, unet=dataclasses.replace(tiny.UNET, in_channels=4),
                                    reward=False)
  stage1 = tmp_path / "stage1"
  train.train_and_evaluate(_config(tfds_dir, **{"stage": 1, "num_steps": 2, "model.init": "pretrained",
                                                "model.pretrained": str(sd)}), str(stage1))
  spec = checkpointing.read_spec(stage1)
  assert spec.unet.in_channels == 8 and not spec.reward
  _, first = checkpointing.restore_params(stage1, step=1, use_ema=False)
  source = export.unet_from_diffusers(sd, reward=False)[1]
  # one optimiser step from the widened SD weights: close to them, not equal
  delta = np.abs(first["conv_out"]["kernel"] - source["conv_out"]["kernel"]).max()
  assert 0 < delta < 1e-2
  stage2 = tmp_path / "stage2"
  state = train.train_and_evaluate(_config(tfds_dir, **{"num_steps": 2, "model.init": "pretrained",
                                                        "model.pretrained": str(stage1)}), str(stage2))
  assert checkpointing.read_spec(stage2).reward and set(models.REWARD_MODULES) <= set(state.params)


def test_bfloat16_compute_with_remat_and_accumulation_trains(tfds_dir, tmp_path):
  state = train.train_and_evaluate(
      _config(tfds_dir, **{"model.dtype": "bfloat16", "model.remat": True, "grad_accum_steps": 2,
                           "optim.warmup_steps": 2, "num_steps": 2, "log_every": 1}), str(tmp_path))
  assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(state.params))
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [l["lr"] for l in lines] == pytest.approx([0.0, 1.5e-4])  # linear warm-up to 3e-4
  assert all(np.isfinite(l["loss"]) and l["grad_norm"] > 0 for l in lines)


def test_labelled_grid_upscales_tiles_by_nearest_neighbour():
  columns = [np.random.default_rng(i).uniform(size=(2, 8, 8, 3)) for i in range(3)]
  grid = train.labelled_grid(columns, ("a", "b", "c"), tile=20)  # 8 px -> x3 = 24 px tiles
  assert grid.shape == (24 + 2 * 24, 3 * 24, 3)
  tile = grid[24 + 24:24 + 48, 2 * 24:3 * 24].astype(np.float64)  # example 1, column 2
  expected = np.repeat(np.repeat(np.round(columns[2][1] * 255), 3, axis=0), 3, axis=1)
  np.testing.assert_array_equal(tile, expected)


@pytest.mark.parametrize("override,message", [
    ({"optim.lr": -1.0}, "config.optim.lr=-1.0"),
    ({"batch_size": 6, "grad_accum_steps": 4}, "config.batch_size=6 is not divisible"),
    ({"stage": 3}, "config.stage=3"),
    ({"model.init": "pretrained", "model.pretrained": "/no/such/folder"}, "config.model.pretrained='/no/such/folder'"),
])
def test_bad_config_fails_before_compiling(override, message, tmp_path):
  with pytest.raises(ConfigError, match=message):
    train.train_and_evaluate(_config("unused", **override), str(tmp_path))
  assert not (tmp_path / "state").exists()


def test_ema_decay_matches_diffusers_ema_model():
  torch = pytest.importorskip("torch")
  from diffusers.training_utils import EMAModel
  config = train_config.get_config("tiny")
  ema = EMAModel([torch.nn.Parameter(torch.zeros(1))])
  for step in (1, 2, 3, 10, 1000, 10**6):
    assert float(train.ema_decay(np.int32(step), config.ema)) == pytest.approx(ema.get_decay(step), rel=1e-6)


def _run_devices(tfds_dir, workdir, devices, data, fsdp):
  code = (
      "import sys, numpy as np, jax\n"
      "from configs import train as c\nfrom mre_jax import train\n"
      "cfg = c.get_config('tiny'); cfg.data.data_dir = sys.argv[1]; cfg.data.builder_config = 'tiny'\n"
      "cfg.batch_size = 8; cfg.num_steps = 3; cfg.log_every = 1; cfg.checkpoint.async_save = False\n"
      f"cfg.mesh.data = {data}; cfg.mesh.fsdp = {fsdp}; cfg.mesh.fsdp_min_size = 1024\n"
      "state = train.train_and_evaluate(cfg, sys.argv[2])\n"
      "leaves = jax.tree_util.tree_leaves(jax.device_get(state.params))\n"
      "np.savez(sys.argv[2] + '.npz', *leaves)\n"
      "print('devices', jax.device_count(), 'sharded', sum(not l.sharding.is_fully_replicated "
      "for l in jax.tree_util.tree_leaves(state.params)))\n")
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "PYTHONPATH": str(ROOT)}
  out = subprocess.run([sys.executable, "-c", code, tfds_dir, str(workdir)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  losses = [json.loads(l)["loss"] for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return out.stdout, losses, np.load(str(workdir) + ".npz")


def test_8_simulated_devices_match_1_device(tfds_dir, tmp_path):
  out1, loss1, one = _run_devices(tfds_dir, tmp_path / "one", 1, 1, 1)
  out8, loss8, eight = _run_devices(tfds_dir, tmp_path / "eight", 8, 2, 4)
  assert "devices 8" in out8 and "sharded 0" not in out8 and "devices 1" in out1
  assert len(loss1) == 3
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  # Adam turns float rounding in near-zero gradients into updates of up to lr; 3 steps of lr 3e-4
  for key in one.files:
    np.testing.assert_allclose(eight[key], one[key], rtol=0, atol=1e-3)
