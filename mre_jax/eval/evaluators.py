"""Real-Edit (SPEC 5): listing the (photo, instruction) pairs, making the missing edits, the
judge's requests and the table. The `evaluate` job (mre_jax/jobs/evaluate.py) runs them.

What the judge sees (SPEC section 5, as the release): the photo fitted to the editor's working
size and the edit, both resized to config.judge_height (512) high, keeping the photo's aspect.
Two protocols turn answers into the table (config.judge.protocol):
  proper   each answer's dictionary is parsed (mre_jax.eval.judge.parse_answer); an unreadable
           answer leaves out its own perspective only
  release  the release's rules: "yes" when the substring occurs, the score the first
           'score': <float>; an item whose three answers do not all read so is dropped from
           every perspective

The editing model is injected: `edit_fn(images: list[PIL.Image], instructions: list[str])
-> list[PIL.Image]` (same order and length); `make_edits` asks a factory for it only when edits
are missing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import zlib
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from absl import logging
from PIL import Image

from mre_jax.data import records
from mre_jax.errors import ConfigError
from mre_jax.eval import judge
from mre_jax.infer import sizes
from mre_jax.io import files

FAILED = ("failed", "budget_exhausted", "no_edit")
PROTOCOLS = ("proper", "release")  # how answers become the table (module docstring)
_PROTOCOL_NOTES = {
    "proper": "each answer's dictionary parsed; an unreadable answer leaves out its own perspective",
    "release": "the release's rules: substring 'yes', first 'score': <float>; an item with an "
               "answer unreadable so is dropped from every perspective"}

EditFn = Callable[[list[Image.Image], list[str]], list]  # edit_fn(images, instructions) -> edited images


# ----------------------------------------------------------------------------- listing

@dataclasses.dataclass
class Item:
  """One (photo, instruction) of Real-Edit; `error` says why it cannot be edited."""
  image_name: str
  index: int
  category: str = ""
  instruction: str = ""
  photo: str = ""
  edit_path: Path | None = None
  error: str | None = None

  @property
  def key(self) -> str:
    return f"{self.image_name}#{self.index}"


def parse_instruction(text: object) -> tuple[str, str]:
  """"<Category>. ...: <instruction>" -> (category, instruction); ValueError if malformed."""
  if not isinstance(text, str) or "." not in text or ": " not in text:
    raise ValueError(f"{text!r} is not '<Category>. ...: <instruction>'")
  category = text.split(".", 1)[0].strip()
  instruction = text.rsplit(": ", 1)[1].strip()
  if category not in records.CATEGORIES:
    raise ValueError(f"category {category!r} of {text!r} is not one of {records.CATEGORIES}")
  if not instruction:
    raise ValueError(f"{text!r} has an empty instruction")
  return category, instruction


def listing_path(root: str | os.PathLike, json_name: str = "") -> str:
  """The Real-Edit JSON: `json_name` in `root`, else the only *.json there (hidden files aside)."""
  if json_name:
    return str(records.require_path(Path(root, json_name), "real_edit", "the Real-Edit JSON"))
  found = sorted(str(p) for p in Path(root).glob("*.json") if not p.name.startswith("."))
  if len(found) != 1:
    raise FileNotFoundError(f"real_edit: expected exactly one *.json in {root} (the Real-Edit "
                            f"{{<image file>: [string, ...]}}), found {found}; set config.json_name")
  return found[0]


def _safe_name(image_name: str, index: int) -> str:
  # The key split as a string (a directory part stays in the stem): existing workdirs' edits keep their names.
  stem = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.splitext(image_name)[0])
  return f"{stem}-{zlib.crc32(image_name.encode()):08x}__{index}.png"


def _photo_path(root: str | os.PathLike, image_name: str) -> str:
  direct = records.safe_join(root, image_name, "Real-Edit JSON key")
  nested = records.safe_join(Path(root, "images"), image_name, "Real-Edit JSON key")
  return direct if Path(direct).is_file() or not Path(nested).is_file() else nested


def load_real_edit(root: str | os.PathLike, edits_dir: str | os.PathLike, json_name: str = "") -> list[Item]:
  """Every (photo, instruction) of the listing, sorted by photo then index; malformed
  entries are kept as items with an `error` (they are counted as failed, never dropped)."""
  path = listing_path(root, json_name)
  listing = records.load_source_json(path, "real_edit", "{<image file>: [instruction string, ...]}")
  if not isinstance(listing, dict):
    raise ValueError(f"real_edit: {path} must hold an object {{<image file>: [string, ...]}}, "
                     f"got {type(listing).__name__}")
  items = []
  for image_name in sorted(listing):
    texts = listing[image_name]
    if not isinstance(texts, list):
      items.append(Item(image_name, 0, error=f"bad_entry: expected a list, got {texts!r}"))
      continue
    for i, text in enumerate(texts):
      item = Item(image_name, i, edit_path=Path(edits_dir, _safe_name(image_name, i)))
      try:
        item.category, item.instruction = parse_instruction(text)
        item.photo = _photo_path(root, image_name)
      except (ValueError, records.BadRecord) as e:
        item.error = f"bad_entry: {e}"
      items.append(item)
  return items


# ------------------------------------------------------------------------------- edits

def _to_pil(image, where: str) -> Image.Image:
  if isinstance(image, Image.Image):
    return image.convert("RGB")
  arr = np.asarray(image)
  if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
    raise ValueError(f"edit_fn returned {where} as {type(image).__name__} {getattr(arr, 'shape', '')} "
                     f"{arr.dtype}; expected a PIL image or uint8 [H, W, 3]")
  return Image.fromarray(arr)


def _batches(items: list[Item], batch_size: int) -> Iterator[list[Item]]:
  """Runs of at most `batch_size` items of one photo (one working size per edit_fn call)."""
  batch = []
  for it in items:
    if batch and (len(batch) >= max(1, batch_size) or batch[0].image_name != it.image_name):
      yield batch
      batch = []
    batch.append(it)
  if batch:
    yield batch


def make_edits(items: list[Item], edit_fn_factory: Callable[[], EditFn], batch_size: int) -> int:
  """Edits the items whose edit is not on disk yet; returns how many were edited.

  `edit_fn_factory()` is called once, only if something is missing. A batch never mixes
  photos. A photo that cannot be read marks its items with an error.
  """
  pending = [it for it in items if it.error is None and not it.edit_path.is_file()]
  if not pending:
    return 0
  edit_fn = edit_fn_factory()
  done = 0
  for batch in _batches(pending, batch_size):
    try:
      photo = Image.fromarray(records.load_rgb(batch[0].photo))
    except records.BadRecord as e:
      for it in batch:
        it.error = f"bad_photo: {e}"
      continue
    outputs = list(edit_fn([photo] * len(batch), [it.instruction for it in batch]))
    if len(outputs) != len(batch):
      raise ValueError(f"edit_fn returned {len(outputs)} images for a batch of {len(batch)}")
    for it, out in zip(batch, outputs):
      it.edit_path.parent.mkdir(parents=True, exist_ok=True)
      files.write_image(it.edit_path, _to_pil(out, it.key))
    done += len(batch)
    logging.info("edited %d/%d", done, len(pending))
  return done


# --------------------------------------------------------------------- the judge's requests

def judge_images(photo: np.ndarray, edited: np.ndarray, *, resolution: int, size_rule: str,
                 height: int) -> tuple[np.ndarray, np.ndarray]:
  """The pair the judge sees, as the release's eval.py makes it (SPEC section 5).

  photo, edited: uint8 [H, W, 3]. The photo is fitted to the editor's working size
  (`sizes.fit_image`: `resolution`, `size_rule`), then it and the edit are resized (bicubic, PIL's
  default there) to `height` high and round-down(height * w / h) wide, (w, h) the photo's size.
  height 0: both are returned as they are.
  """
  if not height:
    return photo, edited
  size = (max(1, int(height * photo.shape[1] / photo.shape[0])), height)
  fitted = sizes.fit_image(Image.fromarray(photo), resolution, size_rule)
  return tuple(np.asarray(im.resize(size, Image.Resampling.BICUBIC))
               for im in (fitted, Image.fromarray(edited)))


def _judge_pair(item: Item, prepare: Callable) -> Callable:
  return lambda: prepare(records.load_rgb(item.photo), records.load_rgb(item.edit_path))


def judge_requests(items: list[Item], prepare: Callable) -> list[judge.Request]:
  """Three judge requests per item; `prepare(photo, edit) -> (original, edited)` as judged.

  An item without an error whose edit is not on disk is marked "no_edit" (its requests fail).
  """
  out = []
  for it in items:
    if it.error is None and not it.edit_path.is_file():
      it.error = "no_edit: the edit is missing"
    meta = {"category": it.category, "image": it.image_name, "index": it.index,
            "edit": it.edit_path.name if it.error is None else None}
    load = _judge_pair(it, prepare) if it.error is None else _raiser(it.error)
    out += [judge.Request(it.key, p, it.instruction, load, meta=meta) for p in judge.PERSPECTIVES]
  return out


def _raiser(message: str) -> Callable:
  def load():
    raise ValueError(message)
  return load


# ------------------------------------------------------------------------------- table

def _bootstrap(values: np.ndarray, idx: np.ndarray) -> list[float]:
  """95% percentile interval of the mean of `values` over resamples idx [B, n]."""
  means = values[idx].mean(axis=1)
  lo, hi = np.percentile(means, [2.5, 97.5])
  return [float(lo), float(hi)]


def _cell(rows: list[dict], samples: int, rng: np.random.Generator) -> dict:
  """Stats of one (row, perspective) from its result records."""
  ok = [r for r in rows if r["status"] == "ok"]
  cell = {"judged": len(ok), "unparsed": sum(r["status"] == "unparsed" for r in rows),
          "failed": sum(r["status"] in FAILED for r in rows), "not_judged": len(rows) - len(ok),
          "yes_share": None, "yes_ci": None, "mean_score": None, "score_ci": None}
  if ok:
    yes = np.array([r["verdict"] == "yes" for r in ok], np.float64)
    scores = np.array([r["score"] for r in ok], np.float64)
    idx = rng.integers(0, len(ok), (samples, len(ok)))
    cell.update(yes_share=float(yes.mean()), yes_ci=_bootstrap(yes, idx),
                mean_score=float(scores.mean()), score_ci=_bootstrap(scores, idx))
  return cell


def release_view(results: list[dict]) -> list[dict]:
  """Result records as the release protocol reads them (same order).

  Every answer (the last try's raw text) is read by `judge.parse_answer_release`. An item whose
  answers in all three perspectives read so keeps them ("ok" with that verdict and score);
  otherwise each of its records is "unparsed" (not readable so), keeps its failed status (no
  answer), or becomes "dropped" (readable, but a sibling is not).
  """
  read, by_item = [], {}
  for r in results:
    fields = judge.parse_answer_release(r.get("raw"))[0] if r["status"] in ("ok", "unparsed") else None
    read.append(fields)
    by_item.setdefault(r["item"], {})[r["perspective"]] = fields
  kept = {item for item, got in by_item.items()
          if all(got.get(p) is not None for p in judge.PERSPECTIVES)}
  out = []
  for r, fields in zip(results, read):
    if r["item"] in kept:
      out.append({**r, **fields, "status": "ok"})
    elif r["status"] in FAILED:
      out.append(r)
    else:
      out.append({**r, "status": "unparsed" if fields is None else "dropped", "verdict": None,
                  "score": None})
  return out


def make_table(results: list[dict], *, protocol: str = "proper", samples: int = 1000,
               seed: int = 0) -> dict:
  """The paper's table from result records (one per item and perspective).

  protocol: "proper" reads each record's parsed verdict and score; "release" reads them as the
  release does (`release_view`). rows: "overall" and each category present, each
  {perspective: cell}; a cell holds `yes_share` and `mean_score` over the judged answers with
  95% bootstrap intervals, and the counts judged / unparsed / failed / not_judged. `counts` is
  per item: judged in all three perspectives, or not; `judgments` (statuses) and `reask`
  (`judge.reask_counts`) are those of the records as judged.
  """
  if protocol not in PROTOCOLS:
    raise ConfigError(f"config.judge.protocol={protocol!r}: expected one of {', '.join(PROTOCOLS)}")
  view = release_view(results) if protocol == "release" else results
  cats = [c for c in records.CATEGORIES if any(r.get("category") == c for r in view)]
  table = {"rows": {}, "protocol": protocol, "prompt_version": judge.PROMPT_VERSION,
           "models": sorted({r["model"] for r in view if r.get("model")}),
           "bootstrap_samples": samples}
  for ri, row in enumerate(["overall"] + cats):
    in_row = [r for r in view if row == "overall" or r.get("category") == row]
    table["rows"][row] = {
        p: _cell([r for r in in_row if r["perspective"] == p], samples,
                 np.random.default_rng([seed, ri, pi]))
        for pi, p in enumerate(judge.PERSPECTIVES)}
  by_item = {}
  for r in view:
    by_item.setdefault(r["item"], []).append(r["status"])
  table["counts"] = {
      "items": len(by_item),
      "judged": sum(all(s == "ok" for s in v) and len(v) == 3 for v in by_item.values()),
      "failed": sum(any(s != "ok" for s in v) for v in by_item.values()),
      "judgments": judge.status_counts(results),
      "reask": judge.reask_counts(results)}
  return table


def _pct(v: float | None) -> str:
  return "-" if v is None else f"{100 * v:.1f}"


def _num(v: float | None) -> str:
  return "-" if v is None else f"{v:.2f}"


def table_markdown(table: dict) -> str:
  """The table as markdown: per row, per perspective "yes %" and "score" [95% CI]."""
  head = ["row"] + [f"{p} {m}" for p in judge.PERSPECTIVES for m in ("yes %", "score")] + ["judged", "not judged"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row, cells in table["rows"].items():
    out = [row]
    for p in judge.PERSPECTIVES:
      c = cells[p]
      ci = c["yes_ci"] or [None, None]
      sci = c["score_ci"] or [None, None]
      out += [f"{_pct(c['yes_share'])} [{_pct(ci[0])}, {_pct(ci[1])}]",
              f"{_num(c['mean_score'])} [{_num(sci[0])}, {_num(sci[1])}]"]
    out += [str(min(c["judged"] for c in cells.values())),
            str(max(c["not_judged"] for c in cells.values()))]
    lines.append("| " + " | ".join(out) + " |")
  k, protocol = table["counts"], table.get("protocol", "proper")
  left_out = "dropped" if protocol == "release" else "with a failed or unparsed perspective"
  lines += ["", f"protocol: {protocol} ({_PROTOCOL_NOTES[protocol]})",
            f"items: {k['items']}, judged in all perspectives: {k['judged']}, {left_out}: "
            f"{k['failed']}; judgments by status: {json.dumps(k['judgments'])}",
            judge.reask_summary(k["reask"]),
            f"models: {', '.join(table['models']) or '-'}; prompt version: {table['prompt_version']}; "
            f"95% intervals from {table['bootstrap_samples']} bootstrap resamples"]
  return "\n".join(lines) + "\n"


def _diff(a: float | None, b: float | None) -> float | None:
  return None if a is None or b is None else a - b


def compare_markdown(table: dict, other: dict, name: str, other_name: str) -> str:
  """Two tables side by side: this run, the other, and this minus the other."""
  label = lambda t: f"{t.get('protocol', 'proper')} protocol"
  lines = [f"A = {name} ({label(table)}), B = {other_name} ({label(other)})", "",
           "| row | perspective | yes % A | yes % B | A-B | score A | score B | A-B |",
           "|---|---|---|---|---|---|---|---|"]
  for row, cells in table["rows"].items():
    for p in judge.PERSPECTIVES:
      a, b = cells[p], other["rows"].get(row, {}).get(p, {})
      ya, yb, sa, sb = a["yes_share"], b.get("yes_share"), a["mean_score"], b.get("mean_score")
      lines.append(f"| {row} | {p} | {_pct(ya)} | {_pct(yb)} | {_pct(_diff(ya, yb))} | "
                   f"{_num(sa)} | {_num(sb)} | {_num(_diff(sa, sb))} |")
  notes = [f"{k} differs: A {table.get(k, d)} vs B {other.get(k, d)}"
           for k, d in (("protocol", "proper"), ("prompt_version", None), ("models", None))
           if table.get(k, d) != other.get(k, d)]
  return "\n".join(lines + [""] + notes) + "\n"
