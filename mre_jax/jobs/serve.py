"""The `serve` job: the Gradio editing page (mre_jax.app.serve) on one loaded model.

```
python main.py --config=configs/serve.py --config.checkpoint=DIR [--config.port=7860]
```

The port is taken before the model loads, so a taken port fails at once. With `config.warmup`
the default program is compiled before the server listens; the page is served (uvicorn, with
Gradio mounted on FastAPI) until interrupted (Ctrl-C / SIGTERM). The line starting with
`URL_LINE` says where.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import ml_collections

from mre_jax import models
from mre_jax.app.serve import (CSS, IMAGE_GUIDANCE_MAX, TEXT_GUIDANCE_MAX, URL_LINE, EditService, Settings,
                               load_gradio, make_app, write_examples)
from mre_jax.errors import ConfigError, require
from mre_jax.infer import edit, sampling
from mre_jax.infer.sizes import SIZE_MULTIPLE, check_size_rule
from mre_jax.jobs.edit import check_seed

# ----------------------------------------------------------------------------- config


def _int_field(config: ml_collections.ConfigDict, field: str, low: int, high: int | None = None) -> int:
  value = config[field]
  if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
    bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
    raise ConfigError(f"config.{field}={value!r}: expected an integer {bounds}")
  return value


def _number_field(config: ml_collections.ConfigDict, field: str, low: float, high: float) -> float:
  value = config[field]
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
    raise ConfigError(f"config.{field}={value!r}: expected a number in [{low:g}, {high:g}]")
  return float(value)


def check_config(config: ml_collections.ConfigDict) -> Settings:
  """Validates every field of `configs/serve.py` (ConfigError naming the field and value)."""
  require(config, "checkpoint")
  if not isinstance(config.host, str) or not config.host:
    raise ConfigError(f"config.host={config.host!r}: expected an address such as 127.0.0.1")
  resolution = _int_field(config, "resolution", SIZE_MULTIPLE)
  if resolution % SIZE_MULTIPLE:
    raise ConfigError(f"config.resolution={resolution!r}: expected a positive multiple of {SIZE_MULTIPLE}")
  if config.scheduler not in sampling.SCHEDULERS:
    raise ConfigError(f"config.scheduler={config.scheduler!r}: expected one of {', '.join(sampling.SCHEDULERS)}")
  models.parse_dtype(config.dtype, "config.dtype")
  max_steps = _int_field(config, "max_steps", 1)
  if not isinstance(config.reward_text, str):
    raise ConfigError(f"config.reward_text={config.reward_text!r}: expected a string")
  if not isinstance(config.warmup, bool):
    raise ConfigError(f"config.warmup={config.warmup!r}: expected True or False")
  max_megapixels = config.max_megapixels
  if isinstance(max_megapixels, bool) or not isinstance(max_megapixels, (int, float)) or not max_megapixels > 0:
    raise ConfigError(f"config.max_megapixels={max_megapixels!r}: expected a positive number")
  return Settings(
      host=config.host, port=_int_field(config, "port", 0, 65535), queue_size=_int_field(config, "queue_size", 1),
      max_upload_mb=_int_field(config, "max_upload_mb", 1), max_megapixels=float(max_megapixels),
      warmup=config.warmup, examples=_int_field(config, "examples", 0, 100),
      examples_seed=_int_field(config, "examples_seed", 0), resolution=resolution,
      size_rule=check_size_rule(config.size_rule, "config.size_rule"), scheduler=config.scheduler,
      steps=_int_field(config, "steps", 1, max_steps), max_steps=max_steps,
      text_guidance=_number_field(config, "text_guidance", 0.0, TEXT_GUIDANCE_MAX),
      image_guidance=_number_field(config, "image_guidance", 0.0, IMAGE_GUIDANCE_MAX),
      seed=check_seed(config.seed, "config.seed"), scores=edit.check_scores(config.scores, "config.scores"),
      reward_text=config.reward_text)


# ----------------------------------------------------------------------------- the job


def listen(host: str, port: int) -> socket.socket:
  """A listening TCP socket on (host, port); port 0: one the OS picks (read it back from the socket)."""
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((host, port))
    sock.listen(128)
  except OSError as e:
    sock.close()
    raise OSError(f"config.host={host}, config.port={port}: cannot listen there ({e.strerror or e})") from None
  return sock


def serve(config: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None) -> None:
  """Job: load the model, compile, and serve the page until interrupted (Ctrl-C / SIGTERM)."""
  del workdir  # nothing is written but Gradio's cache and the examples (a temporary folder)
  settings = check_config(config)
  gr = load_gradio()
  # Gradio's own dependencies, so part of the optional [app] extra too: imported only to serve.
  import fastapi
  import uvicorn

  sock = listen(settings.host, settings.port)  # before the slow part: a taken port fails at once
  try:
    editor = edit.load_editor(config.checkpoint, step=config.step, use_ema=config.use_ema, dtype=config.dtype)
    service = EditService(editor, settings)
    if settings.warmup:
      print(f"Compiling the sampler ({settings.steps} {settings.scheduler} steps, "
            f"{settings.resolution}x{settings.resolution})...", flush=True)
      print(f"Warm-up edit done in {service.warm_up():.1f} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="mre_serve_examples_") as folder:
      examples = write_examples(Path(folder), settings.examples, settings.examples_seed)
      app = gr.mount_gradio_app(
          fastapi.FastAPI(), make_app(service, examples), path="/", allowed_paths=[folder],
          max_file_size=f"{settings.max_upload_mb}mb", footer_links=[], ssr_mode=False, css=CSS,
          theme=gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                                  font_mono=["ui-monospace", "monospace"]))  # no web fonts: works offline
      host, port = sock.getsockname()[:2]
      url_host = f"[{host}]" if ":" in host else host
      print(f"{URL_LINE}http://{url_host}:{port}/ (Ctrl-C stops it)", flush=True)
      server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
      server.run(sockets=[sock])
  finally:
    sock.close()
