"""Annotate training triplets with rewards: RewardEdit-20K JSON from a judge (SPEC sections 1, 5).

python main.py --config=configs/annotate.py --config.source=DIR --workdir=OUT

source: an InsPix2Pix folder (seeds.json, <name>/prompt.json, <name>/<seed>_0.jpg, <seed>_1.jpg).
Writes OUT/RewardEdit_20K.json {<name>: [{"Score", "Negative Prompt", "seed"} x 3]} (following,
preserving, quality), OUT/failures.json and OUT/results.jsonl. The API key comes from
$OPENAI_API_KEY (config.judge.api_key_env); it is never saved.
"""

import ml_collections

from mre_jax.eval import judge


def get_config():
  config = ml_collections.ConfigDict()
  config.job = "annotate"
  config.source = ""  # InsPix2Pix folder root (holds seeds.json)
  # ... or any TFDS builder in data/ (instead of source), e.g. instruct_pix2pix from parquet:
  config.dataset = ""  # builder name; its records' original, edited and instruction are judged
  config.builder_config = ""  # builder config name ("" = default)
  config.data_dir = ""  # where the TFDS data is (or is built)
  config.manual_dir = ""  # the builder's local source files
  config.split = "train"
  config.output = "RewardEdit_20K.json"  # file name of the RewardEdit JSON inside the workdir
  config.limit = 0  # only the first N names of seeds.json; 0: all
  config.judge = judge.judge_config()
  return config
