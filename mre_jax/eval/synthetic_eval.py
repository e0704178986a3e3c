"""Exact evaluation on the synthetic world: edit held-out test examples, score with `synthetic.judge`.

The synthetic_edit test split holds scenes no training example shows (`synthetic.scene_split`),
with the exact edit of every instruction. An evaluation edits them with the real editor
(`edit.edit_arrays`, the code the edit job runs) and judges each edit against its ground truth
from the paper's three perspectives, 0..5. Figures are means with 95% bootstrap intervals,
overall and per category, next to two references judged the same way: the unchanged input
(what a model that ignores the instruction gets) and the ground-truth edit (5, 5, 5).

The train job runs `evaluate_run` at its end (`config.eval`) and writes `<workdir>/eval.json`;
the study (mre_jax/eval/study.py) calls the pieces below for every model, seed and reward request.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mre_jax.data import input_pipeline, records, synthetic
from mre_jax.infer import diffusion, edit, sampling
from mre_jax.io import files, pretrained
from mre_jax.train import vae_train

if TYPE_CHECKING:
  import tensorflow_datasets as tfds

PERSPECTIVES = ("following", "preserving", "quality")
BEST_SCORES = (5.0, 5.0, 5.0)
BEST_REWARD_TEXT = "None; None; None"


@dataclasses.dataclass
class TestSet:
  """Held-out examples: originals and truths uint8 [N, S, S, 3], instructions, categories."""

  originals: np.ndarray
  truths: np.ndarray
  instructions: list[str]
  categories: list[str]

  def __len__(self) -> int:
    return len(self.instructions)


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def load_test_set(builder: tfds.core.DatasetBuilder, split: str = "test", count: int = 0) -> TestSet:
  """`count` examples of a synthetic_edit split (0: all), the same number from every category
  where it divides (else the first categories get one more), each category's in record order."""
  source = input_pipeline.data_source(builder, split)
  count = len(source) if count <= 0 else count
  categories = [_text(source[i]["category"]) for i in range(len(source))]
  names = [c for c in records.CATEGORIES if c in categories]
  wanted = {c: count // len(names) + (k < count % len(names)) for k, c in enumerate(names)}
  picked = [i for c in names for i in [j for j, x in enumerate(categories) if x == c][:wanted[c]]]
  if len(picked) < count:
    raise ValueError(f"{builder.name}:{builder.builder_config.name} split {split!r} has too few examples for "
                     f"{count} balanced over {len(names)} categories (config.eval.count)")
  rows = [source[i] for i in picked]
  return TestSet(np.stack([r["original"] for r in rows]), np.stack([r["truth"] for r in rows]),
                 [_text(r["instruction"]) for r in rows], [_text(r["category"]) for r in rows])


def reference_edits(test: TestSet) -> dict[str, np.ndarray]:
  """What the references submit: the unchanged input and the ground-truth edit."""
  return {"input": test.originals, "truth": test.truths}


def edit_test_set(editor: edit.Editor, test: TestSet, *, scores: Sequence[float] = BEST_SCORES,
                  reward_text: str = BEST_REWARD_TEXT, seed: int = 0, steps: int = 20,
                  text_guidance: float = 7.5, image_guidance: float = 1.5, batch_size: int = 35) -> np.ndarray:
  """uint8 [N, S, S, 3]: every example edited with the same reward request.

  Example i draws its noise from seed `seed * 1_000_003 + i` alone, so results do not depend
  on the batch size, and two models (or two reward requests) edited with the same seed start
  from the same noise.
  """
  out = []
  for start in range(0, len(test), batch_size):
    stop = min(start + batch_size, len(test))
    pixels = test.originals[start:stop].astype(np.float32) / 127.5 - 1.0
    images = edit.edit_arrays(
        editor, pixels, test.instructions[start:stop], seeds=[seed * 1_000_003 + i for i in range(start, stop)],
        scores=[tuple(scores)] * (stop - start), reward_texts=[reward_text] * (stop - start), steps=steps,
        text_guidance=text_guidance, image_guidance=image_guidance)
    out.append(np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8))
  return np.concatenate(out)


def judge_set(test: TestSet, edited: np.ndarray) -> np.ndarray:
  """float32 [N, 3]: `synthetic.judge` scores (following, preserving, quality) of each edit."""
  return np.stack([synthetic.judge(o, t, e)["scores"] for o, t, e in zip(test.originals, test.truths, edited)])


def bootstrap_mean(values: np.ndarray, *, samples: int = 2000, seed: int = 0) -> dict:
  """Mean and 95% percentile bootstrap interval of `values` [n] or [seeds, n].

  With several seeds (rows: runs, columns: the same examples), runs and examples are resampled
  independently (a two-way bootstrap), so the interval covers the spread of both.
  """
  values = np.atleast_2d(np.asarray(values, np.float64))
  rng = np.random.default_rng(seed)
  runs = rng.integers(0, values.shape[0], (samples, values.shape[0]))
  cols = rng.integers(0, values.shape[1], (samples, values.shape[1]))
  means = np.array([values[r][:, c].mean() for r, c in zip(runs, cols)])
  lo, hi = np.percentile(means, [2.5, 97.5])
  return {"mean": float(values.mean()), "ci": [float(lo), float(hi)], "n": int(values.shape[1])}


def summarize(scores: np.ndarray, categories: Sequence[str], **kwargs: Any) -> dict:
  """{"overall" | category: {perspective: bootstrap_mean}} of scores [N, 3] or [seeds, N, 3]."""
  scores = np.asarray(scores, np.float64)
  scores = scores[None] if scores.ndim == 2 else scores
  cats = np.asarray(categories)
  rows = {"overall": np.ones(len(cats), bool)}
  rows.update({c: cats == c for c in records.CATEGORIES if np.any(cats == c)})
  return {row: {p: bootstrap_mean(scores[:, mask, j], **kwargs) for j, p in enumerate(PERSPECTIVES)}
          for row, mask in rows.items()}


def table_markdown(summaries: dict[str, dict], row: str = "overall") -> str:
  """One line per model: mean [95% interval] per perspective for one row (overall or a category)."""
  lines = ["| model | " + " | ".join(PERSPECTIVES) + " |", "| --- |" + " --- |" * len(PERSPECTIVES)]
  for name, summary in summaries.items():
    cells = [f"{summary[row][p]['mean']:.2f} [{summary[row][p]['ci'][0]:.2f}, {summary[row][p]['ci'][1]:.2f}]"
             for p in PERSPECTIVES]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def category_markdown(summary: dict) -> str:
  """One line per row (overall, then each category) of one model's summary."""
  lines = ["| row | n | " + " | ".join(PERSPECTIVES) + " |", "| --- | --- |" + " --- |" * len(PERSPECTIVES)]
  for row, cells in summary.items():
    values = [f"{cells[p]['mean']:.2f} [{cells[p]['ci'][0]:.2f}, {cells[p]['ci'][1]:.2f}]" for p in PERSPECTIVES]
    lines.append(f"| {row} | {cells[PERSPECTIVES[0]]['n']} | " + " | ".join(values) + " |")
  return "\n".join(lines)


def through_vae(editor: edit.Editor, images: np.ndarray, originals: np.ndarray, batch_size: int = 64) -> np.ndarray:
  """uint8 images encoded (posterior mode) and decoded by the editor's VAE (an image-conditioned
  decoder sees the uint8 `originals`, the edits' inputs): what a perfect latent editor would
  output, the ceiling of any model that uses this VAE."""
  recon = vae_train.reconstruct_fn(editor.vae)
  pixels = lambda x, i: x[i:i + batch_size].astype(np.float32) / 127.5 - 1.0
  out = [np.asarray(recon(editor.vae_params, pixels(images, i), pixels(originals, i))[0])
         for i in range(0, len(images), batch_size)]
  return np.clip(np.round((np.concatenate(out) + 1.0) * 127.5), 0, 255).astype(np.uint8)


TEXT_EFFECT_TIMESTEPS = (999, 800, 600, 400, 200)


def text_effect(editor: edit.Editor, test: TestSet, *, timesteps: Sequence[int] = TEXT_EFFECT_TIMESTEPS,
                seed: int = 0, batch_size: int = 35) -> dict:
  """How much the instruction moves the U-Net: a diagnosis of following, without the sampler.

  For each example, the truth's latents are noised to timestep t (the same noise for both
  branches) and the U-Net predicts the clean latents from them and the input's latents, once
  with the instruction and once with the empty text (rewards 5,5,5 and "None; None; None" in
  both). Inside the edited region (the latent pixels where the truth's latents differ from the
  input's by at least half the example's largest difference), the share of the way from the
  input's latents to the truth's that the prediction covers is

    1 - sqrt(sum |x0 - truth|^2 / sum |input - truth|^2),  summed over a category's examples:

  0 for a copy of the input, 1 for the truth. Equal shares with and without the instruction mean
  the U-Net does not read it for that category. Example i's noise at t comes from (seed, t, i)
  alone, so the figures do not depend on `batch_size`. For an epsilon-prediction model the
  clean latents at t = 999 are (x_t - sqrt(1 - a) eps) / sqrt(a) with sqrt(a) = 0.07 (SD's
  schedule): its error is magnified 15x there and the shares can fall far below 0; compare the
  two branches rather than read them alone.

  Returns {"timesteps": [...], "shares": {row: {"instruction": [per t], "empty": [per t]}}}, rows
  "overall" and each category present.
  """
  spec = sampling.spec_from_scheduler_config(editor.scheduler_config, "euler_ancestral", 1)
  schedule, v_prediction = spec.make_schedule(), spec.prediction_type == "v_prediction"
  unet, vae, sf = editor.unet, editor.vae, editor.scaling_factor

  @jax.jit
  def encode(vae_params, originals, truths):
    """(input's latents unscaled: the U-Net's image condition, truth's latents scaled)."""
    cond = pretrained.vae_encode(vae, vae_params, originals)[0].astype(jnp.float32)
    return cond, pretrained.vae_encode(vae, vae_params, truths)[0].astype(jnp.float32) * sf

  @jax.jit
  def clean_latents(unet_params, cond, target, context, null_context, scores, reward_embeds, index, t):
    """The U-Net's clean latents from the truth noised to t, with each context; noise per example."""
    base = jax.random.fold_in(jax.random.PRNGKey(seed), t)
    noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(base, i), target.shape[1:]))(index)
    tt = jnp.full((target.shape[0],), t)
    noisy = diffusion.add_noise(schedule, target, noise, tt)
    alpha_bar = schedule.alphas_cumprod[t]
    reward = (scores, reward_embeds) if unet.reward else (None, None)
    out = []
    for ctx in (context, null_context):
      pred = unet.apply({"params": unet_params}, jnp.concatenate([noisy, cond], -1), tt, ctx, *reward)
      pred = pred.astype(jnp.float32)
      if v_prediction:
        out.append(jnp.sqrt(alpha_bar) * noisy - jnp.sqrt(1.0 - alpha_bar) * pred)
      else:
        out.append((noisy - jnp.sqrt(1.0 - alpha_bar) * pred) / jnp.sqrt(alpha_bar))
    return out

  cats = np.array(test.categories)
  present = set(test.categories)
  rows = ["overall"] + [c for c in records.CATEGORIES if c in present]
  # per row, per t: summed squared error of each branch and summed squared gap
  sums = {r: np.zeros((len(timesteps), 3)) for r in rows}
  for start in range(0, len(test), batch_size):
    stop = min(start + batch_size, len(test))
    originals = test.originals[start:stop].astype(np.float32) / 127.5 - 1.0
    truths = test.truths[start:stop].astype(np.float32) / 127.5 - 1.0
    c = edit.make_conditioning(editor, originals, test.instructions[start:stop], seeds=list(range(start, stop)),
                               scores=[BEST_SCORES] * (stop - start), reward_texts=[BEST_REWARD_TEXT] * (stop - start))
    cond, target = encode(editor.vae_params, originals, truths)
    source, truth = np.asarray(cond, np.float64) * sf, np.asarray(target, np.float64)
    gap = np.sqrt(np.sum((truth - source) ** 2, axis=-1))  # [b, h, w]
    region = (gap >= 0.5 * gap.reshape(len(gap), -1).max(axis=1)[:, None, None]) & (gap > 0)
    masks = {r: np.ones(stop - start, bool) if r == "overall" else cats[start:stop] == r for r in rows}
    for k, t in enumerate(timesteps):
      with_text, without = (np.asarray(x, np.float64) for x in clean_latents(
          editor.unet_params, cond, target, c.context, c.null_context, c.scores, c.reward_embeds,
          np.arange(start, stop), int(t)))
      per_example = np.stack([np.sum(((x - truth) ** 2).sum(-1) * region, axis=(1, 2))
                              for x in (with_text, without, source)], axis=-1)  # [b, 3]
      for r in rows:
        sums[r][k] += per_example[masks[r]].sum(axis=0)
  shares = {}
  for r in rows:
    gap = np.maximum(sums[r][:, 2], 1e-12)
    shares[r] = {"instruction": [float(x) for x in 1.0 - np.sqrt(sums[r][:, 0] / gap)],
                 "empty": [float(x) for x in 1.0 - np.sqrt(sums[r][:, 1] / gap)]}
  return {"timesteps": [int(t) for t in timesteps], "shares": shares}


def text_effect_markdown(effect: dict) -> str:
  """A table: one row per category, one column per timestep, "with / without the instruction"."""
  head = "| row | " + " | ".join(f"t = {t}" for t in effect["timesteps"]) + " |"
  lines = [head, "|" + " --- |" * (len(effect["timesteps"]) + 1)]
  for row, s in effect["shares"].items():
    lines.append(f"| {row} | " + " | ".join(f"{a:.2f} / {b:.2f}" for a, b in zip(s["instruction"], s["empty"])) + " |")
  return "\n".join(lines)


def evaluate_run(config: ml_collections.ConfigDict, workdir: Path, builder: tfds.core.DatasetBuilder,
                 step: int) -> dict:
  """The train job's final evaluation: the run's EMA model at rewards (5, 5, 5) and "None; None;
  None" on `config.eval.count` test examples, beside the references (the unchanged input, the
  ground truth, and the ground truth through the VAE), and how much the instruction moves its U-Net
  (`text_effect`). Writes `eval.json` and `eval.md` in
  `workdir` (a finished run rerun prints the evaluation it already has); returns the report."""
  ev = config.eval
  sampler = dict(steps=ev.steps, text_guidance=ev.text_guidance, image_guidance=ev.image_guidance,
                 batch_size=ev.batch_size)
  done = workdir / "eval.json"
  if done.is_file():
    report = json.loads(done.read_text())
    if (report.get("step"), report.get("count"), report.get("sampler"), report.get("seed")) == (
        step, ev.count, sampler, ev.seed):
      print((workdir / "eval.md").read_text())
      return report
  test = load_test_set(builder, ev.split, ev.count)
  editor = edit.load_editor(workdir)
  edits = {"model at 5,5,5": edit_test_set(editor, test, seed=ev.seed, **sampler), **reference_edits(test),
           "truth through the VAE": through_vae(editor, test.truths, test.originals)}
  summaries = {name: summarize(judge_set(test, images), test.categories) for name, images in edits.items()}
  effect = text_effect(editor, test, seed=ev.seed, batch_size=ev.batch_size)
  report = {"step": step, "split": ev.split, "count": len(test), "sampler": sampler, "seed": ev.seed,
            "model": editor.source, "summaries": summaries, "text_effect": effect}
  text = (f"Exact judge on {len(test)} held-out {ev.split} edits (synthetic.judge, 0-5; mean [95% bootstrap "
          f"interval]):\n\n{table_markdown(summaries)}\n\nThe model per category:\n\n"
          f"{category_markdown(summaries['model at 5,5,5'])}\n\n"
          "Does the U-Net read the instruction? Share of the way from the input's latents to the truth's that "
          "its clean-latent prediction covers in the edited region, from the truth noised to t, with the "
          "instruction / with the empty text (synthetic_eval.text_effect; equal: the text is not used):\n\n"
          f"{text_effect_markdown(effect)}\n")
  files.write_atomic(workdir / "eval.md", text)
  files.write_json(done, report, indent=2)
  print(text)
  return report
