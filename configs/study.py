"""Study config: the paper's ablation (reward conditioning vs no rewards) on the synthetic world.

python main.py --config=configs/study.py --workdir=OUT          # full size (see README)
python main.py --config=configs/study.py:long --workdir=OUT     # both arms on the `long` recipe (384k images)
python main.py --config=configs/study.py:quick --workdir=OUT    # 1 seed, a few steps: CI's smoke run
"""

import ml_collections

from configs import train as train_configs


def get_config(arg: str | None = None):
  config = ml_collections.ConfigDict()
  config.job = "study"
  config.seeds = (0, 1, 2)  # each seed trains both models (same data order, init and noise)
  # The train job's config for both models: the default demo's (six models: about an hour on 2 cores;
  # README, "The study").
  config.train = train_configs.get_config()

  config.eval = ml_collections.ConfigDict()
  config.eval.count = 140  # held-out test edits per model and seed (categories balanced)
  config.eval.knob_count = 28  # test edits per knob setting
  config.eval.knob_values = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0)  # requested scores of the varied perspective
  config.eval.steps = 20  # Euler ancestral steps
  config.eval.text_guidance = config.train.eval.text_guidance  # the demo's (3.0; the release's 7.5)
  config.eval.image_guidance = config.train.eval.image_guidance
  config.eval.seed = 0  # noise seed: both models edit from the same noise
  config.eval.batch_size = 35  # edits per sampler call
  config.eval.bootstrap_samples = 2000  # resamples for the 95% intervals

  if arg == "long":  # the paired `long` runs of README's "Does it work?": each model is
    # `configs/train.py:long` (384k images, about 70 minutes on 2 cores), six models about 7 hours;
    # README ("From a stage-1 editor") shows how to train a seed's two arms at once, one core each.
    config.train = train_configs.get_config("long")
    config.train.sample.every = 0
  elif arg == "quick":  # CI: checks the study runs end to end and writes well-formed outputs
    config.seeds = (0,)
    config.train = train_configs.get_config("tiny")
    config.train.num_steps = 6
    config.train.batch_size = 8
    config.train.log_every = 3
    config.train.sample.every = 0
    config.train.checkpoint.async_save = False
    config.train.data.builder_config = "tiny"
    config.eval.count = 7
    config.eval.knob_count = 7
    config.eval.knob_values = (0.0, 5.0)
    config.eval.steps = 3
    config.eval.batch_size = 7
    config.eval.bootstrap_samples = 200
  elif arg not in (None, ""):
    raise ValueError(f"configs/study.py: unknown variant {arg!r} (expected long or quick)")
  return config
