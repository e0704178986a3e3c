"""Every job that writes to a workdir refuses to start without one, saying what it is for."""

import importlib
import pkgutil

import main
import pytest

from mre_jax.errors import ConfigError

# job -> the config file that runs it (the precompute job runs on the train config)
NEEDS_WORKDIR = {"train": "train", "precompute": "train", "convert": "convert", "evaluate": "evaluate",
                 "annotate": "annotate", "vae": "vae", "study": "study"}


def _job_fn(job):
  return pkgutil.resolve_name(main.JOBS[job])


def _config(name):
  return importlib.import_module(f"configs.{name}").get_config()


@pytest.mark.parametrize("job", sorted(NEEDS_WORKDIR))
@pytest.mark.parametrize("workdir", [None, ""])
def test_a_job_without_workdir_is_a_config_error(job, workdir, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # nothing may be written anywhere, not even here
  with pytest.raises(ConfigError, match=r"^--workdir is required: \w"):
    _job_fn(job)(_config(NEEDS_WORKDIR[job]), workdir)
  assert not any(tmp_path.iterdir())
