"""The `annotate` job: rewards for training triplets from a judge -> RewardEdit-20K JSON.

python main.py --config=configs/annotate.py --config.source=DIR --workdir=OUT

Reads an InsPix2Pix folder directly (SPEC section 1): <source>/seeds.json is a list of
[name, [seed, ...]], each <source>/<name>/ holds prompt.json (key `edit`: the instruction,
a string or a list, the first is used) and <seed>_0.jpg (original), <seed>_1.jpg (edited).
One pair per name is annotated (RewardEdit keys are names): the first listed seed whose two
images exist; its seed is recorded in the entries (data/reward_edit reads it).

Each triplet is judged from the three perspectives, the judge also naming the failure
points, and written as {<name>: [{"Score": s, "Negative Prompt": text, "seed": seed} x 3]}
(following, preserving, quality; "None" when nothing is wrong) to <workdir>/<config.output>,
atomically. Resumable twice over: names already in that file are skipped, and every paid
answer is in <workdir>/judge_cache.jsonl. An answer that cannot be read is asked again
(config.judge.max_tries), and a rerun asks again for those still unread
(config.judge.rejudge_unparsed). Names that could not be annotated are listed with their
reason in <workdir>/failures.json; <workdir>/results.jsonl holds this run's judgments, every
try included; the summary line gives this run's re-ask figures.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np
from absl import logging

from mre_jax.data import input_pipeline, records
from mre_jax.errors import ConfigError, require
from mre_jax.eval import judge
from mre_jax.io import files


@dataclasses.dataclass
class Triplet:
  """One (original, edited, instruction) of a name; `error` says why it cannot be judged."""
  name: str
  seed: str = ""
  instruction: str = ""
  original: str = ""
  edited: str = ""
  error: str | None = None
  load: Any = None  # () -> (original, edited) uint8 arrays, for records of a TFDS source


def _triplet(root: str, name: str, seeds: list) -> Triplet:
  t = Triplet(name)
  try:
    folder = records.safe_join(root, name, "seeds.json name")
    prompt = records.read_json(os.path.join(folder, "prompt.json"), "prompt.json")
    if not isinstance(prompt, dict):
      raise records.BadRecord("bad_json", f"{folder}/prompt.json is not an object")
    t.instruction = records.parse_instructions(prompt.get("edit"), f"{name}/prompt.json: edit")[0]
    for seed in map(str, seeds):
      paths = [records.find_image(folder, f"{seed}_{i}") for i in (0, 1)]
      if seed.isdigit() and all(paths):
        t.seed, (t.original, t.edited) = seed, paths
        return t
    raise records.BadRecord("missing_file", f"{folder}: no <seed>_0/<seed>_1 image pair for "
                            f"seeds {list(map(str, seeds))[:5]}")
  except records.BadRecord as e:
    t.error = str(e)
  return t


def load_triplets(root: str) -> list[Triplet]:
  """One triplet per seeds.json entry, in file order; broken entries carry an `error`."""
  path = os.path.join(root, "seeds.json")
  listing = records.load_source_json(path, "annotate", "a list of [name, [seed, ...]]")
  if not isinstance(listing, list):
    raise ValueError(f"annotate: {path} must hold a list of [name, [seed, ...]], "
                     f"got {type(listing).__name__}")
  triplets = []
  for i, entry in enumerate(listing):
    if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
            and isinstance(entry[1], list)):
      triplets.append(Triplet(f"seeds.json[{i}]", error=f"bad_entry: {entry!r}"))
      continue
    triplets.append(_triplet(root, entry[0], entry[1]))
  return triplets


def dataset_triplets(config) -> list[Triplet]:
  """Triplets of a prepared TFDS builder in data/ (config.dataset, e.g. instruct_pix2pix).

  A record's key in the output is the folder of its `name` field (`<folder>/<seed>`, with the
  seed kept in the entry as the reward_edit builder reads it), else `<dataset>/<index>`.
  """
  kwargs = {"config": config.builder_config} if config.builder_config else {}
  builder = input_pipeline.build_dataset(config.dataset, config.data_dir, config.manual_dir or None, **kwargs)
  source = input_pipeline.data_source(builder, config.split)
  text = lambda v: v.decode() if isinstance(v, bytes) else str(v)
  triplets = []
  for i in range(len(source)):
    record = source[i]
    name, seed = text(record.get("name", b"")), ""
    if name.rpartition("/")[2].isdigit():
      name, _, seed = name.rpartition("/")
    load = lambda i=i: (np.asarray(source[i]["original"]), np.asarray(source[i]["edited"]))
    triplets.append(Triplet(name or f"{config.dataset}/{i}", seed=seed, instruction=text(record["instruction"]),
                            load=load))
  return triplets


def _load(path: str):
  return lambda: (records.load_rgb(path[0]), records.load_rgb(path[1]))


def _fail(message: str):
  def load():
    raise ValueError(message)
  return load


def _requests(triplets: list[Triplet]) -> list:
  out = []
  for t in triplets:
    load = _fail(t.error) if t.error else (t.load or _load((t.original, t.edited)))
    out += [judge.Request(t.name, p, t.instruction, load, describe=True, meta={"seed": t.seed})
            for p in judge.PERSPECTIVES]
  return out


def _read_output(path: str) -> dict:
  """The RewardEdit JSON written so far ({} if none); a broken file is an error, not a reset."""
  if not os.path.isfile(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except ValueError as e:
    raise ValueError(f"annotate: {path} exists but is not valid JSON ({e}); move it away to "
                     "start over") from None
  if not isinstance(data, dict):
    raise ValueError(f"annotate: {path} must hold an object {{<name>: [entry x 3]}}")
  return data


def entries_from_results(results: list[dict]):
  """Result records -> ({name: [entry x 3]}, {name: {"reason", "detail"}})."""
  by_name = {}
  for r in results:
    by_name.setdefault(r["item"], {})[r["perspective"]] = r
  done, failed = {}, {}
  for name, rows in by_name.items():
    bad = [rows[p] for p in judge.PERSPECTIVES if rows[p]["status"] != "ok"]
    if bad:
      failed[name] = {"reason": bad[0]["status"],
                      "detail": f"{bad[0]['perspective']}: {bad[0].get('error')}"}
      continue
    done[name] = [{"Score": rows[p]["score"], "Negative Prompt": rows[p]["failure"],
                   "seed": rows[p]["seed"]} for p in judge.PERSPECTIVES]
  return done, failed


def annotate(config, workdir: str) -> dict:
  """The `annotate` job; returns the written RewardEdit dict."""
  if not workdir:
    raise ConfigError("--workdir is required (job 'annotate')")
  if config.dataset:
    if not config.data_dir:
      raise ConfigError("config.data_dir is required with config.dataset (where TFDS data is built)")
    triplets = dataset_triplets(config)
  else:
    root = require(config, "source")
    if not os.path.isdir(root):
      raise FileNotFoundError(f"config.source={root!r} is not a folder (an InsPix2Pix folder "
                              "with seeds.json)")
    triplets = load_triplets(root)
  out_path = os.path.join(workdir, config.output)
  os.makedirs(workdir, exist_ok=True)
  output = _read_output(out_path)
  triplets = triplets[:config.limit] if config.limit else triplets
  todo = [t for t in triplets if t.name not in output]
  logging.info("annotate: %d names, %d already annotated", len(triplets), len(triplets) - len(todo))
  results = judge.judge_with_config(config.judge, workdir, _requests(todo))
  done, failed = entries_from_results(results)
  output.update(done)
  files.write_json(out_path, output, indent=1, sort_keys=True)
  files.write_json(os.path.join(workdir, "failures.json"), failed, indent=1, sort_keys=True)
  files.write_jsonl(os.path.join(workdir, "results.jsonl"), results, sort_keys=True)
  print(f"annotated {len(done)} names this run ({len(output)} in {out_path}); failed: "
        f"{len(failed)} (see failures.json); {judge.reask_summary(judge.reask_counts(results))}",
        flush=True)
  return output


# ------------------------------------------------------------- synthetic InsPix2Pix

