"""The `study` job: the paper's ablation, reward conditioning against no rewards, on the synthetic world.

python main.py --config=configs/study.py --workdir=OUT [--config=configs/study.py:quick]

What it compares and how: mre_jax.eval.study. Every model goes through the train job users run
(mre_jax.train.loop.train_and_evaluate); the run resumes from OUT at every stage.

OUT/
  tfds/                             the data every model reads
  reward_seed<s>/, baseline_seed<s>/  the train job's workdirs (checkpoints, latent cache,
                                    logs, samples); a seed's two models share frozen parts
  edits/<name>.npz                  every edit made (uint8) with what it depends on (train config,
                                    examples, sampler, request), so a rerun resumes; a seed whose
                                    edits are all here needs no model: copy other runs' edits/
                                    here to pool their seeds
  table.json, table.md              means, paired differences, 95% bootstrap intervals over
                                    seeds and examples, per perspective and category; knobs
  bars.png, knobs.png, examples.png the figures
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import ml_collections

from mre_jax.data import input_pipeline
from mre_jax.errors import ConfigError, require_workdir
from mre_jax.eval import study, synthetic_eval
from mre_jax.io import files
from mre_jax.train import loop


def check_config(config: ml_collections.ConfigDict) -> None:
  """The study's own fields (ConfigError naming field and value); config.train is the train job's."""
  if not config.seeds:
    raise ConfigError("config.seeds is empty: the study needs at least one seed")
  if config.train.stage != 2:
    raise ConfigError(f"config.train.stage={config.train.stage}: the study compares stage-2 models")
  if config.eval.count < 1 or config.eval.knob_count < 1:
    raise ConfigError(f"config.eval.count={config.eval.count}, config.eval.knob_count={config.eval.knob_count}: "
                      "must be >= 1")
  bad = [k for k in config.eval.knob_values if not 0 <= k <= 5]
  if bad:
    raise ConfigError(f"config.eval.knob_values has {bad}: requested scores are in [0, 5]")


def train_models(config: ml_collections.ConfigDict, out: Path) -> None:
  """Trains (or resumes, or finds finished) every (arm, seed) model whose edits are not all in OUT/edits
  already. A training stopped early (SIGTERM: the train job saves and returns) stops the study with a
  non-zero exit before anything is edited, so no model is judged half-trained and a rerun resumes it."""
  for seed in config.seeds:
    for arm in study.ARMS:
      if study.edits_done(config, out, arm, seed):
        print(f"study: {arm} seed {seed}: every edit it makes is in {out / 'edits'}; not trained", flush=True)
        continue
      print(f"study: training {arm} seed {seed}", flush=True)
      workdir = out / f"{arm}_seed{seed}"
      state = loop.train_and_evaluate(study.train_config(config, out, arm, seed), str(workdir))
      reached = int(jax.device_get(state.step))
      if reached < config.train.num_steps:
        raise SystemExit(f"study: {arm} seed {seed} stopped at step {reached} of {config.train.num_steps} "
                         f"({workdir}); nothing was edited; rerun the same command to resume")


def run_study(config: ml_collections.ConfigDict, workdir: str | os.PathLike | None) -> dict:
  """Job: trains, edits, judges and reports (see the module docstring); resumes from `workdir`."""
  out = require_workdir(workdir, "models, edits and the report are written there")
  check_config(config)
  out.mkdir(parents=True, exist_ok=True)
  train_models(config, out)
  data = config.train.data
  builder = input_pipeline.build_dataset(data.name, data.data_dir or str(out / "tfds"), None,
                                         config=data.builder_config)
  test = synthetic_eval.load_test_set(builder, "test", config.eval.count)
  knob_test = synthetic_eval.load_test_set(builder, "test", config.eval.knob_count)
  scores = study.edit_all(config, out, test, knob_test)
  result = study.report(config, scores, test, knob_test)
  text = study.table_markdown(result)
  files.write_json(out / "table.json", result, indent=2)
  files.write_atomic(out / "table.md", text)
  from mre_jax.eval import study_figures  # matplotlib (imports pyplot at load): only the report needs it
  study_figures.write_figures(out, result, config, test)
  print(text)
  return result
