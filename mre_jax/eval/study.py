"""The paper's ablation, reward conditioning against no rewards, on the synthetic world: the pieces
the `study` job (mre_jax/jobs/study.py) runs.

For every seed, two models train on the same data (synthetic_edit: most targets are corrupted
edits, with their judged scores and failure texts), for the same steps, from the same seed:
the reward model (stage 2, `model.reward=True`) and the baseline (`model.reward=False`). Both
go through the train job users run (TFDS builder, grain pipeline over the latent cache, the
sharded train step), then the editor (`edit.load_editor`) edits the same held-out examples
with the same noise: the reward model at rewards (5, 5, 5) and "None; None; None". The exact
judge (`synthetic_eval`) scores every edit. The knobs: the reward model edits again while
the requested score of one perspective goes through `config.eval.knob_values` with the other
two at 5 (its reward text says "None" at 5, else a generic failure of that perspective).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable

import ml_collections
import numpy as np
from flax import traverse_util

from mre_jax.errors import ConfigError
from mre_jax.eval import synthetic_eval
from mre_jax.eval.synthetic_eval import PERSPECTIVES
from mre_jax.infer import edit
from mre_jax.io import files

ARMS = ("baseline", "reward")
# Reward text of a perspective whose requested score is below 5 (the data's generic wording).
KNOB_TEXTS = ("the edit is only partly applied", "the image changed", "the image is noisy")


def train_config(config: ml_collections.ConfigDict, out: Path, arm: str, seed: int) -> ml_collections.ConfigDict:
  """The train job's config for one model: `config.train` with the arm's reward switch and seed."""
  cfg = copy.deepcopy(config.train)
  with cfg.unlocked():
    cfg.seed = seed
    cfg.model.reward = arm == "reward"
    cfg.data.data_dir = cfg.data.data_dir or str(out / "tfds")
    cfg.eval.count = 0  # the study evaluates both models itself, on the same examples
  return cfg


def knob_request(perspective: int, value: float) -> tuple[tuple[float, ...], str]:
  """(scores, reward text) asking for `value` on one perspective and 5 on the others."""
  scores = [5.0, 5.0, 5.0]
  scores[perspective] = float(value)
  texts = ["None"] * 3
  if value < 5:
    texts[perspective] = KNOB_TEXTS[perspective]
  return tuple(scores), "; ".join(texts)


def edit_meta(config: ml_collections.ConfigDict, arm: str, seed: int, kind: str,
              request: tuple[tuple[float, ...], str] | None = None) -> dict:
  """What a set of edits depends on, stored beside them: the model's train config (its data folder
  aside), the examples, the sampler (its batch size aside: results do not depend on it) and the
  reward request. Edits made elsewhere with the same meta come from the same experiment (the same
  seed may train to other weights on another CPU kind, as README notes), so runs pool."""
  train = train_config(config, Path("."), arm, seed).to_dict()
  train["data"].pop("data_dir")
  sampler = _sampler(config)
  sampler.pop("batch_size")
  scores, text = request or (synthetic_eval.BEST_SCORES, synthetic_eval.BEST_REWARD_TEXT)
  examples = config.eval.count if kind == "test" else config.eval.knob_count
  return {"train": train, "examples": examples, "sampler": sampler,
          "request": {"scores": [float(x) for x in scores], "reward_text": text}}


def check_edits(path: Path, meta: dict) -> None:
  """ConfigError naming `path` and the fields whose values differ from `meta` (JSON-normalised)."""
  with np.load(path) as f:
    if "meta" not in f.files:
      raise ConfigError(f"{path} has no meta record (made before 2026-12-08?): delete it to make those edits again")
    stored = traverse_util.flatten_dict(json.loads(str(f["meta"])), sep=".")
  wanted = traverse_util.flatten_dict(json.loads(json.dumps(meta)), sep=".")
  diff = [f"{k}: {stored.get(k, '(missing)')!r} there, {wanted.get(k, '(missing)')!r} here"
          for k in sorted(set(stored) | set(wanted)) if stored.get(k) != wanted.get(k)]
  if diff:
    raise ConfigError(f"{path} was made by another config ({'; '.join(diff[:5])}"
                      f"{'; ...' if len(diff) > 5 else ''}): delete it, or run with that config")


def cached_edits(out: Path, name: str, meta: dict, make_fn: Callable[[], np.ndarray]) -> np.ndarray:
  """uint8 edits stored under OUT/edits/<name>.npz with their `meta`; made (and stored atomically) when
  missing; ConfigError when the stored meta differs."""
  path = out / "edits" / f"{name}.npz"
  if path.is_file():
    check_edits(path, meta)
    with np.load(path) as f:
      return f["edits"]
  images = make_fn()
  record = np.array(json.dumps(meta, sort_keys=True))
  files.write_atomic(path, lambda f: np.savez_compressed(f, edits=images, meta=record))
  return images


def edit_sets(config: ml_collections.ConfigDict, arm: str, seed: int) -> list[tuple[str, str, str, tuple | None]]:
  """(file name, score key, test set: "test" or "knob", reward request or None for 5,5,5) of every
  edit set made with one model."""
  sets = [(f"{arm}_seed{seed}", arm, "test", None)]
  if arm == "reward":
    sets += [(f"reward_seed{seed}_knob_{name}_{value:g}", f"knob/{name}/{value:g}", "knob", knob_request(p, value))
             for p, name in enumerate(PERSPECTIVES) for value in config.eval.knob_values]
  return sets


def edits_done(config: ml_collections.ConfigDict, out: Path, arm: str, seed: int) -> bool:
  """Whether every edit set of one model is in OUT/edits (each checked against this config's meta):
  then the model itself is not needed, so seeds trained and edited elsewhere pool here."""
  paths = [(out / "edits" / f"{name}.npz", kind, request) for name, _, kind, request in edit_sets(config, arm, seed)]
  if not all(path.is_file() for path, *_ in paths):
    return False
  for path, kind, request in paths:
    check_edits(path, edit_meta(config, arm, seed, kind, request))
  return True


def _sampler(config: ml_collections.ConfigDict) -> dict:
  ev = config.eval
  return dict(steps=ev.steps, text_guidance=ev.text_guidance, image_guidance=ev.image_guidance,
              batch_size=ev.batch_size, seed=ev.seed)


def edit_all(config: ml_collections.ConfigDict, out: Path, test: synthetic_eval.TestSet,
             knob_test: synthetic_eval.TestSet) -> dict[str, np.ndarray]:
  """Judged scores [seeds, N, 3] per model and per knob setting ("knob/<perspective>/<value>")."""
  scores: dict[str, list] = {}
  for seed in config.seeds:
    for arm in ARMS:
      editor = None
      for name, key, kind, request in edit_sets(config, arm, seed):
        examples = test if kind == "test" else knob_test

        def make(examples=examples, request=request):
          nonlocal editor
          editor = editor or edit.load_editor(out / f"{arm}_seed{seed}")
          ask = {} if request is None else dict(scores=request[0], reward_text=request[1])
          return synthetic_eval.edit_test_set(editor, examples, **ask, **_sampler(config))
        images = cached_edits(out, name, edit_meta(config, arm, seed, kind, request), make)
        scores.setdefault(key, []).append(synthetic_eval.judge_set(examples, images))
  return {k: np.stack(v) for k, v in scores.items()}


def report(config: ml_collections.ConfigDict, scores: dict[str, np.ndarray], test: synthetic_eval.TestSet,
           knob_test: synthetic_eval.TestSet) -> dict:
  """The study's figures as a JSON-able dict (see the module docstring)."""
  kw = dict(samples=config.eval.bootstrap_samples)
  models = {arm: synthetic_eval.summarize(scores[arm], test.categories, **kw) for arm in ARMS}
  models["reward - baseline"] = synthetic_eval.summarize(scores["reward"] - scores["baseline"], test.categories, **kw)
  refs = {name: synthetic_eval.summarize(synthetic_eval.judge_set(test, images), test.categories, **kw)
          for name, images in synthetic_eval.reference_edits(test).items()}
  knobs = {name: {f"{v:g}": synthetic_eval.summarize(scores[f"knob/{name}/{v:g}"], knob_test.categories,
                                                       **kw)["overall"]
                  for v in config.eval.knob_values} for name in PERSPECTIVES}
  return {"seeds": list(config.seeds), "steps": config.train.num_steps, "examples": len(test),
          "knob_examples": len(knob_test), "models": models, "references": refs, "knobs": knobs,
          "sampler": _sampler(config)}


def _fmt(cell: dict, signed: bool = False) -> str:
  lo, hi = cell["ci"]
  return f"{cell['mean']:+.2f} [{lo:+.2f}, {hi:+.2f}]" if signed else f"{cell['mean']:.2f} [{lo:.2f}, {hi:.2f}]"


def table_markdown(result: dict) -> str:
  """Overall and per-category tables, and the knob table, of `report`'s result."""
  m = result["models"]
  lines = [f"Seeds {result['seeds']}, {result['steps']} steps each; {result['examples']} held-out edits per "
           "model and seed; exact judge (0-5), mean [95% bootstrap interval over seeds and examples].", "",
           "| model | " + " | ".join(PERSPECTIVES) + " |", "| --- |" + " --- |" * 3]
  rows = [("baseline (no rewards)", m["baseline"]), ("reward model at 5,5,5", m["reward"])]
  rows += [(f"reference: {k}", v) for k, v in result["references"].items()]
  for name, summary in rows:
    lines.append(f"| {name} | " + " | ".join(_fmt(summary["overall"][p]) for p in PERSPECTIVES) + " |")
  diff = m["reward - baseline"]
  lines.append("| **reward - baseline** (paired) | " + " | ".join(_fmt(diff["overall"][p], True) for p in PERSPECTIVES)
               + " |")
  for p in PERSPECTIVES:
    lines += ["", f"{p}, per category:", "", "| category | n | baseline | reward model | reward - baseline |",
              "| --- | --- | --- | --- | --- |"]
    for row in diff:
      lines.append(f"| {row} | {diff[row][p]['n']} | {_fmt(m['baseline'][row][p])} | {_fmt(m['reward'][row][p])} | "
                   f"{_fmt(diff[row][p], True)} |")
  lines += ["", f"Knobs: the reward model's judged scores ({result['knob_examples']} examples) when one "
            "perspective's requested score varies and the other two are 5:", "",
            "| requested | value | " + " | ".join(f"judged {p}" for p in PERSPECTIVES) + " |",
            "| --- | --- |" + " --- |" * 3]
  for name, curve in result["knobs"].items():
    for value, cells in curve.items():
      lines.append(f"| {name} | {value} | " + " | ".join(_fmt(cells[p]) for p in PERSPECTIVES) + " |")
  return "\n".join(lines) + "\n"
