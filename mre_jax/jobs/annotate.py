"""The `annotate` job: rewards for training triplets from a judge -> RewardEdit-20K JSON.

python main.py --config=configs/annotate.py --config.source=DIR --workdir=OUT

The source is an InsPix2Pix folder (config.source) or a prepared TFDS builder (config.dataset);
the triplets, requests and entries are mre_jax.eval.annotate's. The entries are written to
<workdir>/<config.output>, atomically. Resumable twice over: names already in that file are
skipped, and every paid answer is in <workdir>/judge_cache.jsonl. An answer that cannot be read
is asked again (config.judge.max_tries), and a rerun asks again for those still unread
(config.judge.rejudge_unparsed). Names that could not be annotated are listed with their reason
in <workdir>/failures.json; <workdir>/results.jsonl holds this run's judgments, every try
included; the summary line gives this run's re-ask figures.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import ml_collections
from absl import logging

from mre_jax.errors import ConfigError, require, require_workdir
from mre_jax.eval import judge
from mre_jax.eval.annotate import Triplet, dataset_triplets, entries_from_results, judge_requests, load_triplets
from mre_jax.io import files


def annotate(config: ml_collections.ConfigDict, workdir: str | os.PathLike | None) -> dict:
  """The `annotate` job; returns the written RewardEdit dict."""
  workdir = require_workdir(workdir, "the annotations, the judge's cache and its log are written there")
  triplets = _triplets(config)
  out_path = workdir / config.output
  workdir.mkdir(parents=True, exist_ok=True)
  output = _read_output(out_path)
  triplets = triplets[:config.limit] if config.limit else triplets
  todo = [t for t in triplets if t.name not in output]
  logging.info("annotate: %d names, %d already annotated", len(triplets), len(triplets) - len(todo))
  results = judge.judge_with_config(config.judge, workdir, judge_requests(todo))
  done, failed = entries_from_results(results)
  output.update(done)
  files.write_json(out_path, output, indent=1, sort_keys=True)
  files.write_json(workdir / "failures.json", failed, indent=1, sort_keys=True)
  files.write_jsonl(workdir / "results.jsonl", results, sort_keys=True)
  print(f"annotated {len(done)} names this run ({len(output)} in {out_path}); failed: "
        f"{len(failed)} (see failures.json); {judge.reask_summary(judge.reask_counts(results))}",
        flush=True)
  return output


def _triplets(config: ml_collections.ConfigDict) -> list[Triplet]:
  """The source's triplets: config.dataset (a TFDS builder) or the InsPix2Pix folder config.source."""
  if config.dataset:
    if not config.data_dir:
      raise ConfigError("config.data_dir is required with config.dataset (where TFDS data is built)")
    return dataset_triplets(config)
  root = require(config, "source")
  if not Path(root).is_dir():
    raise FileNotFoundError(f"config.source={root!r} is not a folder (an InsPix2Pix folder "
                            "with seeds.json)")
  return load_triplets(root)


def _read_output(path: Path) -> dict:
  """The RewardEdit JSON written so far ({} if none); a broken file is an error, not a reset."""
  if not path.is_file():
    return {}
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except ValueError as e:
    raise ValueError(f"annotate: {path} exists but is not valid JSON ({e}); move it away to "
                     "start over") from None
  if not isinstance(data, dict):
    raise ValueError(f"annotate: {path} must hold an object {{<name>: [entry x 3]}}")
  return data
