"""Judging image edits from the paper's three perspectives (SPEC section 5).

Each (original, edited, instruction) is judged three times, one perspective per request:
  following   instruction following   original + edited + instruction
  preserving  detail preserving       original + edited + instruction
  quality     generation quality      edited image alone
and each answer is a yes/no verdict and a score in [0, 5], asked for as a small dictionary.

Backends:
  OpenAIBackend     any chat-completions endpoint through the official `openai` client
                    (GPT-4o by default); images go as base64 JPEG data URLs. Retries
                    (429 with Retry-After, 5xx, timeouts, connection errors) are ours, not the
                    client's (it runs with max_retries=0).
  SyntheticBackend  no API: scores an edit of the synthetic world exactly against its stored
                    ground truth and answers in the same dictionary form, so the whole path
                    (parsing, cache, tables) runs offline (mre_jax/eval/synthetic_judge.py).
Backends are found by name in BACKENDS ("module:attribute", imported on demand), so judging with
OpenAI never imports the synthetic world.

An answer that cannot be read is asked again (the same request plus a reminder of the
format), up to `max_tries` tries; every try and its raw text stay in the record.

Every paid answer goes to an append-only JSONL cache keyed by (image hashes, instruction,
perspective, model, prompt version), flushed and fsynced line by line, so an interrupted or
repeated run never pays twice for a readable answer. Unreadable answers are kept there as
tries, not as results: a rerun asks again for what is still unparsed. The API key is read
from the config or the environment and is never logged or written anywhere.
"""

from __future__ import annotations

import ast
import base64
import dataclasses
import email.utils
import hashlib
import io
import json
import math
import os
import pkgutil
import random
import re
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Callable, Protocol

import ml_collections
import numpy as np
import openai
from absl import logging
from PIL import Image

from mre_jax.data import records
from mre_jax.errors import ConfigError

PERSPECTIVES = ("following", "preserving", "quality")
# config.judge.backend -> "module:attribute" of a callable config.judge -> backend (imported when asked for)
BACKENDS = {
    "openai": "mre_jax.eval.judge:OpenAIBackend",
    "synthetic": "mre_jax.eval.synthetic_judge:SyntheticBackend.from_config",
}
# ok: parsed answer; unparsed: the model answered, but no try was in the asked form (raws kept);
# failed: no answer (errors, retries spent); budget_exhausted: not sent, the run's request
# budget was spent; no_edit: nothing to judge (unreadable photo or edit, bad listing entry).
STATUSES = ("ok", "unparsed", "failed", "budget_exhausted", "no_edit")

# ----------------------------------------------------------------------------- prompts
# Bump PROMPT_VERSION whenever any text below changes: it is part of every cache key and
# recorded with every result, so answers to different prompts are never mixed.
PROMPT_VERSION = "mre-judge-v1"

SYSTEM_PROMPT = (
    "You are a careful and strict judge of instruction-based image editing. You look at the "
    "images you are given and answer with one small Python dictionary and nothing else.")

TITLES = {"following": "INSTRUCTION FOLLOWING", "preserving": "DETAIL PRESERVING",
          "quality": "GENERATION QUALITY"}

_TASKS = {
    "following": (
        "The first image is the original photo. The second image is the result of editing it "
        "with the instruction: \"{instruction}\".\n"
        "Judge INSTRUCTION FOLLOWING only: does the edited image carry out the instruction "
        "fully and correctly (the right change, on the right object, to the right extent)? "
        "Do not judge image quality or changes elsewhere in the image."),
    "preserving": (
        "The first image is the original photo. The second image is the result of editing it "
        "with the instruction: \"{instruction}\".\n"
        "Judge DETAIL PRESERVING only: apart from the change the instruction asks for, is "
        "everything else kept as in the original (identity, objects, shapes, layout, colours, "
        "background, fine details)? Do not judge whether the instruction was carried out, "
        "nor image quality."),
    "quality": (
        "The image was produced by an image-editing model.\n"
        "Judge GENERATION QUALITY only: is it a natural, clean, high-quality image, free of "
        "artifacts such as blur, noise, blocky or smeared areas, distorted or malformed "
        "objects? Do not judge what it shows."),
}
_ANSWER = ("Answer with a Python dictionary and nothing else: {'verdict': 'yes' or 'no', "
           "'score': a number from 0 (worst) to 5 (perfect)")
_FAILURE = (", 'failure': a short phrase naming what is wrong from this perspective (for "
            "example 'the dog is still brown'), or 'None' if nothing is wrong")


# Added to a re-ask (second try on) as its own text part; the prompt itself, and so the cache
# key and PROMPT_VERSION, stay those of the first try.
# It names the keys but gives no example values, which could anchor the judge's scores.
REMINDER = "Reminder: reply with only the Python dictionary asked for above, {'verdict': ..., 'score': ..."
_REMINDER_FAILURE = ", 'failure': ..."


def build_prompt(perspective: str, instruction: str, describe: bool = False) -> str:
  """The user text for one perspective; `describe` also asks for the failure points."""
  task = _TASKS[perspective].replace("{instruction}", instruction)
  return f"{task}\n{_ANSWER}{_FAILURE if describe else ''}}}"


def build_reminder(describe: bool = False) -> str:
  """The format reminder sent with every re-ask of an unreadable answer."""
  return f"{REMINDER}{_REMINDER_FAILURE if describe else ''}}}, and no other text."


def uses_original(perspective: str) -> bool:
  """Whether the judge sees the original photo (generation quality judges the edit alone)."""
  return perspective != "quality"


# ----------------------------------------------------------------------------- parsing

_VERDICT_KEYS = ("verdict", "answer", "yes/no", "yes or no", "result", "decision")
_SCORE_KEYS = ("score", "rating")
_FAILURE_KEYS = ("failure", "failures", "failure points", "failure point", "negative prompt",
                 "problem", "problems", "issue", "issues")
_NO_FAILURE = ("", "none", "n/a", "na", "nothing", "no failure", "null")


def _dict_spans(text: str):
  """Substrings of `text` from a "{" to its matching "}" (quotes respected), in order."""
  for start in [i for i, c in enumerate(text) if c == "{"]:
    depth, quote, escaped = 0, None, False
    for end in range(start, len(text)):
      c = text[end]
      if quote:
        if escaped:
          escaped = False
        elif c == "\\":
          escaped = True
        elif c == quote:
          quote = None
      elif c in "'\"":
        quote = c
      elif c == "{":
        depth += 1
      elif c == "}":
        depth -= 1
        if depth == 0:
          yield text[start:end + 1]
          break


# CPython 3.11's parser is not safe to call from several threads at once ("AST constructor
# recursion depth mismatch"); answers are parsed in the judge's worker threads.
_AST_LOCK = threading.Lock()


def _literal_eval(text: str):
  with _AST_LOCK:
    return ast.literal_eval(text)


def _load_dict(span: str):
  """A dict from JSON or a Python literal (also with JSON's true/false/null); else None."""
  for attempt in (json.loads, _literal_eval,
                  lambda s: _literal_eval(re.sub(r"\b(true|false|null)\b",
                                                 lambda m: {"true": "True", "false": "False",
                                                            "null": "None"}[m.group(1)], s))):
    try:
      value = attempt(span)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
      continue
    if isinstance(value, dict):
      return value
  return None


def _field(d: dict, keys):
  norm = {str(k).strip().lower().replace("_", " ").replace("-", " "): v for k, v in d.items()}
  for key in keys:
    if key in norm:
      return True, norm[key]
  return False, None


def _verdict(value):
  if isinstance(value, bool):
    return "yes" if value else "no"
  match = re.match(r"^\W*(yes|no)\b", str(value).strip().lower())
  return match.group(1) if match else None


def _score(value):
  if isinstance(value, bool):
    return None
  if isinstance(value, (int, float)):
    score = float(value)
  else:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*5(?:\.0+)?)?\s*\.?", str(value))
    if not match:
      return None
    score = float(match.group(1))
  return score if math.isfinite(score) and 0.0 <= score <= 5.0 else None


def _failure(value):
  if isinstance(value, (list, tuple)):
    value = "; ".join(str(v).strip() for v in value if str(v).strip())
  if value is None:
    return "None"
  text = str(value).strip()
  return "None" if text.lower().rstrip(".") in _NO_FAILURE else text


def _answer_from_dict(d: dict, describe: bool):
  """(fields, None) or (None, reason) for one parsed dictionary."""
  has_v, verdict = _field(d, _VERDICT_KEYS)
  has_s, score = _field(d, _SCORE_KEYS)
  if not has_v or not has_s:
    return None, f"dictionary lacks {'verdict' if not has_v else 'score'}: keys {sorted(map(str, d))}"
  fields = {"verdict": _verdict(verdict), "score": _score(score)}
  if fields["verdict"] is None:
    return None, f"verdict {verdict!r} is not yes/no"
  if fields["score"] is None:
    return None, f"score {score!r} is not a number in [0, 5]"
  if describe:
    has_f, failure = _field(d, _FAILURE_KEYS)
    if not has_f and fields["verdict"] == "yes" and fields["score"] == 5.0:
      has_f, failure = True, None  # A perfect answer may omit "nothing is wrong".
    if not has_f:
      return None, f"dictionary lacks a failure description: keys {sorted(map(str, d))}"
    fields["failure"] = _failure(failure)
  return fields, None


def parse_answer(text: str | None, describe: bool = False) -> tuple[dict | None, str | None]:
  """Reads a judge's answer: (fields, None) or (None, reason).

  Accepts a JSON object or a Python dict literal (single quotes, True/False), anywhere in
  the text (markdown fences and stray words around it are ignored). `fields` holds
  `verdict` ("yes"/"no"), `score` (float in [0, 5]) and, if `describe`, `failure` (str,
  "None" when nothing is wrong). The first dictionary that reads as a full answer wins.
  """
  if not text or not text.strip():
    return None, "empty answer"
  reason = "no dictionary in the answer"
  for span in _dict_spans(text):
    d = _load_dict(span)
    if d is None:
      reason = f"cannot read {span[:80]!r} as a dictionary"
      continue
    fields, why = _answer_from_dict(d, describe)
    if fields is not None:
      return fields, None
    reason = why
  return None, reason


# The release's reading (its eval.py): "yes" anywhere in the text (case-sensitive), the score
# the first "'score': <digits>.<digits>" (an integer such as 4 does not match), no range check.
_RELEASE_SCORE = re.compile(r"'score': (\d+\.\d+)")


def parse_answer_release(text: str | None) -> tuple[dict | None, str | None]:
  """Reads an answer as the release does: (fields, None) or (None, reason).

  `fields` holds `verdict` ("yes" when the substring "yes" occurs anywhere in the text, else
  "no") and `score` (the first `'score': <float>`). Only a missing score makes it unreadable.
  """
  if not isinstance(text, str):
    return None, "no answer"
  match = _RELEASE_SCORE.search(text)
  if match is None:
    return None, "no 'score': <float> in the answer"
  return {"verdict": "yes" if "yes" in text else "no", "score": float(match.group(1))}, None


# ------------------------------------------------------------------------------ images

def image_hash(img: np.ndarray | None) -> str | None:
  """sha256 of the pixels (uint8 [H, W, 3]) and their shape: same pixels, same hash."""
  if img is None:
    return None
  arr = np.ascontiguousarray(np.asarray(img, np.uint8))
  return hashlib.sha256(repr(arr.shape).encode() + arr.tobytes()).hexdigest()


def to_data_url(img: np.ndarray, max_side: int = 0, quality: int = 90) -> str:
  """uint8 [H, W, 3] -> "data:image/jpeg;base64,...", longest side cut to `max_side` (0: keep)."""
  pil = Image.fromarray(np.asarray(img, np.uint8))
  if max_side and max(pil.size) > max_side:
    scale = max_side / max(pil.size)
    pil = pil.resize((max(1, round(pil.width * scale)), max(1, round(pil.height * scale))),
                     Image.LANCZOS)
  buf = io.BytesIO()
  pil.save(buf, format="JPEG", quality=quality)
  return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------- requests

@dataclasses.dataclass
class Query:
  """What a backend judges: uint8 [H, W, 3] images (edited may differ in size).

  `reminder`: a re-ask, sent with the format reminder (not part of the cache key)."""
  perspective: str
  instruction: str
  original: np.ndarray
  edited: np.ndarray
  describe: bool = False
  reminder: bool = False


@dataclasses.dataclass
class Request:
  """One judgment to make. `load_fn() -> (original, edited)` runs in a worker thread, so
  images are read only when needed; `meta` is copied into the result (item fields)."""
  item: str
  perspective: str
  instruction: str
  load_fn: Callable[[], tuple]
  describe: bool = False
  meta: dict = dataclasses.field(default_factory=dict)


class JudgeFailure(Exception):
  """No usable answer: `status` ("failed" or "budget_exhausted"), message, attempts made."""

  def __init__(self, status: str, message: str, attempts: int = 0):
    super().__init__(message)
    self.status, self.message, self.attempts = status, message, attempts


class Budget:
  """A thread-safe count of requests a run may still send (None: no limit)."""

  def __init__(self, max_requests: int = 0):
    self.left = max_requests if max_requests and max_requests > 0 else None
    self.used = 0
    self._lock = threading.Lock()

  def take(self) -> bool:
    with self._lock:
      if self.left is not None:
        if self.left <= 0:
          return False
        self.left -= 1
      self.used += 1
      return True


def cache_key(query: Query, model: str, prompt_version: str = PROMPT_VERSION) -> str:
  """sha256 over everything the answer depends on; the original only where it is shown."""
  parts = [image_hash(query.original) if uses_original(query.perspective) else None,
           image_hash(query.edited),
           query.instruction if uses_original(query.perspective) else None,
           query.perspective, model, prompt_version, bool(query.describe)]
  return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


# ------------------------------------------------------------------------------- cache

class JudgmentCache:
  """Append-only JSONL of paid answers: one line {"key": str, "judgment": {...}}.

  Each line is written in one call, flushed and fsynced, so a killed run loses at most the
  answer in flight; a torn last line is skipped on load (and sealed by the next append).
  """

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    self._lock = threading.Lock()
    self._file = None
    self._entries, self.torn = self._load()

  def _load(self):
    entries, torn = {}, 0
    if self.path.is_file():
      with self.path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
          try:
            row = json.loads(line)
            entries[row["key"]] = row["judgment"]
          except (ValueError, KeyError, TypeError):
            torn += 1
    if torn:
      logging.warning("judge cache %s: skipped %d unreadable line(s)", self.path, torn)
    return entries, torn

  def __len__(self):
    return len(self._entries)

  def get(self, key: str):
    with self._lock:
      return self._entries.get(key)

  def put(self, key: str, judgment: dict) -> None:
    line = json.dumps({"key": key, "judgment": judgment}, sort_keys=True) + "\n"
    with self._lock:
      if self._file is None:
        self._file = self._open()
      self._file.write(line)
      self._file.flush()
      os.fsync(self._file.fileno())
      self._entries[key] = judgment

  def _open(self):
    self.path.absolute().parent.mkdir(parents=True, exist_ok=True)
    sealed = True
    if self.path.is_file() and self.path.stat().st_size > 0:
      with self.path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        sealed = f.read(1) == b"\n"
    f = self.path.open("a", encoding="utf-8")
    if not sealed:
      f.write("\n")
    return f

  def close(self) -> None:
    with self._lock:
      if self._file is not None:
        self._file.close()
        self._file = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# ---------------------------------------------------------------------------- backends

class Backend(Protocol):
  """What judging asks of a backend (OpenAIBackend, synthetic_judge.SyntheticBackend)."""

  name: str  # recorded with every judgment
  model: str  # part of every cache key

  def answer(self, query: Query, budget: Budget) -> tuple[str, int, int | None]:
    """(answer text, requests sent, tokens used or None); raises JudgeFailure."""


def judge_config() -> ml_collections.ConfigDict:
  """The judge fields shared by configs/evaluate.py and configs/annotate.py."""
  c = ml_collections.ConfigDict()
  c.backend = "openai"  # openai (any chat-completions endpoint) | synthetic (offline, exact)
  c.model = "gpt-4o"  # model name sent to the endpoint; part of every cache key
  c.base_url = ""  # "" -> $OPENAI_BASE_URL or the official endpoint; e.g. http://host:8000/v1
  c.api_key = ""  # prefer the environment (api_key_env); never logged or saved
  c.api_key_env = "OPENAI_API_KEY"  # environment variable holding the key
  c.timeout_s = 60.0  # per request (seconds); a request past it is retried
  c.max_retries = 5  # retries after the first try (429, 5xx, timeouts, connection errors)
  c.backoff_s = 1.0  # first retry delay; doubles per retry, with jitter (x0.5..1)
  c.backoff_max_s = 60.0  # cap of one backoff delay
  c.retry_after_max_s = 120.0  # cap of a server's Retry-After
  c.concurrency = 4  # requests in flight at once (threads)
  c.max_requests = 0  # request budget of one run, retries and re-asks included; 0: no limit
  c.max_side = 1024  # images are downscaled to this longest side before sending (0: never)
  c.jpeg_quality = 90  # JPEG quality of the images sent
  c.detail = "auto"  # image_url detail: auto | low | high
  c.temperature = 0.0
  c.max_tokens = 300  # max_completion_tokens of an answer
  c.cache = ""  # JSONL cache path; "" -> <workdir>/judge_cache.jsonl
  c.max_tries = 3  # asks per answer while it cannot be read (re-asks add a format reminder); 1: no re-ask
  c.rejudge_unparsed = True  # a rerun re-asks cached answers still unreadable (max_tries more); False: keep them
  c.truth = ""  # synthetic backend: the truth index JSON (see synthetic_judge.write_truth_index)
  c.yes_threshold = 4.0  # synthetic backend: verdict "yes" when the score reaches this
  return c


def _scrub(text: str, secret: str | None) -> str:
  return text.replace(secret, "***") if secret else text


def _retry_after(headers) -> float | None:
  """Seconds a response asks us to wait (retry-after-ms, Retry-After seconds or date)."""
  if headers is None:
    return None
  ms = headers.get("retry-after-ms")
  if ms:
    try:
      return float(ms) / 1000.0
    except ValueError:
      pass
  value = headers.get("retry-after")
  if not value:
    return None
  try:
    return max(0.0, float(value))
  except ValueError:
    pass
  try:
    return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
  except (TypeError, ValueError, IndexError, OverflowError):
    return None


class OpenAIBackend:
  """Chat completions through the official client, with our own bounded retry loop."""

  name = "openai"

  def __init__(self, cfg, *, sleep_fn=time.sleep, seed: int | None = None):
    self.model = cfg.model
    self.cfg = cfg
    self._key = cfg.api_key or os.environ.get(cfg.api_key_env or "OPENAI_API_KEY", "")
    if not self._key:
      raise ConfigError(f"judge: no API key: set ${cfg.api_key_env} (or config.judge.api_key) "
                        f"for config.judge.backend='openai'")
    self._client = openai.OpenAI(api_key=self._key, base_url=cfg.base_url or None,
                                 timeout=cfg.timeout_s, max_retries=0)
    self._sleep = sleep_fn
    self._rng = random.Random(seed)

  def messages(self, query: Query) -> list:
    images = [query.original, query.edited] if uses_original(query.perspective) else [query.edited]
    content = [{"type": "image_url", "image_url": {
        "url": to_data_url(img, self.cfg.max_side, self.cfg.jpeg_quality), "detail": self.cfg.detail}}
               for img in images]
    content.append({"type": "text", "text": build_prompt(query.perspective, query.instruction,
                                                         query.describe)})
    if query.reminder:
      content.append({"type": "text", "text": build_reminder(query.describe)})
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]

  def answer(self, query: Query, budget: Budget) -> tuple[str, int, int | None]:
    """(text, attempts, usage) or JudgeFailure once retries or the budget are spent."""
    messages = self.messages(query)
    attempts = 0
    while True:
      if not budget.take():
        raise JudgeFailure("budget_exhausted", "the run's request budget is spent", attempts)
      attempts += 1
      try:
        response = self._client.chat.completions.create(
            model=self.model, messages=messages, temperature=self.cfg.temperature,
            max_completion_tokens=self.cfg.max_tokens)
        return _content(response), attempts, _usage(response)
      except openai.OpenAIError as e:
        delay, reason = self._retry_delay(e, attempts)
        if delay is None or attempts > self.cfg.max_retries:
          raise JudgeFailure("failed", _scrub(reason, self._key), attempts) from None
        logging.info("judge: %s; retry %d in %.2f s", _scrub(reason, self._key), attempts, delay)
        self._sleep(delay)

  def _retry_delay(self, error, attempts: int):
    """(seconds to wait or None if not retryable, reason) for an openai error."""
    backoff = min(self.cfg.backoff_max_s, self.cfg.backoff_s * 2 ** (attempts - 1))
    backoff *= self._rng.uniform(0.5, 1.0)
    if isinstance(error, openai.APITimeoutError):
      return backoff, f"timeout after {self.cfg.timeout_s} s"
    if isinstance(error, openai.APIConnectionError):
      return backoff, f"connection error: {error}"
    if isinstance(error, openai.APIStatusError):
      status = error.status_code
      reason = f"HTTP {status}: {str(error)[:300]}"
      if status in (408, 409, 429) or status >= 500:
        wait = _retry_after(error.response.headers)
        return (backoff if wait is None else min(wait, self.cfg.retry_after_max_s)), reason
      return None, reason
    return None, f"{type(error).__name__}: {error}"


def _content(response) -> str:
  choices = getattr(response, "choices", None) or []
  message = getattr(choices[0], "message", None) if choices else None
  return (getattr(message, "content", None) or "") if message is not None else ""


def _usage(response):
  usage = getattr(response, "usage", None)
  return getattr(usage, "total_tokens", None) if usage is not None else None


def check_config(cfg: ml_collections.ConfigDict) -> None:
  """The judge fields a backend does not read itself (ConfigError naming field and value)."""
  tries = cfg.max_tries
  if isinstance(tries, bool) or not isinstance(tries, int) or tries < 1:
    raise ConfigError(f"config.judge.max_tries={tries!r}: expected an integer >= 1 (1: never re-ask)")


def make_backend(cfg: ml_collections.ConfigDict) -> Backend:
  """The backend config.judge names (BACKENDS), made from config.judge."""
  check_config(cfg)
  if cfg.backend not in BACKENDS:
    raise ConfigError(f"config.judge.backend={cfg.backend!r}: expected one of {', '.join(BACKENDS)}")
  return pkgutil.resolve_name(BACKENDS[cfg.backend])(cfg)


# ------------------------------------------------------------------------------ judging

def _base_record(backend, request: Request) -> dict:
  return {**request.meta, "item": request.item, "perspective": request.perspective,
          "instruction": request.instruction, "prompt_version": PROMPT_VERSION,
          "model": backend.model, "backend": backend.name, "status": None, "verdict": None,
          "score": None, "failure": None, "raw": None, "error": None, "attempts": 0,
          "latency_s": None, "usage_tokens": None, "cached": False, "tries": [], "reasks": 0}


def _cached_tries(hit) -> list:
  """The tries of a cached judgment (one, for entries written before re-asks existed)."""
  if hit is None:
    return []
  if isinstance(hit.get("tries"), list):
    return list(hit["tries"])
  return [{"raw": hit.get("raw"), "error": hit.get("error"), "reminder": False,
           "requests": hit.get("attempts"), "latency_s": hit.get("latency_s"),
           "usage_tokens": hit.get("usage_tokens")}]


def _judgment(backend, fields, tries: list) -> dict:
  """What the cache keeps: the last try's reading, with every try (raw text) before it."""
  usage = [t["usage_tokens"] for t in tries if t.get("usage_tokens") is not None]
  return {"status": "ok" if fields else "unparsed", "verdict": None, "score": None,
          **(fields or {}), "raw": tries[-1]["raw"], "error": tries[-1]["error"],
          "tries": tries, "attempts": sum(t.get("requests") or 0 for t in tries),
          "latency_s": round(sum(t.get("latency_s") or 0.0 for t in tries), 4),
          "usage_tokens": sum(usage) if usage else None,
          "model": backend.model, "prompt_version": PROMPT_VERSION}


def judge_one(backend: Backend, request: Request, cache: JudgmentCache, budget: Budget,
              rejudge_unparsed: bool = True, max_tries: int = 3) -> dict:
  """One result record: a cached answer, a new (cached) answer, or a failure.

  An answer that does not parse is asked again, with the format reminder, until one parses or
  `max_tries` tries were made in this call; each try is cached as it comes. A cached unparsed
  answer is asked again (max_tries more) when `rejudge_unparsed`, else returned as it is.
  The record's `tries` lists every try (across runs), `reasks` counts those sent in this call.
  """
  record = _base_record(backend, request)
  try:
    original, edited = request.load_fn()
  except (records.BadRecord, OSError, ValueError) as e:
    return {**record, "status": "no_edit", "error": str(e)}
  query = Query(request.perspective, request.instruction, original, edited, request.describe)
  key = cache_key(query, backend.model)
  hit = cache.get(key)
  if hit is not None and (hit.get("status") == "ok" or not rejudge_unparsed):
    return {**record, **hit, "cached": True}
  tries, judgment, stop, reasks = _cached_tries(hit), hit, None, 0
  for _ in range(max_tries):
    reminder = bool(tries)
    start = time.monotonic()
    try:
      text, requests, usage = backend.answer(dataclasses.replace(query, reminder=reminder), budget)
    except JudgeFailure as e:
      stop = e
      break
    fields, reason = parse_answer(text, request.describe)
    tries.append({"raw": text, "error": reason, "reminder": reminder, "requests": requests,
                  "latency_s": round(time.monotonic() - start, 4), "usage_tokens": usage})
    reasks += reminder
    judgment = _judgment(backend, fields, tries)
    cache.put(key, judgment)
    if fields:
      break
  if judgment is None:  # Not one answer: the request failed or was not sent.
    return {**record, "status": stop.status, "error": stop.message, "attempts": stop.attempts,
            "latency_s": round(time.monotonic() - start, 4), "cached": False}
  result = {**record, **judgment, "cached": judgment is hit, "reasks": reasks}
  if stop is not None:  # Unparsed, and the next try got no answer.
    result.update(error=f"{judgment['error']}; then no answer to the re-ask: {stop.message}",
                  attempts=judgment["attempts"] + stop.attempts)
  return result


def judge_all(backend: Backend, requests: list[Request], cache: JudgmentCache, *, concurrency: int = 4,
              budget: Budget | None = None, rejudge_unparsed: bool = True, max_tries: int = 3,
              log_every: int = 50) -> list[dict]:
  """Judges `requests` with up to `concurrency` in flight; records in request order."""
  budget = budget or Budget(0)
  results = [None] * len(requests)
  pool = futures.ThreadPoolExecutor(max_workers=max(1, int(concurrency)))
  try:
    jobs = {pool.submit(judge_one, backend, r, cache, budget, rejudge_unparsed, max_tries): i
            for i, r in enumerate(requests)}
    for done, job in enumerate(futures.as_completed(jobs), 1):
      results[jobs[job]] = job.result()
      if done % log_every == 0 or done == len(requests):
        logging.info("judged %d/%d (requests sent: %d)", done, len(requests), budget.used)
  finally:
    # On an error or Ctrl-C, drop what has not started; answers in flight still reach the cache.
    pool.shutdown(wait=True, cancel_futures=True)
  return results


def judge_with_config(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike, requests: list[Request],
                      backend: Backend | None = None) -> list[dict]:
  """Judges `requests` as config.judge says, through its cache (default in `workdir`)."""
  check_config(cfg)
  backend = backend or make_backend(cfg)
  budget = Budget(cfg.max_requests)
  with JudgmentCache(cfg.cache or Path(workdir) / "judge_cache.jsonl") as cache:
    results = judge_all(backend, requests, cache, concurrency=cfg.concurrency, budget=budget,
                        rejudge_unparsed=cfg.rejudge_unparsed, max_tries=cfg.max_tries)
  logging.info("requests sent: %d; judgments by status: %s; %s", budget.used,
               status_counts(results), reask_summary(reask_counts(results)))
  return results


def reask_counts(results: list[dict]) -> dict:
  """This run's re-ask figures: answers re-asked (off-format at first), re-asks sent, those
  re-asked answers that then parsed, and answers still unparsed."""
  return {"reasked": sum(bool(r.get("reasks")) for r in results),
          "reasks": sum(r.get("reasks") or 0 for r in results),
          "recovered": sum(bool(r.get("reasks")) and r["status"] == "ok" for r in results),
          "unparsed": sum(r["status"] == "unparsed" for r in results)}


def reask_summary(counts: dict) -> str:
  return (f"answers re-asked this run (off-format): {counts['reasked']} ({counts['reasks']} "
          f"re-asks), {counts['recovered']} of them then read; still unparsed: {counts['unparsed']}")


def status_counts(results: list[dict]) -> dict:
  counts = {s: 0 for s in STATUSES}
  for r in results:
    counts[r["status"]] = counts.get(r["status"], 0) + 1
  return counts
