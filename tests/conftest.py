import os
import tempfile

os.environ.setdefault("USE_TF", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# XLA compiles dominate this suite on 2 cores; a persistent cache lets tests (and the
# subprocesses they start, which inherit the environment) reuse each other's executables.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "mre_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

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
