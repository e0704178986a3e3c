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
import threading
import time

import numpy as np
import pytest
from PIL import Image

from mre_jax import judge
from mre_jax import synthetic
from mre_jax.errors import ConfigError

KEY = "sk-test-Zq8v-NEVER-WRITE-ME"


# ------------------------------------------------------------------------- the server

@dataclasses.dataclass
class Reply:
  """What the fake server sends: a chat completion with `content`, or an HTTP error."""
  content: str | None = None
  status: int = 200
  headers: dict = dataclasses.field(default_factory=dict)
  delay: float = 0.0  # seconds before answering (bounded; released when the server closes)


def user_text(body: dict) -> str:
  return "\n".join(p["text"] for m in body["messages"] if m["role"] == "user"
                   for p in m["content"] if p["type"] == "text")


def perspective_of(body: dict) -> str:
  text = user_text(body)
  return next(p for p, title in judge.TITLES.items() if title in text)


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
            self._send(reply.status, {"error": {"message": f"scripted {reply.status}",
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
                           rejudge_unparsed=cfg.rejudge_unparsed)


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


def test_malformed_answer_is_unparsed_not_zero(tmp_path):
  with FakeOpenAI(fixed("The edit looks mostly fine, I would say four.")) as server:
    cfg = judge_cfg(server.url)
    (r,) = run(cfg, requests_for(1, ["following"]), tmp_path / "c.jsonl")
    assert r["status"] == "unparsed" and r["score"] is None and r["verdict"] is None
    assert r["raw"].startswith("The edit looks") and r["error"]
    run(cfg, requests_for(1, ["following"]), tmp_path / "c.jsonl")
    assert server.count == 1  # Paid once: cached as unparsed.
    cfg.rejudge_unparsed = True
    run(cfg, requests_for(1, ["following"]), tmp_path / "c.jsonl")
    assert server.count == 2


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
  def reply(body, n):
    return Reply("{'verdict': 'yes', 'score': 5}", delay=4.0 if n == 0 else 0.0)
  with FakeOpenAI(reply) as server:
    start = time.monotonic()
    (r,) = run(judge_cfg(server.url, timeout_s=0.3), requests_for(1, ["quality"]), tmp_path / "c.jsonl")
    assert r["status"] == "ok" and r["attempts"] == 2 and server.count == 2
    assert time.monotonic() - start < 2.0


def test_connection_errors_are_retried_then_fail(tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]  # Nothing listens here once closed.
  cfg = judge_cfg(f"http://127.0.0.1:{port}/v1", max_retries=2)
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
  with FakeOpenAI(lambda body, n: Reply("{'verdict': 'yes', 'score': 2}", delay=0.15)) as server:
    results = run(judge_cfg(server.url, concurrency=3), requests_for(3), tmp_path / "c.jsonl")
    assert all(r["status"] == "ok" for r in results) and server.count == 9
    assert 2 <= server.max_in_flight <= 3


def test_key_from_environment_and_missing_key(tmp_path, monkeypatch):
  monkeypatch.setenv("OPENAI_API_KEY", KEY)
  with FakeOpenAI(fixed("{'verdict': 'yes', 'score': 2}")) as server:
    cfg = judge_cfg(server.url, api_key="")
    run(cfg, requests_for(1, ["quality"]), tmp_path / "c.jsonl")
    assert server.auth == [f"Bearer {KEY}"]
  monkeypatch.delenv("OPENAI_API_KEY")
  with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
    judge.OpenAIBackend(judge_cfg("http://127.0.0.1:9/v1", api_key=""))


# --------------------------------------------------------------------- synthetic backend

def test_synthetic_backend_scores_exactly(tmp_path):
  ex = synthetic.make_example(4, "test", size=32)
  Image.fromarray(ex["truth"]).save(tmp_path / "t.png")
  judge.write_truth_index(str(tmp_path / "index.json"),
                          [(ex["original"], ex["instruction"], "t.png", ("not done", "half done"))])
  backend = judge.SyntheticBackend(str(tmp_path / "index.json"))
  requests = [judge.Request(name, p, ex["instruction"], lambda e=edited: (ex["original"], e), describe=True)
              for name, edited in (("truth", ex["truth"]), ("none", ex["original"]), ("edited", ex["edited"]))
              for p in judge.PERSPECTIVES]
  requests.append(judge.Request("unknown", "following", "other", lambda: (ex["original"], ex["truth"])))
  with judge.JudgmentCache(str(tmp_path / "c.jsonl")) as cache:
    results = judge.judge_all(backend, requests, cache)
  got = {(r["item"], r["perspective"]): r for r in results}
  assert [got["truth", p]["score"] for p in judge.PERSPECTIVES] == [5.0, 5.0, 5.0]
  assert got["truth", "following"]["verdict"] == "yes" and got["truth", "following"]["failure"] == "None"
  assert got["none", "following"]["score"] == 0.0 and got["none", "following"]["verdict"] == "no"
  assert got["none", "following"]["failure"] == "not done"
  np.testing.assert_allclose([got["edited", p]["score"] for p in judge.PERSPECTIVES], ex["scores"], atol=1e-3)
  assert got["unknown", "following"]["status"] == "failed"
