"""Errors a user can cause, shared by every job (main.py maps them to exit codes)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ml_collections


class ConfigError(ValueError):
  """A missing or invalid config field: main.py prints one line and exits with code 2."""


def require(config: ml_collections.ConfigDict, field: str) -> Any:
  """`config.<field>`, which must be set (not None or "")."""
  value = config.get(field)
  if value in (None, ""):
    raise ConfigError(f"config.{field} is required (job {config.get('job')!r})")
  return value


def require_workdir(workdir: str | os.PathLike | None, purpose: str) -> Path:
  """The job's --workdir as an absolute Path; a ConfigError saying what it is for if it is missing."""
  if not workdir:
    raise ConfigError(f"--workdir is required: {purpose}")
  return Path(workdir).absolute()
