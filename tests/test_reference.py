"""Our models against what the code before them (diffusers' / transformers' Flax classes) wrote.

tests/fixtures holds the parameter trees and outputs of that code (tests/reference_outputs.py):
identical trees mean checkpoints, converted folders and exports written before still load; the
same outputs from the same weights mean they still compute the same function.
"""

import gzip
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import reference_outputs as ref

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def expected():
  return dict(np.load(FIXTURES / "reference_models.npz"))


def _rel_err(a, b):
  return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def test_parameter_trees_are_those_written_before():
  """Every parameter name and shape of 5 U-Nets (SD 1.5 among them), 2 VAEs and 2 text encoders."""
  with gzip.open(FIXTURES / "reference_trees.json.gz", "rt") as f:
    before = json.load(f)
  now = ref.param_trees()
  assert sorted(now) == sorted(before)
  for name in before:
    assert now[name] == before[name], name


@pytest.mark.parametrize("name", ref.RUN_UNETS)
def test_unet_outputs_are_those_computed_before(expected, name):
  assert _rel_err(ref.run_unet(name), expected[f"unet_{name}"]) < 1e-5


def test_bfloat16_unet_output_is_that_computed_before(expected):
  # bfloat16 rounding differs between the two codes (where each casts); a wrong block is off by far more
  assert _rel_err(ref.run_unet("tiny", jnp.bfloat16), expected["unet_tiny_bfloat16"]) < 2e-2


def test_vae_and_text_encoder_outputs_are_those_computed_before(expected):
  for prefix, outputs in (("vae", ref.run_vae()), ("clip", ref.run_clip())):
    for key, value in outputs.items():
      assert _rel_err(value, expected[f"{prefix}_{key}"]) < 1e-5, key
