"""The noise schedule is the model's own (frozen/scheduler/): training and sampling read one file."""
import json

import numpy as np
import pytest

from mre_jax.infer import sampling
from mre_jax.io import checkpointing
from mre_jax.models import tiny
from mre_jax.train import trainer


def test_training_reads_the_schedule_the_sampler_reads(tmp_path):
  tiny.write_frozen_parts(checkpointing.frozen_dir(tmp_path), scheduler=dict(
      beta_schedule="linear", beta_start=1e-4, beta_end=0.02))
  frozen, _ = trainer.load_frozen(tmp_path, np.float32)
  schedule = trainer.training_schedule(frozen)
  # DDPM's linear schedule, computed here independently (float64, then compared in float32).
  betas = np.linspace(1e-4, 0.02, 1000)
  np.testing.assert_allclose(np.asarray(schedule.betas), betas, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(schedule.alphas_cumprod)[-1], np.prod(1 - betas), rtol=1e-4)
  written = json.loads((checkpointing.frozen_dir(tmp_path) / "scheduler" / "scheduler_config.json").read_text())
  spec = sampling.spec_from_scheduler_config(written, "euler_ancestral", 20)
  assert (spec.beta_schedule, spec.beta_start, spec.beta_end) == ("linear", 1e-4, 0.02)


def test_default_schedule_is_sd15s(tmp_path):
  tiny.write_frozen_parts(checkpointing.frozen_dir(tmp_path))
  frozen, _ = trainer.load_frozen(tmp_path, np.float32)
  betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
  np.testing.assert_allclose(np.asarray(trainer.training_schedule(frozen).betas), betas, rtol=1e-6)


def test_unknown_scheduler_key_is_named(tmp_path):
  with pytest.raises(ValueError, match="beta_max"):
    tiny.write_frozen_parts(tmp_path, scheduler={"beta_max": 0.02})
