"""The judge's offline backend for the synthetic world (`config.judge.backend="synthetic"`).

No API: an edit is scored exactly against its stored ground truth (mre_jax.data.synthetic.judge)
and answered in the same dictionary form as a VLM's, so the whole judging path (parsing, cache,
tables) runs offline. The truth is found through an index, `write_truth_index`, keyed by the
original's pixels and the instruction. judge.make_backend imports this module only when a config
asks for it: judging with OpenAI never loads the synthetic world.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import ml_collections
import numpy as np
from PIL import Image

from mre_jax.data import records, synthetic
from mre_jax.errors import ConfigError
from mre_jax.eval.judge import PERSPECTIVES, Budget, JudgeFailure, Query, image_hash
from mre_jax.io import files


def truth_key(original: np.ndarray, instruction: str) -> str:
  return f"{image_hash(original)} {instruction}"


def write_truth_index(path: str | os.PathLike,
                      entries: Iterable[tuple[np.ndarray, str, str, Sequence[str] | None]]) -> None:
  """Writes the synthetic backend's index of ground truths, atomically.

  entries: iterable of (original uint8 [H, W, 3], instruction, truth path relative to the
  index's folder, failures: (text when not applied, text when partly applied) or None).
  """
  index = {truth_key(o, instr): {"truth": rel, "failures": list(f) if f else None}
           for o, instr, rel, f in entries}
  files.write_json(path, {"version": 1, "entries": index}, indent=1, sort_keys=True)


class SyntheticBackend:
  """Offline judge of the synthetic world: exact scores against the stored ground truth."""

  name = "synthetic"
  model = "synthetic-exact"
  # It finds the truth by the original's pixels and compares at the truth's size, so callers
  # send the photo and the edit as they are, not resized as for a VLM.
  needs_source_images = True

  def __init__(self, truth_path: str | os.PathLike, yes_threshold: float = 4.0):
    index = records.load_source_json(truth_path, "judge", "the synthetic truth index")
    if not isinstance(index, dict) or not isinstance(index.get("entries"), dict):
      raise ValueError(f"judge: {truth_path} is not a truth index ({{'entries': {{...}}}})")
    self.entries, self.root = index["entries"], Path(truth_path).absolute().parent
    self.yes_threshold = yes_threshold

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict) -> SyntheticBackend:
    """From config.judge: `truth` (required) and `yes_threshold`."""
    if not cfg.truth:
      raise ConfigError("config.judge.truth is required for config.judge.backend='synthetic'")
    return cls(cfg.truth, cfg.yes_threshold)

  def answer(self, query: Query, budget: Budget) -> tuple[str, int, None]:
    entry = self.entries.get(truth_key(query.original, query.instruction))
    if entry is None:
      raise JudgeFailure("failed", f"no ground truth for this original and instruction "
                         f"{query.instruction!r}")
    truth = records.load_rgb(records.safe_join(self.root, entry["truth"], "truth"))
    edited = query.edited
    if edited.shape != truth.shape:
      edited = np.asarray(Image.fromarray(edited).resize(truth.shape[1::-1], Image.BICUBIC))
    measures = synthetic.judge(query.original, truth, edited)
    texts = synthetic.failure_texts(measures, entry.get("failures") or synthetic.GENERIC_FAILURES)
    i = PERSPECTIVES.index(query.perspective)
    score = round(float(measures["scores"][i]), 3)
    answer = {"verdict": "yes" if score >= self.yes_threshold else "no", "score": score}
    if query.describe:
      answer["failure"] = texts[i]
    return repr(answer), 1, None
