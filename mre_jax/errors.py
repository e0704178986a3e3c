"""Errors a user can cause, shared by every job (main.py maps them to exit codes)."""

from typing import Any


class ConfigError(ValueError):
  """A missing or invalid config field: main.py prints one line and exits with code 2."""


def require(config, field: str) -> Any:
  """`config.<field>`, which must be set (not None or "")."""
  value = config.get(field)
  if value in (None, ""):
    raise ConfigError(f"config.{field} is required (job {config.get('job')!r})")
  return value
