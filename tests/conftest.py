import collections
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("USE_TF", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# XLA compiles dominate this suite on 2 cores; a persistent cache lets tests (and the
# subprocesses they start, which inherit the environment) reuse each other's executables.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "mre_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import numpy as np
import pytest

from mre_jax import testing
from mre_jax.infer import sampling

# ----------------------------------------------------------------------------- no quiet skips in CI
# Parity tests skip where torch or a C++ compiler is missing. Under CI=true (.ci/run installs
# both) a skip, at collection or in a test, is a failure: it would hide a test that never ran.


def _ci_failure(report, what):
  if os.environ.get("CI") == "true" and report.skipped and not hasattr(report, "wasxfail"):
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"{what} skipped under CI=true (.ci/run installs what the tests need): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  outcome = yield
  _ci_failure(outcome.get_result(), item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
  outcome = yield
  _ci_failure(outcome.get_result(), collector.nodeid)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
  """A random diffusers-format InstructPix2Pix folder with the reward modules (tiny widths)."""
  return testing.write_tiny_model_folder(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture
def rng():
  return np.random.default_rng(0)


@pytest.fixture
def run_on_8_devices():
  """Runs Python `code` in a child process with 8 simulated CPU devices (XLA reads its flags once
  per process); asserts that it exits 0 and printed "devices 8 ok"."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def run(code: str) -> None:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "PYTHONPATH": root}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "devices 8 ok" in out.stdout

  return run


@pytest.fixture(scope="session")
def tfds_tiny(tmp_path_factory):
  """The synthetic_edit builder's `tiny` config (32 px, 64 train / 16 test), built once."""
  from mre_jax.data import input_pipeline
  path = tmp_path_factory.mktemp("tfds_tiny")
  input_pipeline.build_dataset("synthetic_edit", str(path), config="tiny")
  return str(path)


class SamplerTraces:
  """Sampler traces (compiles) since `mark()`, by key (scheduler, steps, image shape).

  `sampling.TRACES` counts for the whole process, and the compiled samplers are shared by every
  editor of an equal model in it: a test that compared totals would depend on what ran before it
  (in this process, or on this xdist worker). The fixture starts from an empty sampler cache, so
  a test's first edit of a size traces once, whatever ran before.
  """

  def __init__(self):
    self.mark()

  def mark(self) -> None:
    self._start = collections.Counter(sampling.TRACES)

  def since(self) -> collections.Counter:
    return sampling.TRACES - self._start


@pytest.fixture
def sampler_traces(monkeypatch):
  monkeypatch.setattr(sampling, "_SAMPLE_FNS", {})
  return SamplerTraces()
