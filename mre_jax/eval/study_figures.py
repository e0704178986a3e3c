"""The study's figures (PNG, matplotlib): bars with intervals, knob curves, an example grid."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import ml_collections

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mre_jax.eval import synthetic_eval  # noqa: E402
from mre_jax.eval.synthetic_eval import PERSPECTIVES  # noqa: E402
from mre_jax.io import files  # noqa: E402
from mre_jax.train import samples

COLOURS = {"baseline": "#8c8c8c", "reward": "#1f77b4"}


def _save(fig, path: Path) -> None:
  try:
    files.write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
  finally:
    plt.close(fig)


def bars(result: dict, path: Path) -> None:
  """Per perspective: baseline and reward model, overall and per category, 95% intervals."""
  rows = list(result["models"]["baseline"])
  fig, axes = plt.subplots(1, 3, figsize=(15, 3.8), sharey=True)
  x = np.arange(len(rows))
  for ax, p in zip(axes, PERSPECTIVES):
    for k, arm in enumerate(("baseline", "reward")):
      cells = [result["models"][arm][r][p] for r in rows]
      means = np.array([c["mean"] for c in cells])
      err = np.abs(np.array([c["ci"] for c in cells]).T - means)
      label = "baseline (no rewards)" if arm == "baseline" else "reward model at 5,5,5"
      ax.bar(x + (k - 0.5) * 0.38, means, 0.38, yerr=err, capsize=2, color=COLOURS[arm], label=label)
    ax.set_xticks(x, rows, rotation=45, ha="right")
    ax.set_title(p)
    ax.set_ylim(0, 5.3)
    ax.grid(axis="y", alpha=0.3)
  axes[0].set_ylabel("exact judge score (0-5)")
  axes[-1].legend(loc="upper right", fontsize=8)
  _save(fig, path)


def knobs(result: dict, path: Path) -> None:
  """Per requested perspective: the judged scores as its requested score goes 0..5 (others at 5)."""
  fig, axes = plt.subplots(1, 3, figsize=(15, 3.6), sharey=True)
  for ax, (name, curve) in zip(axes, result["knobs"].items()):
    values = [float(v) for v in curve]
    for p in PERSPECTIVES:
      means = np.array([curve[v][p]["mean"] for v in curve])
      lo, hi = np.array([curve[v][p]["ci"] for v in curve]).T
      style = "-o" if p == name else "--"
      ax.plot(values, means, style, label=f"judged {p}")
      ax.fill_between(values, lo, hi, alpha=0.15)
    ax.set_xlabel(f"requested {name} score (others 5)")
    ax.set_ylim(0, 5.3)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("judged score (0-5)")
  axes[0].legend(fontsize=8)
  _save(fig, path)


def examples(out: Path, test: synthetic_eval.TestSet, seed: int, path: Path, tile: int = 128) -> None:
  """input | truth | baseline | reward model, for the first example of each category (one seed)."""
  edits = {arm: np.load(out / "edits" / f"{arm}_seed{seed}.npz")["edits"] for arm in ("baseline", "reward")}
  picks = [test.categories.index(c) for c in dict.fromkeys(test.categories)]
  columns = [test.originals[picks], test.truths[picks], edits["baseline"][picks], edits["reward"][picks]]
  grid = samples.labelled_grid([c.astype(np.float32) / 255.0 for c in columns],
                             ("input", "truth", "baseline", "reward model 5,5,5"), tile)
  files.write_image(path, grid)


def write_figures(out: Path, result: dict, config: ml_collections.ConfigDict, test: synthetic_eval.TestSet) -> None:
  bars(result, out / "bars.png")
  knobs(result, out / "knobs.png")
  examples(out, test, config.seeds[0], out / "examples.png")
