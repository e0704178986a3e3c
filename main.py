"""mre_jax command line: `python main.py --config=configs/<job>.py[:variant] [--config.x=v] --workdir=DIR`.

Parses flags and dispatches to the job the config names; all logic lives in the package.
"""

import pkgutil
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mre_jax.errors import ConfigError

# job name -> "module:function" (mre_jax/jobs/, train and precompute: mre_jax/train/); each takes (config, workdir).
JOBS = {
    "train": "mre_jax.train.loop:train_and_evaluate",
    "precompute": "mre_jax.train.precompute:precompute_latents",
    "convert": "mre_jax.jobs.convert:convert",
    "export": "mre_jax.jobs.export:export",
    "evaluate": "mre_jax.jobs.evaluate:evaluate",
    "annotate": "mre_jax.jobs.annotate:annotate",
    "edit": "mre_jax.jobs.edit:edit",
    "vae": "mre_jax.jobs.vae:train_vae",
    "text": "mre_jax.jobs.text:train_text",
    "study": "mre_jax.jobs.study:run_study",
    "serve": "mre_jax.jobs.serve:serve",
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Job config file (configs/<job>.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder the job writes to (checkpoints, logs, outputs).")


def _fail(message: str, code: int) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}", 2)
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax and TFDS are chatty at INFO
  config = _CONFIG.value
  job = config.get("job")
  if job not in JOBS:
    _fail(f"config.job={job!r} is not a job; known jobs: {', '.join(sorted(JOBS))}", 2)
  job_fn = pkgutil.resolve_name(JOBS[job])
  try:
    job_fn(config, _WORKDIR.value)
  except ConfigError as e:
    _fail(str(e), 2)
  except (OSError, ValueError) as e:  # user-caused: missing files, bad weights, bad values
    logging.debug("job %s failed", job, exc_info=True)
    _fail(str(e), 1)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
