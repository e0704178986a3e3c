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
from pathlib import Path
from typing import Callable

import ml_collections
import numpy as np

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


def cached_edits(out: Path, name: str, make_fn: Callable[[], np.ndarray]) -> np.ndarray:
  """uint8 edits stored under OUT/edits/<name>.npz; made (and stored atomically) when missing."""
  path = out / "edits" / f"{name}.npz"
  if path.is_file():
    return np.load(path)["edits"]
  images = make_fn()
  files.write_atomic(path, lambda f: np.savez_compressed(f, edits=images))
  return images


def _sampler(config: ml_collections.ConfigDict) -> dict:
  ev = config.eval
  return dict(steps=ev.steps, text_guidance=ev.text_guidance, image_guidance=ev.image_guidance,
              batch_size=ev.batch_size, seed=ev.seed)


def edit_all(config: ml_collections.ConfigDict, out: Path, test: synthetic_eval.TestSet,
             knob_test: synthetic_eval.TestSet) -> dict[str, np.ndarray]:
  """Judged scores [seeds, N, 3] per model and per knob setting ("knob/<perspective>/<value>")."""
  scores: dict[str, list] = {}
  for seed in config.seeds:
    editors = {}
    for arm in ARMS:
      def make(arm=arm):
        editors.setdefault(arm, edit.load_editor(out / f"{arm}_seed{seed}"))
        return synthetic_eval.edit_test_set(editors[arm], test, **_sampler(config))
      scores.setdefault(arm, []).append(synthetic_eval.judge_set(test, cached_edits(out, f"{arm}_seed{seed}", make)))
    for p, name in enumerate(PERSPECTIVES):
      for value in config.eval.knob_values:
        request, text = knob_request(p, value)

        def make(request=request, text=text):
          editors.setdefault("reward", edit.load_editor(out / f"reward_seed{seed}"))
          return synthetic_eval.edit_test_set(editors["reward"], knob_test, scores=request, reward_text=text,
                                              **_sampler(config))
        images = cached_edits(out, f"reward_seed{seed}_knob_{name}_{value:g}", make)
        scores.setdefault(f"knob/{name}/{value:g}", []).append(synthetic_eval.judge_set(knob_test, images))
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
