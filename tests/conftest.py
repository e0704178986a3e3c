import os

os.environ.setdefault("USE_TF", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

from mre_jax import tiny


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
  """A random diffusers-format InstructPix2Pix folder with the reward modules (tiny widths)."""
  return tiny.write_tiny_model_folder(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture
def rng():
  return np.random.default_rng(0)
