"""The `evaluate` job: edit every Real-Edit (photo, instruction), judge, tabulate (SPEC 5).

python main.py --config=configs/evaluate.py --config.checkpoint=DIR \
    --config.real_edit_dir=DIR --workdir=OUT [--config.compare=OTHER_RUN|release|proper]

Workdir layout (every step resumes from it):
  edits/<photo>-<crc>__<i>.png  the edits, lossless; an edit on disk is never redone
  judge_cache.jsonl       every paid answer, append-only (mre_jax.eval.judge.JudgmentCache)
  results.jsonl           one line per (edit, perspective): status, verdict, score, raw
                          answer, every try (re-asks), latency, attempts, prompt version,
                          model, category, ...
  table.json, table.md    per perspective the share of "yes" and the mean score with 95%
                          bootstrap intervals, overall and per category; judged/failed counts,
                          re-ask figures, and the protocol that read the answers
  compare.md              with config.compare: this run's table next to the other one
  run_config.json         the config of the last run, without the API key

What the judge sees and how answers become the table: mre_jax.eval.evaluators. The editing
model is built lazily, only when edits are missing, from config.edit_factory = "module:function"
(default "mre_jax.infer.edit:make_edit_fn"): a function `make_edit_fn(config) -> edit_fn` that
receives this job's whole config (config.checkpoint, config.edit.*).
"""

from __future__ import annotations

import functools
import importlib
import json
import os
from pathlib import Path
from typing import Callable

import ml_collections

from mre_jax.errors import ConfigError, require, require_workdir
from mre_jax.eval import evaluators, judge
from mre_jax.infer import sizes
from mre_jax.io import files

DEFAULT_EDIT_FACTORY = "mre_jax.infer.edit:make_edit_fn"


def check_config(config: ml_collections.ConfigDict) -> None:
  """The evaluation's own fields, checked before any editing (ConfigError naming field and value)."""
  if config.judge.protocol not in evaluators.PROTOCOLS:
    raise ConfigError(f"config.judge.protocol={config.judge.protocol!r}: expected one of "
                      f"{', '.join(evaluators.PROTOCOLS)}")
  sizes.check_size_rule(config.edit.size_rule, "config.edit.size_rule")
  resolution, height = config.edit.resolution, config.judge_height
  if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1 or resolution % 64:
    raise ConfigError(f"config.edit.resolution={resolution!r}: expected a positive multiple of 64")
  if isinstance(height, bool) or not isinstance(height, int) or height < 0:
    raise ConfigError(f"config.judge_height={height!r}: expected an integer >= 0 (0: the photo and "
                      "the edit as they are)")


def load_edit_factory(spec: str) -> Callable:
  """"module:function" -> the function; ConfigError naming config.edit_factory if absent."""
  module_name, _, fn_name = spec.partition(":")
  if not module_name or not fn_name:
    raise ConfigError(f"config.edit_factory={spec!r}: expected 'module:function'")
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
      raise ConfigError(f"config.edit_factory={spec!r}: module {module_name} does not exist (is "
                        "the editing pipeline installed yet?); point config.edit_factory at a "
                        "'module:function' returning edit_fn(images, instructions)") from None
    raise
  if not hasattr(module, fn_name):
    raise ConfigError(f"config.edit_factory={spec!r}: {module_name} has no function {fn_name} "
                      "(expected make_edit_fn(config) -> edit_fn(images, instructions))")
  return getattr(module, fn_name)


def _build_edit_fn(config: ml_collections.ConfigDict) -> evaluators.EditFn:
  if config.edit_factory == DEFAULT_EDIT_FACTORY and not config.checkpoint:
    raise ConfigError("config.checkpoint is required to edit (a project checkpoint folder); "
                      "or set config.edit_factory")
  return load_edit_factory(config.edit_factory)(config)


def write_run_config(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
  """config as JSON, without the API key."""
  d = config.to_dict()
  d.get("judge", {}).pop("api_key", None)
  files.write_json(Path(workdir, "run_config.json"), d, indent=1, default=str)


def run_real_edit(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                  edit_fn: evaluators.EditFn | None = None) -> dict:
  """Edits (missing edits only), judges and tabulates Real-Edit; returns the table.

  edit_fn: the editing callable; None builds it from config.edit_factory when needed.
  """
  root = require(config, "real_edit_dir")
  check_config(config)
  workdir = Path(workdir)
  edits_dir = workdir / "edits"
  items = evaluators.load_real_edit(root, edits_dir, config.json_name)
  if config.limit:
    items = items[:config.limit]
  backend = judge.make_backend(config.judge)  # Config errors before hours of editing.
  edits_dir.mkdir(parents=True, exist_ok=True)
  write_run_config(config, workdir)
  evaluators.make_edits(items, (lambda: edit_fn) if edit_fn else lambda: _build_edit_fn(config), config.batch_size)
  # An exact backend compares with its ground truth at the photo's size: no resizing for it.
  height = 0 if getattr(backend, "needs_source_images", False) else config.judge_height
  prepare = functools.partial(evaluators.judge_images, resolution=config.edit.resolution,
                              size_rule=config.edit.size_rule, height=height)
  results = judge.judge_with_config(config.judge, workdir, evaluators.judge_requests(items, prepare), backend)
  files.write_jsonl(workdir / "results.jsonl", results, sort_keys=True)
  table = evaluators.make_table(results, protocol=config.judge.protocol, samples=config.bootstrap_samples,
                                seed=config.seed)
  files.write_json(workdir / "table.json", table, indent=1)
  markdown = evaluators.table_markdown(table)
  files.write_atomic(workdir / "table.md", markdown)
  print(markdown, flush=True)
  return table


def evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike | None) -> None:
  """The `evaluate` job: run Real-Edit into workdir, then compare with config.compare."""
  workdir = require_workdir(workdir, "edits, judgements and the table are written there")
  check_config(config)
  if config.real_edit_dir:
    table = run_real_edit(config, workdir)
  elif config.compare:
    table = _load_table(workdir)
  else:
    raise ConfigError("config.real_edit_dir is required (job 'evaluate'), or config.compare "
                      "with a workdir that has a table")
  if config.compare:
    other_name, other = _other_table(config, workdir)
    text = evaluators.compare_markdown(table, other, str(workdir), other_name)
    files.write_atomic(Path(workdir, "compare.md"), text)
    print(text, flush=True)


def _other_table(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> tuple[str, dict]:
  """(name, table) config.compare names: a protocol reads this run's results, else another run's table."""
  if config.compare in evaluators.PROTOCOLS:
    return (f"{workdir} read by the {config.compare} protocol",
            evaluators.make_table(_load_results(workdir), protocol=config.compare,
                                  samples=config.bootstrap_samples, seed=config.seed))
  return config.compare, _load_table(config.compare)


def _load_table(run: str | os.PathLike) -> dict:
  path = Path(run, "table.json") if Path(run).is_dir() else Path(run)
  if not path.is_file():
    raise FileNotFoundError(f"compare: no table at {path} (a run folder with table.json, or the file)")
  return json.loads(path.read_text(encoding="utf-8"))


def _load_results(run: str | os.PathLike) -> list[dict]:
  path = Path(run, "results.jsonl")
  if not path.is_file():
    raise FileNotFoundError(f"compare: no results at {path} (config.compare=<protocol> reads "
                            "this run's results that way)")
  return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
