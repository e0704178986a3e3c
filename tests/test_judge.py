"""The judge: answer parsing, prompts, cache, and the OpenAI backend against a local server.

`FakeOpenAI` is a real HTTP server on 127.0.0.1 (a thread) speaking the chat-completions
protocol; each test scripts its replies (answers, malformed text, 429 + Retry-After, 500,
a hanging request) and counts what the client really sent.
"""
import base64
import dataclasses
import http.server
import io
import json
import re
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from mre_jax.errors import ConfigError
from mre_jax.eval import judge

KEY = "sk-test-Zq8v-NEVER-WRITE-ME"


# ------------------------------------------------------------------------- the server

@dataclasses.dataclass
class Reply:
  """What the fake server sends: a chat completion with `content`, or an HTTP error."""
  content: str | None = None
  status: int = 200
  headers: dict = dataclasses.field(default_factory=dict)
  delay: float = 0.0  # seconds before answering (bounded; released when the server closes)
  message: str = ""  # error message of an HTTP error ("" -> "scripted <status>")


def user_text(body: dict) -> str:
  return "\n".join(p["text"] for m in body["messages"] if m["role"] == "user"
                   for p in m["content"] if p["type"] == "text")


def perspective_of(body: dict) -> str:
  text = user_text(body)
  return next(p for p, title in judge.TITLES.items() if title in text)


def is_reask(body: dict) -> bool:
  """Whether the request carries the format reminder of a re-ask."""
  return judge.REMINDER in user_text(body)


def without_reminder(body: dict) -> dict:
  """The request with the reminder's text part taken out (what the first try sent)."""
  out = json.loads(json.dumps(body))
  for m in out["messages"]:
    if isinstance(m["content"], list):
      m["content"] = [p for p in m["content"] if not (p["type"] == "text" and judge.REMINDER in p["text"])]
  return out


def ask_key(body: dict) -> tuple:
  """(perspective, instruction, edited image's hash): which answer a request asks for."""
  return perspective_of(body), instruction_of(body), judge.image_hash(images_of(body)[-1])


def instruction_of(body: dict) -> str | None:
  match = re.search(r'instruction: "(.*)"\.\n', user_text(body))
  return match.group(1) if match else None


def images_of(body: dict) -> list:
  """The request's images, decoded (each must be a base64 JPEG data URL)."""
  out = []
  for m in body["messages"]:
    for p in (m["content"] if isinstance(m["content"], list) else []):
      if p["type"] == "image_url":
        url = p["image_url"]["url"]
        assert url.startswith("data:image/jpeg;base64,"), url[:40]
        img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        assert img.format == "JPEG"
        out.append(np.asarray(img))
  return out


class FakeOpenAI:
  """POST /v1/chat/completions on 127.0.0.1; `reply_fn(body, n) -> Reply` (n: 0-based count)."""

  def __init__(self, reply_fn):
    self.reply_fn = reply_fn
    self.bodies, self.times, self.auth = [], [], []
    self.in_flight = self.max_in_flight = 0
    self._lock = threading.Lock()
    self._closing = threading.Event()
    self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
    self._server.daemon_threads = True
    self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

  @property
  def url(self) -> str:
    return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

  @property
  def count(self) -> int:
    with self._lock:
      return len(self.bodies)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._closing.set()
    self._server.shutdown()
    self._server.server_close()
    self._thread.join(5)

  def _record(self, handler, body):
    with self._lock:
      n = len(self.bodies)
      self.bodies.append(body)
      self.times.append(time.monotonic())
      self.auth.append(handler.headers.get("Authorization"))
      self.in_flight += 1
      self.max_in_flight = max(self.max_in_flight, self.in_flight)
    return n

  def _handler(self):
    fake = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *args):
        pass

      def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        if self.path != "/v1/chat/completions":
          return self._send(404, {"error": {"message": f"no route {self.path}"}}, {})
        n = fake._record(self, body)
        try:
          reply = fake.reply_fn(body, n)
          if reply.delay:
            fake._closing.wait(min(reply.delay, 5.0))
          if reply.status != 200:
            self._send(reply.status, {"error": {"message": reply.message or f"scripted {reply.status}",
                                                "type": "test"}}, reply.headers)
          else:
            self._send(200, completion(body, reply.content), reply.headers)
        except (BrokenPipeError, ConnectionResetError):
          pass  # The client gave up (timeout) or was killed.
        finally:
          with fake._lock:
            fake.in_flight -= 1

      def _send(self, status, payload, headers):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
          self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    return Handler


def completion(body: dict, content: str) -> dict:
  return {"id": "chatcmpl-test", "object": "chat.completion", "created": 0,
          "model": body.get("model", ""),
          "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                       "finish_reason": "stop"}],
          "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}


def fixed(content: str):
  return lambda body, n: Reply(content)


# ---------------------------------------------------------------------------- helpers

def judge_cfg(url: str, **overrides):
  cfg = judge.judge_config()
  cfg.base_url, cfg.api_key = url, KEY
  cfg.backoff_s, cfg.timeout_s, cfg.concurrency = 0.01, 5.0, 1
  for k, v in overrides.items():
    setattr(cfg, k, v)
  return cfg


def requests_for(count: int, perspectives=judge.PERSPECTIVES, describe=False):
  """`count` distinct (original, edited) pairs of 16x16 images, each in every perspective."""
  out = []
  for i in range(count):
    rng = np.random.default_rng(i)
    pair = (rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
            rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    out += [judge.Request(f"item{i}", p, f"make thing {i} red", lambda pair=pair: pair,
                          describe=describe) for p in perspectives]
  return out


def run(cfg, requests, cache_path):
  backend = judge.OpenAIBackend(cfg, seed=0)
  with judge.JudgmentCache(str(cache_path)) as cache:
    return judge.judge_all(backend, requests, cache, concurrency=cfg.concurrency,
                           budget=judge.Budget(cfg.max_requests),
                           rejudge_unparsed=cfg.rejudge_unparsed, max_tries=cfg.max_tries)


# ------------------------------------------------------------------------------ parsing

@pytest.mark.parametrize("text, verdict, score", [
    ('{"verdict": "yes", "score": 4}', "yes", 4.0),
    ("{'verdict': 'No', 'score': 2.5}", "no", 2.5),
    ("Here is my judgment:\n```python\n{'verdict': 'yes', 'score': '3/5'}\n```\nThanks.", "yes", 3.0),
    ('```json\n{"answer": true, "Score": 5}\n```', "yes", 5.0),
    ("{'Verdict': 'Yes.', 'rating': 0}", "yes", 0.0),
    ('noise {"verdict": "maybe", "score": 1} then {"verdict": "no", "score": 1}', "no", 1.0),
])
def test_parse_answer_reads_dicts_in_any_dress(text, verdict, score):
  fields, reason = judge.parse_answer(text)
  assert reason is None and fields == {"verdict": verdict, "score": score}


@pytest.mark.parametrize("text", [
    "", "The edit looks fine to me.", "{verdict: yes, score: 4}", "{'verdict': 'yes'}",
    "{'verdict': 'yes', 'score': 7}", "{'verdict': 'perhaps', 'score': 3}",
    "{'verdict': 'yes', 'score': 'high'}", "{'verdict': 'yes', 'score': True}",
])
def test_parse_answer_refuses_what_it_cannot_read(text):
  fields, reason = judge.parse_answer(text)
  assert fields is None and reason


@pytest.mark.parametrize("text, fields", [
    ("{'verdict': 'yes', 'score': 4.5}", {"verdict": "yes", "score": 4.5}),
    ("{'verdict': 'no', 'score': 3.0} (a yes would need a bluer sky)", {"verdict": "yes", "score": 3.0}),
    ("{'verdict': 'Yes', 'score': 4.0}", {"verdict": "no", "score": 4.0}),  # the substring is lower case
    ("I rate it 'score': 2.5, then 'score': 4.5.", {"verdict": "no", "score": 2.5}),  # the first one
    ("{'following': 'yes', 'score': 7.5}", {"verdict": "yes", "score": 7.5}),  # no range check
    ("{'verdict': 'yes', 'score': 4}", None),  # an integer is not <digits>.<digits>
    ('{"verdict": "yes", "score": 4.5}', None),  # double quotes
    ("{'verdict': 'yes', 'score':4.5}", None),  # no space
    ("yes", None), ("", None), (None, None),
])
def test_parse_answer_release_reads_as_the_release_does(text, fields):
  got, reason = judge.parse_answer_release(text)
  assert got == fields and (reason is None) == (fields is not None)


def test_parse_answer_failure_descriptions():
  fields, _ = judge.parse_answer("{'verdict': 'no', 'score': 2, 'failure': \"the cat's tail is blue\"}", True)
  assert fields["failure"] == "the cat's tail is blue"
  assert judge.parse_answer("{'verdict': 'yes', 'score': 5, 'failure': 'none'}", True)[0]["failure"] == "None"
  assert judge.parse_answer("{'verdict': 'yes', 'score': 5}", True)[0]["failure"] == "None"
  fields, reason = judge.parse_answer("{'verdict': 'no', 'score': 2}", True)
  assert fields is None and "failure" in reason


def test_prompts_follow_the_protocol():
  for p in judge.PERSPECTIVES:
    text = judge.build_prompt(p, "make it winter")
    assert judge.TITLES[p] in text and "'verdict'" in text and "'score'" in text
    assert ("make it winter" in text) == (p != "quality")
    assert "'failure'" not in text and "'failure'" in judge.build_prompt(p, "x", describe=True)
  assert judge.PROMPT_VERSION


def test_cache_key_and_torn_lines(tmp_path):
  a = np.zeros((4, 4, 3), np.uint8)
  b = np.ones((4, 4, 3), np.uint8)
  q = judge.Query("following", "x", a, b)
  keys = {judge.cache_key(q, "m"), judge.cache_key(q, "m2"), judge.cache_key(q, "m", "v0"),
          judge.cache_key(dataclasses.replace(q, instruction="y"), "m"),
          judge.cache_key(dataclasses.replace(q, perspective="preserving"), "m"),
          judge.cache_key(dataclasses.replace(q, original=b), "m"),
          judge.cache_key(dataclasses.replace(q, describe=True), "m")}
  assert len(keys) == 7
  quality = dataclasses.replace(q, perspective="quality")  # Judges the edit alone.
  assert judge.cache_key(quality, "m") == judge.cache_key(dataclasses.replace(quality, original=b), "m")
  path = tmp_path / "cache.jsonl"
  with judge.JudgmentCache(str(path)) as cache:
    cache.put("k1", {"status": "ok"})
  with open(path, "a") as f:
    f.write('{"key": "k2", "judgm')  # A write cut short by a kill.
  cache = judge.JudgmentCache(str(path))
  assert cache.get("k1") == {"status": "ok"} and cache.get("k2") is None and cache.torn == 1
  cache.put("k3", {"status": "ok"})
  cache.close()
  assert judge.JudgmentCache(str(path)).get("k3") == {"status": "ok"}


# ------------------------------------------------------------------- against the server

def test_answers_messages_and_cache(tmp_path):
  answer = "Sure.\n```python\n{'verdict': 'yes', 'score': 4.5}\n```"
  with FakeOpenAI(fixed(answer)) as server:
    cfg = judge_cfg(server.url)
    results = run(cfg, requests_for(2), tmp_path / "cache.jsonl")
    assert server.count == 6
    assert all(r["status"] == "ok" and r["verdict"] == "yes" and r["score"] == 4.5 for r in results)
    assert all(r["prompt_version"] == judge.PROMPT_VERSION and r["model"] == "gpt-4o" for r in results)
    assert all(r["raw"] == answer and r["latency_s"] >= 0 and not r["cached"] for r in results)
    assert set(server.auth) == {f"Bearer {KEY}"}
    for body in server.bodies:
      assert body["model"] == "gpt-4o" and body["messages"][0]["role"] == "system"
      images = images_of(body)
      assert len(images) == (1 if perspective_of(body) == "quality" else 2)
      assert images[0].shape == (16, 16, 3)
    # Another run over the same cache file pays nothing.
    again = run(cfg, requests_for(2), tmp_path / "cache.jsonl")
    assert server.count == 6
    assert all(r["cached"] for r in again)
    assert [r["score"] for r in again] == [r["score"] for r in results]
  assert KEY not in (tmp_path / "cache.jsonl").read_text()


GARBLED = "The edit looks mostly fine, I would say four."


def test_off_format_first_tries_are_reasked_with_a_reminder(tmp_path):
  """Every first try is off-format, item 1's following also its second: all end judged."""
  seen = {}

  def reply(body, n):
    key = ask_key(body)
    seen[key] = seen.get(key, 0) + 1
    late = key[:2] == ("following", "make thing 1 red") and seen[key] == 2
    assert is_reask(body) == (seen[key] > 1)
    return Reply(GARBLED if seen[key] == 1 or late else "{'verdict': 'yes', 'score': 3.5}")
  with FakeOpenAI(reply) as server:
    cfg = judge_cfg(server.url)
    results = run(cfg, requests_for(2), tmp_path / "c.jsonl")
    assert server.count == 13
    for r in results:
      tries = r["tries"]
      assert r["status"] == "ok" and r["score"] == 3.5 and r["prompt_version"] == judge.PROMPT_VERSION
      assert len(tries) == (3 if (r["item"], r["perspective"]) == ("item1", "following") else 2)
      assert [t["raw"] for t in tries] == [GARBLED] * (len(tries) - 1) + [r["raw"]]
      assert [t["reminder"] for t in tries] == [False] + [True] * (len(tries) - 1)
      assert all(t["error"] for t in tries[:-1]) and tries[-1]["error"] is None
      assert r["reasks"] == len(tries) - 1 and r["attempts"] == len(tries)
    assert judge.reask_counts(results) == {"reasked": 6, "reasks": 7, "recovered": 6, "unparsed": 0}
    # A re-ask is the first request again (same prompt, same images) plus the reminder.
    first = {ask_key(b): b for b in reversed(server.bodies)}
    assert len(first) == 6
    for body in server.bodies:
      assert without_reminder(body) == first[ask_key(body)]
    again = run(cfg, requests_for(2), tmp_path / "c.jsonl")
    assert server.count == 13 and all(r["cached"] and r["reasks"] == 0 for r in again)
    assert [r["tries"] for r in again] == [r["tries"] for r in results]


@pytest.mark.parametrize("max_tries", [1, 3, 4])
def test_always_off_format_is_unparsed_after_exactly_max_tries(tmp_path, max_tries):
  with FakeOpenAI(fixed(GARBLED)) as server:
    cfg = judge_cfg(server.url, max_tries=max_tries)
    (r,) = run(cfg, requests_for(1, ["following"]), tmp_path / "c.jsonl")
    assert server.count == max_tries
    assert r["status"] == "unparsed" and r["score"] is None and r["verdict"] is None
    assert r["raw"] == GARBLED and r["error"] == "no dictionary in the answer"
    assert [t["raw"] for t in r["tries"]] == [GARBLED] * max_tries
    assert sum(map(is_reask, server.bodies)) == max_tries - 1
    assert judge.reask_counts([r]) == {"reasked": int(max_tries > 1), "reasks": max_tries - 1,
                                       "recovered": 0, "unparsed": 1}


def test_rerun_reasks_only_unparsed_answers(tmp_path):
  """Item 1 stays off-format in a first run; a rerun asks for its three answers only."""
  garble = {"on": True}

  def reply(body, n):
    bad = garble["on"] and instruction_of(body) == "make thing 1 red"
    return Reply(GARBLED if bad or (garble["on"] and perspective_of(body) == "quality" and n % 2)
                 else "{'verdict': 'no', 'score': 1.5}")
  path = tmp_path / "c.jsonl"
  with FakeOpenAI(reply) as server:
    cfg = judge_cfg(server.url)
    first = run(cfg, requests_for(3, ["following", "preserving"]) + requests_for(2, ["quality"]), path)
    assert [r["status"] for r in first] == ["ok", "ok", "unparsed", "unparsed"] + ["ok"] * 4
    assert len(judge.JudgmentCache(str(path))) == 8  # unparsed answers are kept, as tries
    sent = server.count
    garble["on"] = False
    cfg.rejudge_unparsed = False  # The flag keeps them as they are: nothing is asked.
    kept = run(cfg, requests_for(3, ["following", "preserving"]) + requests_for(2, ["quality"]), path)
    assert server.count == sent and [r["status"] for r in kept] == [r["status"] for r in first]
    cfg.rejudge_unparsed = True
    second = run(cfg, requests_for(3, ["following", "preserving"]) + requests_for(2, ["quality"]), path)
    assert server.count == sent + 2 and all(is_reask(b) for b in server.bodies[sent:])
    assert {instruction_of(b) for b in server.bodies[sent:]} == {"make thing 1 red"}
    assert all(r["status"] == "ok" for r in second)
    assert [len(r["tries"]) for r in second[2:4]] == [4, 4] and second[2]["tries"][:3] == first[2]["tries"]
    assert [r["cached"] for r in second] == [True, True, False, False] + [True] * 4
    run(cfg, requests_for(3, ["following", "preserving"]) + requests_for(2, ["quality"]), path)
    assert server.count == sent + 2


def test_reasks_stop_at_the_request_budget_and_old_cache_entries_are_reasked(tmp_path):
  with FakeOpenAI(fixed(GARBLED)) as server:
    (r,) = run(judge_cfg(server.url, max_requests=2), requests_for(1, ["quality"]), tmp_path / "a.jsonl")
    assert server.count == 2 and r["status"] == "unparsed" and len(r["tries"]) == 2
    assert "budget" in r["error"]
  # A cache written before re-asks existed: an unparsed answer without tries.
  (request,) = requests_for(1, ["following"])
  query = judge.Query("following", request.instruction, *request.load_fn())
  with judge.JudgmentCache(str(tmp_path / "b.jsonl")) as cache:
    cache.put(judge.cache_key(query, "gpt-4o"), {"status": "unparsed", "raw": "old text", "error": "e",
                                                 "attempts": 1, "model": "gpt-4o"})
  with FakeOpenAI(fixed("{'verdict': 'yes', 'score': 2.0}")) as server:
    (r,) = run(judge_cfg(server.url), [request], tmp_path / "b.jsonl")
    assert server.count == 1 and is_reask(server.bodies[0])
    assert r["status"] == "ok" and [t["raw"] for t in r["tries"]] == ["old text", r["raw"]]


def test_max_tries_must_be_a_positive_integer():
  for bad in (0, -1):  # (ConfigDict itself refuses non-integers)
    with pytest.raises(ConfigError, match=f"config.judge.max_tries={bad!r}: expected an integer >= 1"):
      judge.make_backend(judge_cfg("http://127.0.0.1:9/v1", max_tries=bad))


def test_429_retry_after_is_honoured(tmp_path):
  def reply(body, n):
    return Reply(status=429, headers={"Retry-After": "0.4"}) if n == 0 else Reply("{'verdict': 'no', 'score': 1}")
  with FakeOpenAI(reply) as server:
    (r,) = run(judge_cfg(server.url), requests_for(1, ["quality"]), tmp_path / "c.jsonl")
    assert server.count == 2 and r["status"] == "ok" and r["attempts"] == 2
    assert server.times[1] - server.times[0] >= 0.38


def test_5xx_retried_then_answered(tmp_path):
  def reply(body, n):
    return Reply(status=[500, 503][n]) if n < 2 else Reply('{"verdict": "yes", "score": 3}')
  with FakeOpenAI(reply) as server:
    (r,) = run(judge_cfg(server.url), requests_for(1, ["following"]), tmp_path / "c.jsonl")
    assert server.count == 3 and r["status"] == "ok" and r["attempts"] == 3


def test_retries_are_bounded_and_failures_not_cached(tmp_path):
  with FakeOpenAI(lambda body, n: Reply(status=500)) as server:
    cfg = judge_cfg(server.url, max_retries=2)
    (r,) = run(cfg, requests_for(1, ["following"]), tmp_path / "c.jsonl")
    assert server.count == 3 and r["status"] == "failed" and "500" in r["error"]
    assert r["score"] is None
    run(cfg, requests_for(1, ["following"]), tmp_path / "c.jsonl")
    assert server.count == 6  # A failure is not a paid answer: asked again next run.


def test_client_errors_are_not_retried(tmp_path):
  with FakeOpenAI(lambda body, n: Reply(status=400)) as server:
    (r,) = run(judge_cfg(server.url), requests_for(1, ["following"]), tmp_path / "c.jsonl")
    assert server.count == 1 and r["status"] == "failed" and "400" in r["error"]


def test_hanging_request_times_out_and_is_retried(tmp_path):
  # The first request hangs until the server closes (at most 5 s): a client without a timeout
  # would get its answer on the first attempt (no wall-time assertion needed).
  def reply(body, n):
    return Reply("{'verdict': 'yes', 'score': 5}", delay=60.0 if n == 0 else 0.0)
  with FakeOpenAI(reply) as server:
    (r,) = run(judge_cfg(server.url, timeout_s=0.3), requests_for(1, ["quality"]), tmp_path / "c.jsonl")
    assert r["status"] == "ok" and r["attempts"] == 2 and server.count == 2


def test_connection_errors_are_retried_then_fail(tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))  # bound and held, never listening: connections are refused
    cfg = judge_cfg(f"http://127.0.0.1:{s.getsockname()[1]}/v1", max_retries=2)
    (r,) = run(cfg, requests_for(1, ["quality"]), tmp_path / "c.jsonl")
  assert r["status"] == "failed" and r["attempts"] == 3 and "connection" in r["error"].lower()


def test_request_budget_stops_sending(tmp_path):
  def reply(body, n):
    return Reply(status=429, headers={"Retry-After": "0"}) if n == 0 else Reply("{'verdict': 'yes', 'score': 2}")
  with FakeOpenAI(reply) as server:
    results = run(judge_cfg(server.url, max_requests=4), requests_for(2), tmp_path / "c.jsonl")
    assert server.count == 4  # The retry after the 429 counts too.
    assert [r["status"] for r in results] == ["ok"] * 3 + ["budget_exhausted"] * 3


def test_concurrency_limit(tmp_path):
  three_in_flight, fourth = threading.Event(), threading.Event()

  def reply(body, n):
    if server.in_flight > 3:
      fourth.set()
    # The first three answers wait until three requests are in flight at once (an event, so a
    # slow machine cannot fail a correct client), then hold them 0.5 s more: a client allowing
    # more than three sends a fourth meanwhile (a correct one never does; no pass waits on it).
    if n < 3:
      if server.in_flight >= 3:
        three_in_flight.set()
      three_in_flight.wait(30)
      fourth.wait(0.5)
    return Reply("{'verdict': 'yes', 'score': 2}")
  with FakeOpenAI(reply) as server:
    results = run(judge_cfg(server.url, concurrency=3), requests_for(3), tmp_path / "c.jsonl")
    assert all(r["status"] == "ok" for r in results) and server.count == 9
    assert three_in_flight.is_set() and server.max_in_flight == 3


def test_key_from_environment_and_missing_key(tmp_path, monkeypatch):
  monkeypatch.setenv("OPENAI_API_KEY", KEY)
  with FakeOpenAI(fixed("{'verdict': 'yes', 'score': 2}")) as server:
    cfg = judge_cfg(server.url, api_key="")
    run(cfg, requests_for(1, ["quality"]), tmp_path / "c.jsonl")
    assert server.auth == [f"Bearer {KEY}"]
  monkeypatch.delenv("OPENAI_API_KEY")
  with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
    judge.OpenAIBackend(judge_cfg("http://127.0.0.1:9/v1", api_key=""))


# ---------------------------------------------------------------------------- backends

_OPENAI_ONLY = """
import sys
from mre_jax.eval import judge
cfg = judge.judge_config()
cfg.api_key = "sk-test"
backend = judge.make_backend(cfg)
assert type(backend).__name__ == "OpenAIBackend", backend
loaded = sorted(m for m in sys.modules if m.startswith("mre_jax.data.synthetic") or m == "mre_jax.eval.synthetic_judge")
assert not loaded, loaded
"""


def test_judging_with_openai_never_imports_the_synthetic_world():
  out = subprocess.run([sys.executable, "-c", _OPENAI_ONLY], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr


def test_backends_are_found_by_name(tmp_path):
  with pytest.raises(ConfigError, match="config.judge.backend='gpt': expected one of openai, synthetic"):
    judge.make_backend(judge_cfg("http://127.0.0.1:9/v1", backend="gpt"))
  with pytest.raises(ConfigError, match="config.judge.truth is required"):
    judge.make_backend(judge_cfg("http://127.0.0.1:9/v1", backend="synthetic"))
  (tmp_path / "index.json").write_text('{"version": 1, "entries": {}}')
  backend = judge.make_backend(judge_cfg("", backend="synthetic", truth=str(tmp_path / "index.json")))
  assert backend.name == "synthetic" and backend.needs_source_images
