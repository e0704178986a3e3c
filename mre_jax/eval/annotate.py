"""Rewards for training triplets from a judge -> RewardEdit-20K entries (SPEC section 1).

The `annotate` job (mre_jax/jobs/annotate.py) runs these pieces. An InsPix2Pix folder is read
directly: <source>/seeds.json is a list of [name, [seed, ...]], each <source>/<name>/ holds
prompt.json (key `edit`: the instruction, a string or a list, the first is used) and
<seed>_0.jpg (original), <seed>_1.jpg (edited). One pair per name is annotated (RewardEdit keys
are names): the first listed seed whose two images exist; its seed is recorded in the entries
(data/reward_edit reads it). A prepared TFDS builder can be the source instead
(`dataset_triplets`).

Each triplet is judged from the three perspectives, the judge also naming the failure points;
`entries_from_results` turns the judgments into {<name>: [{"Score": s, "Negative Prompt": text,
"seed": seed} x 3]} (following, preserving, quality; "None" when nothing is wrong).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

import ml_collections
import numpy as np

from mre_jax.data import input_pipeline, records
from mre_jax.eval import judge


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


def _triplet(root: str | os.PathLike, name: str, seeds: list) -> Triplet:
  t = Triplet(name)
  try:
    folder = records.safe_join(root, name, "seeds.json name")
    prompt = records.read_json(Path(folder, "prompt.json"), "prompt.json")
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


def load_triplets(root: str | os.PathLike) -> list[Triplet]:
  """One triplet per seeds.json entry, in file order; broken entries carry an `error`."""
  path = Path(root, "seeds.json")
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


def dataset_triplets(config: ml_collections.ConfigDict) -> list[Triplet]:
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


def _load(paths: tuple[str, str]) -> Callable:
  return lambda: (records.load_rgb(paths[0]), records.load_rgb(paths[1]))


def _fail(message: str) -> Callable:
  def load():
    raise ValueError(message)
  return load


def judge_requests(triplets: list[Triplet]) -> list[judge.Request]:
  """Three judge requests per triplet, each asking for the failure points too (`describe`)."""
  out = []
  for t in triplets:
    load = _fail(t.error) if t.error else (t.load or _load((t.original, t.edited)))
    out += [judge.Request(t.name, p, t.instruction, load, describe=True, meta={"seed": t.seed})
            for p in judge.PERSPECTIVES]
  return out


def entries_from_results(results: list[dict]) -> tuple[dict, dict]:
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
