"""The Real-Edit runner and the reward annotator, end to end against a local judge server.

The editing model is replaced by a trivial edit_fn (a blurred copy with a stamp that
depends on the instruction); the judge is FakeOpenAI (tests/test_judge.py) or the offline
synthetic backend.
"""
import copy
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image, ImageOps
from test_judge import KEY, FakeOpenAI, Reply, images_of, instruction_of, is_reask, perspective_of

from configs import annotate as annotate_config
from configs import evaluate as evaluate_config
from mre_jax import testing
from mre_jax.data import records
from mre_jax.errors import ConfigError
from mre_jax.eval import evaluators, judge
from mre_jax.jobs import annotate as annotate_job
from mre_jax.jobs import evaluate as evaluate_job

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATS = records.CATEGORIES
FAKE_EDIT = '''
"""A stand-in editing model: a blurred copy stamped with a colour from the instruction."""
import os
import zlib

from PIL import ImageFilter


def make_edit_fn(config):
  def edit_fn(images, instructions):
    with open(os.environ["FAKE_EDIT_LOG"], "a") as f:
      f.write("".join(text + "\\n" for text in instructions))
    out = []
    for image, text in zip(images, instructions):
      edited = image.filter(ImageFilter.GaussianBlur(1))
      c = zlib.crc32(text.encode())
      edited.paste((c & 255, (c >> 8) & 255, (c >> 16) & 255), (0, 0, 4, 4))
      out.append(edited)
    return out
  return edit_fn
'''


@pytest.fixture
def fake_edit(tmp_path, monkeypatch):
  """The stand-in model as module `fake_edit`; returns (factory spec, log path, env)."""
  (tmp_path / "mods").mkdir()
  (tmp_path / "mods" / "fake_edit.py").write_text(FAKE_EDIT)
  monkeypatch.syspath_prepend(str(tmp_path / "mods"))
  log = tmp_path / "edit_log.txt"
  monkeypatch.setenv("FAKE_EDIT_LOG", str(log))
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "mods"), REPO]),
         "FAKE_EDIT_LOG": str(log)}
  env.pop("OPENAI_API_KEY", None)
  return "fake_edit:make_edit_fn", log, env


def edit_count(log):
  return len(log.read_text().splitlines()) if log.exists() else 0


def write_real_edit(root, photos=2):
  """Real-Edit layout: photo_<k>.jpg and real_edit.json, instruction "edit <k> <i>"."""
  rng = np.random.default_rng(0)
  os.makedirs(root / "images")
  listing = {}
  for k in range(photos):
    Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(root / "images" / f"photo_{k}.jpg")
    listing[f"photo_{k}.jpg"] = [f"{c}. A {c.lower()} edit, e.g. x: edit {k} {i}" for i, c in enumerate(CATS)]
  (root / "real_edit.json").write_text(json.dumps(listing))
  return root


# Following scores per photo and category index; None: a malformed answer.
FOLLOW = {0: [5, 4, 3, 2, 1, 0, 5], 1: [5, 5, 5, 5, 5, 5, None]}


def known_answers(body, n):
  p = perspective_of(body)
  if p == "quality":
    return Reply('```json\n{"verdict": "yes", "score": 4}\n```')
  k, i = map(int, instruction_of(body).split()[1:])
  if p == "preserving":
    return Reply(["{'verdict': 'no', 'score': 2.5}", "{'verdict': 'yes', 'score': 4.5}"][k])
  score = FOLLOW[k][i]
  if score is None:
    return Reply("I cannot decide.")
  return Reply(f"{{'verdict': '{'yes' if score >= 3 else 'no'}', 'score': {score}}}")


def eval_config(real_edit_dir, url, factory="fake_edit:make_edit_fn"):
  config = evaluate_config.get_config()
  config.real_edit_dir, config.edit_factory = str(real_edit_dir), factory
  config.judge.base_url, config.judge.api_key = url, KEY
  config.judge.backoff_s, config.judge.concurrency = 0.01, 2
  config.bootstrap_samples = 200
  return config


def assert_cell(cell, judged, yes, score):
  assert cell["judged"] == judged
  assert cell["yes_share"] == pytest.approx(yes) and cell["mean_score"] == pytest.approx(score)
  assert cell["yes_ci"][0] <= yes + 1e-9 and yes - 1e-9 <= cell["yes_ci"][1]
  assert cell["score_ci"][0] <= score + 1e-9 and score - 1e-9 <= cell["score_ci"][1]


def test_table_from_known_answers(tmp_path, fake_edit, capsys):
  factory, log, _ = fake_edit
  root, out = write_real_edit(tmp_path / "re"), tmp_path / "run"
  with FakeOpenAI(known_answers) as server:
    config = eval_config(root, server.url, factory)
    table = evaluate_job.run_real_edit(config, str(out))
    assert server.count == 44 and edit_count(log) == 14  # the unreadable answer was asked 3 times
    # The judge sees the fitted photo and the edit at 512 high: 32x24 -> 682x512.
    assert {im.shape for b in server.bodies for im in images_of(b)} == {(512, 682, 3)}
    rows = table["rows"]
    # By hand: following scores 5,4,3,2,1,0,5 and 5 x 6 (+1 unparsed); yes when >= 3.
    assert_cell(rows["overall"]["following"], 13, 10 / 13, 50 / 13)
    assert rows["overall"]["following"]["unparsed"] == 1
    for i, (yes, score) in enumerate([(1, 5), (1, 4.5), (1, 4), (0.5, 3.5), (0.5, 3), (0.5, 2.5)]):
      assert_cell(rows[CATS[i]]["following"], 2, yes, score)
    assert_cell(rows["Style"]["following"], 1, 1.0, 5.0)
    for row in ["overall"] + list(CATS):
      assert_cell(rows[row]["preserving"], 14 if row == "overall" else 2, 0.5, 3.5)
      assert_cell(rows[row]["quality"], 14 if row == "overall" else 2, 1.0, 4.0)
    assert rows["overall"]["quality"]["score_ci"] == [4.0, 4.0]
    assert table["counts"] == {"items": 14, "judged": 13, "failed": 1, "judgments": {
        "ok": 41, "unparsed": 1, "failed": 0, "budget_exhausted": 0, "no_edit": 0},
        "reask": {"reasked": 1, "reasks": 2, "recovered": 0, "unparsed": 1}}
    assert table["protocol"] == "proper"
    lines = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 42
    for r in lines:
      assert r["prompt_version"] == judge.PROMPT_VERSION and r["model"] == "gpt-4o"
      assert r["latency_s"] is not None and r["raw"] and r["category"] in CATS
    (bad,) = [r for r in lines if r["status"] == "unparsed"]
    assert bad["raw"] == "I cannot decide." and bad["score"] is None and bad["item"] == "photo_1.jpg#6"
    assert [t["raw"] for t in bad["tries"]] == ["I cannot decide."] * 3
    assert json.loads((out / "table.json").read_text()) == table
    markdown = (out / "table.md").read_text()
    assert "| overall | 76.9 [" in markdown and "protocol: proper (" in markdown
    assert "answers re-asked this run (off-format): 1 (2 re-asks), 0 of them then read; still unparsed: 1" in markdown
    assert "| overall |" in capsys.readouterr().out
    # A second run edits nothing and pays only for re-asking the unreadable answer.
    evaluate_job.run_real_edit(config, str(out))
    assert server.count == 47 and edit_count(log) == 14
    assert all(is_reask(b) for b in server.bodies[44:])
  # --config.compare: side by side with the difference.
  other = copy.deepcopy(table)
  other["rows"]["overall"]["quality"]["mean_score"] = 3.0
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "table.json").write_text(json.dumps(other))
  config.real_edit_dir, config.compare = "", str(tmp_path / "other")
  evaluate_job.evaluate(config, str(out))
  assert "| overall | quality | 100.0 | 100.0 | 0.0 | 4.00 | 3.00 | 1.00 |" in capsys.readouterr().out
  assert (out / "compare.md").exists()


def run_main(args, env, log_path):
  with open(log_path, "w") as log:
    return subprocess.Popen([sys.executable, "main.py"] + args, cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def test_killed_run_resumes_without_losing_or_repaying(tmp_path, fake_edit):
  factory, log, env = fake_edit
  root, out = write_real_edit(tmp_path / "re"), tmp_path / "run"
  # The first run's 13th and later requests are held (no answer) until it is killed: it is
  # killed mid-judging at a known point, not after a wall-clock wait.
  held, release = threading.Event(), threading.Event()

  def reply(body, n):
    if n >= 12 and not release.is_set():
      held.set()
      release.wait(60)
    return Reply("{'verdict': 'yes', 'score': 3}")
  with FakeOpenAI(reply) as server:
    args = ["--config=configs/evaluate.py", f"--config.real_edit_dir={root}",
            f"--config.edit_factory={factory}", f"--config.judge.base_url={server.url}",
            "--config.judge.concurrency=2", "--config.judge.backoff_s=0.01", f"--workdir={out}"]
    proc = run_main(args, {**env, "OPENAI_API_KEY": KEY}, tmp_path / "log1.txt")
    while not held.wait(0.1):
      assert proc.poll() is None, (tmp_path / "log1.txt").read_text()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    release.set()
    paid_before = server.count
    kept = len(judge.JudgmentCache(str(out / "judge_cache.jsonl")))
    assert 8 <= kept <= 12 and edit_count(log) == 14
    proc = run_main(args, {**env, "OPENAI_API_KEY": KEY}, tmp_path / "log2.txt")
    assert proc.wait(60) == 0, (tmp_path / "log2.txt").read_text()
    assert server.count - paid_before == 42 - kept  # Nothing finished is paid again.
    results = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert len(results) == 42 and all(r["status"] == "ok" for r in results)
    assert sum(r["cached"] for r in results) == kept and edit_count(log) == 14
    assert set(server.auth) == {f"Bearer {KEY}"}
    # The key given as a config field instead: all cached, and still written nowhere.
    proc = run_main(args + [f"--config.judge.api_key={KEY}x"], env, tmp_path / "log3.txt")
    assert proc.wait(60) == 0, (tmp_path / "log3.txt").read_text()
    assert server.count - paid_before == 42 - kept
  assert "api_key" not in json.loads((out / "run_config.json").read_text())["judge"]
  for folder, _, files in os.walk(tmp_path):
    for name in files:
      assert KEY.encode() not in open(os.path.join(folder, name), "rb").read(), name


def test_synthetic_backend_end_to_end(tmp_path):
  info = testing.write_synthetic_real_edit(str(tmp_path / "re"), 2, size=32)
  listing = json.loads(open(info["json"]).read())
  listing["photo_000.png"].append("Not a well-formed instruction")
  listing["ghost.png"] = ["Local. Missing photo: make it red"]
  open(info["json"], "w").write(json.dumps(listing))
  truths = {}
  for key, truth in info["truths"].items():
    name, i = key.split("#")
    photo = records.load_rgb(str(tmp_path / "re" / name))
    text = listing[name][int(i)].rsplit(": ", 1)[1]
    truths[judge.image_hash(photo), text] = truth if int(i) % 2 == 0 else photo

  def edit_fn(images, instructions):  # The exact edit for even indices, nothing for odd ones.
    return [Image.fromarray(truths[judge.image_hash(np.asarray(im)), t]) for im, t in zip(images, instructions)]

  config = evaluate_config.get_config()
  config.real_edit_dir = str(tmp_path / "re")
  config.judge.backend, config.judge.truth = "synthetic", info["truth"]
  table = evaluate_job.run_real_edit(config, str(tmp_path / "run"), edit_fn=edit_fn)
  rows = table["rows"]
  assert_cell(rows["overall"]["following"], 14, 8 / 14, 5 * 8 / 14)
  assert_cell(rows["Local"]["following"], 2, 1.0, 5.0)
  assert_cell(rows["Remove"]["following"], 2, 0.0, 0.0)
  assert_cell(rows["overall"]["preserving"], 14, 1.0, 5.0)
  assert_cell(rows["overall"]["quality"], 14, 1.0, 5.0)
  assert table["counts"]["items"] == 16 and table["counts"]["failed"] == 2
  assert table["counts"]["judgments"]["no_edit"] == 6
  assert rows["overall"]["following"]["failed"] == 2


def test_edit_factory_errors_are_clear(tmp_path):
  root = write_real_edit(tmp_path / "re", photos=1)
  config = eval_config(root, "http://127.0.0.1:9/v1", factory="mre_jax.no_such_module:make_edit_fn")
  with pytest.raises(ConfigError, match="config.edit_factory.*no_such_module"):
    evaluate_job.run_real_edit(config, str(tmp_path / "a"))
  config.edit_factory = "mre_jax.eval.judge:make_edit_fn"
  with pytest.raises(ConfigError, match="has no function make_edit_fn"):
    evaluate_job.run_real_edit(config, str(tmp_path / "b"))
  config.edit_factory = evaluate_job.DEFAULT_EDIT_FACTORY
  with pytest.raises(ConfigError, match="config.checkpoint"):
    evaluate_job.run_real_edit(config, str(tmp_path / "c"))


def test_annotate_synthetic_writes_reward_edit(tmp_path):
  info = testing.write_synthetic_ip2p(str(tmp_path / "ip"), 5, size=32)
  seeds = json.loads((tmp_path / "ip" / "seeds.json").read_text())
  seeds += [["missing_folder", [1]], "not an entry"]
  (tmp_path / "ip" / "seeds.json").write_text(json.dumps(seeds))
  (tmp_path / "ip" / "synth_00004" / "4_1.png").write_bytes(b"not an image")
  config = annotate_config.get_config()
  config.source = str(tmp_path / "ip")
  config.judge.backend, config.judge.truth = "synthetic", info["truth"]
  out = annotate_job.annotate(config, str(tmp_path / "run"))
  written = json.loads((tmp_path / "run" / "RewardEdit_20K.json").read_text())
  assert written == out and sorted(out) == [f"synth_{k:05d}" for k in range(4)]
  for name, entries in out.items():
    scores, texts = records.parse_rewards(entries, name)
    np.testing.assert_allclose(scores, info["examples"][name]["scores"], atol=1e-3)
    assert [t == "None" for t in texts] == [s == 5.0 for s in scores]
  failures = json.loads((tmp_path / "run" / "failures.json").read_text())
  assert sorted(failures) == ["missing_folder", "seeds.json[6]", "synth_00004"]
  assert all(f["reason"] == "no_edit" and f["detail"] for f in failures.values())
  annotate_job.annotate(config, str(tmp_path / "run"))  # Resumes: only the failures are tried.
  assert len((tmp_path / "run" / "results.jsonl").read_text().splitlines()) == 9


def test_annotate_with_judge_server(tmp_path):
  info = testing.write_synthetic_ip2p(str(tmp_path / "ip"), 2, size=32)
  first = info["examples"]["synth_00000"]["instruction"]

  def reply(body, n):
    p = perspective_of(body)
    if p == "following" and instruction_of(body) != first:  # No failure description: unparsed.
      return Reply("{'verdict': 'no', 'score': 2}")
    return Reply({"following": "{'verdict': 'no', 'score': 2, 'failure': 'the sky is still blue'}",
                  "preserving": "{'verdict': 'yes', 'score': 5, 'failure': 'None'}",
                  "quality": "{'verdict': 'yes', 'score': 4, 'failure': ['a bit blurry', 'noisy']}"}[p])
  with FakeOpenAI(reply) as server:
    config = annotate_config.get_config()
    config.source = str(tmp_path / "ip")
    config.judge.base_url, config.judge.api_key, config.judge.backoff_s = server.url, KEY, 0.01
    out = annotate_job.annotate(config, str(tmp_path / "run"))
    assert server.count == 8  # synth_00001's following: asked 3 times
    assert all("'failure'" in b["messages"][1]["content"][-1]["text"] for b in server.bodies)
  assert out == {"synth_00000": [
      {"Score": 2.0, "Negative Prompt": "the sky is still blue", "seed": "0"},
      {"Score": 5.0, "Negative Prompt": "None", "seed": "0"},
      {"Score": 4.0, "Negative Prompt": "a bit blurry; noisy", "seed": "0"}]}
  failures = json.loads((tmp_path / "run" / "failures.json").read_text())
  assert failures["synth_00001"]["reason"] == "unparsed"
  assert "following" in failures["synth_00001"]["detail"]
  results = [json.loads(l) for l in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
  (bad,) = [r for r in results if r["status"] != "ok"]
  assert [t["raw"] for t in bad["tries"]] == ["{'verdict': 'no', 'score': 2}"] * 3


def garbling(n, answer):
  """A judge server that garbles 1 answer in 13 and fails some requests (429, 500)."""
  if n % 17 == 5:
    return Reply(status=500)
  if n % 19 == 9:
    return Reply(status=429, headers={"Retry-After": "0"})
  return Reply("Overall the edit is fine." if n % 13 == 6 else answer)


def test_garbling_server_annotate_labels_every_name_evaluate_judges_every_item(tmp_path, fake_edit, capsys):
  factory, _, _ = fake_edit
  answer = "{'verdict': 'yes', 'score': 4.5, 'failure': 'None'}"
  testing.write_synthetic_ip2p(str(tmp_path / "ip"), 18, size=32)
  with FakeOpenAI(lambda body, n: garbling(n, answer)) as server:
    config = annotate_config.get_config()
    config.source = str(tmp_path / "ip")
    config.judge.base_url, config.judge.api_key, config.judge.backoff_s = server.url, KEY, 0.01
    config.judge.concurrency = 2
    out = annotate_job.annotate(config, str(tmp_path / "ann"))
    assert len(out) == 18 and json.loads((tmp_path / "ann" / "failures.json").read_text()) == {}
    results = [json.loads(l) for l in (tmp_path / "ann" / "results.jsonl").read_text().splitlines()]
    figures = judge.reask_counts(results)
    assert figures["reasked"] >= 3 and figures["recovered"] == figures["reasked"] and figures["unparsed"] == 0
    assert f"answers re-asked this run (off-format): {figures['reasked']} (" in capsys.readouterr().out
    sent = server.count
    annotate_job.annotate(config, str(tmp_path / "ann"))  # Every name labelled: nothing to ask.
    assert server.count == sent
    root = write_real_edit(tmp_path / "re")
    config = eval_config(root, server.url, factory)
    table = evaluate_job.run_real_edit(config, str(tmp_path / "ev"))
    assert table["counts"]["judged"] == 14 and table["counts"]["reask"]["unparsed"] == 0
    assert table["counts"]["reask"]["reasked"] >= 2
    sent = server.count
    evaluate_job.run_real_edit(config, str(tmp_path / "ev"))
    assert server.count == sent


def test_annotate_never_writes_the_key(tmp_path, monkeypatch):
  """The key from the environment, echoed back by a server's error message, is in no file."""
  info = testing.write_synthetic_ip2p(str(tmp_path / "ip"), 2, size=32)
  first = info["examples"]["synth_00000"]["instruction"]
  monkeypatch.setenv("OPENAI_API_KEY", KEY)

  def reply(body, n):
    if instruction_of(body) == first:
      return Reply(status=401, message=f"Incorrect API key provided: {KEY}.")
    return Reply("{'verdict': 'yes', 'score': 4.5, 'failure': 'None'}")
  with FakeOpenAI(reply) as server:
    config = annotate_config.get_config()
    config.source = str(tmp_path / "ip")
    config.judge.base_url, config.judge.backoff_s = server.url, 0.01
    out = annotate_job.annotate(config, str(tmp_path / "run"))
    assert set(server.auth) == {f"Bearer {KEY}"}
  assert sorted(out) == ["synth_00001"]
  failures = json.loads((tmp_path / "run" / "failures.json").read_text())
  assert "401" in failures["synth_00000"]["detail"] and "***" in failures["synth_00000"]["detail"]
  for folder, _, files in os.walk(tmp_path):
    for name in files:
      assert KEY.encode() not in open(os.path.join(folder, name), "rb").read(), name


def record(item, category, perspective, raw, status=None):
  """A result record from a hand-made answer, read as the judge reads it."""
  fields = judge.parse_answer(raw)[0] if raw else None
  return {"item": item, "category": category, "perspective": perspective, "raw": raw,
          "status": status or ("ok" if fields else "unparsed"), "model": "m",
          **(fields or {"verdict": None, "score": None})}


HAND_MADE = [
    # A: following says "no" but mentions "yes": a yes for the release.
    record("A", "Local", "following", "{'verdict': 'no', 'score': 4.5} (a yes needs a bluer sky)"),
    record("A", "Local", "preserving", "{'verdict': 'yes', 'score': 3.5}"),
    record("A", "Local", "quality", "{'verdict': 'yes', 'score': 4.0}"),
    # B: an integer score does not read for the release: B is dropped everywhere.
    record("B", "Local", "following", "{'verdict': 'yes', 'score': 5}"),
    record("B", "Local", "preserving", "{'verdict': 'no', 'score': 1.5}"),
    record("B", "Local", "quality", "{'verdict': 'no', 'score': 2.5}"),
    # C: no dictionary (unparsed) but the release reads it.
    record("C", "Add", "following", "Looks right, yes: 'score': 3.5"),
    record("C", "Add", "preserving", "{'verdict': 'yes', 'score': 4.5}"),
    record("C", "Add", "quality", "{'verdict': 'no', 'score': 1.0}"),
    # D: no answer for quality: dropped everywhere by the release, only quality by proper.
    record("D", "Add", "following", "{'verdict': 'yes', 'score': 2.0}"),
    record("D", "Add", "preserving", "{'verdict': 'no', 'score': 0.5}"),
    record("D", "Add", "quality", None, status="failed"),
]


def test_release_protocol_on_hand_made_answers(tmp_path, capsys):
  proper = evaluators.make_table(HAND_MADE, samples=50)
  release = evaluators.make_table(HAND_MADE, protocol="release", samples=50)
  p, r = proper["rows"]["overall"], release["rows"]["overall"]
  assert_cell(p["following"], 3, 2 / 3, 11.5 / 3)
  assert_cell(p["preserving"], 4, 0.5, 2.5)
  assert_cell(p["quality"], 3, 1 / 3, 2.5)
  assert_cell(r["following"], 2, 1.0, 4.0)  # A (yes 4.5), C (yes 3.5)
  assert_cell(r["preserving"], 2, 1.0, 4.0)
  assert_cell(r["quality"], 2, 0.5, 2.5)
  assert [r[q]["not_judged"] for q in judge.PERSPECTIVES] == [2, 2, 2]
  assert (r["following"]["unparsed"], r["quality"]["failed"]) == (1, 1)
  assert_cell(release["rows"]["Local"]["following"], 1, 1.0, 4.5)
  assert_cell(release["rows"]["Add"]["quality"], 1, 0.0, 1.0)
  assert (proper["protocol"], release["protocol"]) == ("proper", "release")
  assert proper["counts"]["judged"] == release["counts"]["judged"] == 2  # A, B vs A, C
  assert proper["counts"]["judgments"] == release["counts"]["judgments"]
  assert "protocol: release (" in evaluators.table_markdown(release)
  assert "items: 4, judged in all perspectives: 2, dropped: 2" in evaluators.table_markdown(release)
  # --config.compare=release: this run's results read both ways, side by side.
  run = tmp_path / "run"
  run.mkdir()
  (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in HAND_MADE))
  (run / "table.json").write_text(json.dumps(proper))
  config = evaluate_config.get_config()
  config.compare, config.bootstrap_samples = "release", 50
  evaluate_job.evaluate(config, str(run))
  text = (run / "compare.md").read_text()
  assert text == capsys.readouterr().out.rstrip("\n") + "\n"
  assert text.startswith(f"A = {run} (proper protocol), B = {run} read by the release protocol (release protocol)")
  assert "| overall | following | 66.7 | 100.0 | -33.3 | 3.83 | 4.00 | -0.17 |" in text
  assert "protocol differs: A proper vs B release" in text


def test_judge_images_are_the_fitted_photo_and_the_edit_512_high():
  rng = np.random.default_rng(0)
  ramp = np.linspace(0, 255, 48)
  photo = np.stack([np.tile(ramp, (27, 1)), np.tile(ramp[::-1], (27, 1)), rng.uniform(0, 255, (27, 48))], -1)
  photo = photo.astype(np.uint8)  # 48x27 (16:9)
  edited = rng.integers(0, 256, (27, 48, 3), dtype=np.uint8)
  f = 512 / 48  # SPEC section 4, written out: working size 512x320
  f = math.ceil(27 * f / 64) * 64 / 27
  working = (math.floor(48 * f / 64) * 64, math.floor(27 * f / 64) * 64)
  assert working == (512, 320)
  fitted = ImageOps.fit(Image.fromarray(photo), working, method=Image.Resampling.LANCZOS)
  size = (math.floor(512 * 48 / 27), 512)
  original, edit_seen = evaluators.judge_images(photo, edited, resolution=512, size_rule="release", height=512)
  np.testing.assert_array_equal(original, np.asarray(fitted.resize(size, Image.Resampling.BICUBIC)))
  np.testing.assert_array_equal(edit_seen, np.asarray(Image.fromarray(edited).resize(size, Image.Resampling.BICUBIC)))
  assert original.shape == edit_seen.shape == (512, 910, 3)
  unfitted = np.asarray(Image.fromarray(photo).resize(size, Image.Resampling.BICUBIC), np.float64)
  assert np.abs(unfitted[..., 0] - original[..., 0]).mean() > 5  # the crop shows: not a plain resize
  portrait = evaluators.judge_images(photo.transpose(1, 0, 2), edited.transpose(1, 0, 2), resolution=512,
                                     size_rule="short_side", height=512)
  assert [im.shape for im in portrait] == [(512, 288, 3)] * 2
  same = evaluators.judge_images(photo, edited, resolution=512, size_rule="release", height=0)
  assert same[0] is photo and same[1] is edited


@pytest.mark.parametrize("field, value, match", [
    ("judge.protocol", "paper", "config.judge.protocol='paper': expected one of proper, release"),
    ("judge_height", -1, "config.judge_height=-1: expected an integer >= 0"),
    ("edit.size_rule", "long", "config.edit.size_rule='long': expected one of release, short_side"),
    ("edit.resolution", 500, "config.edit.resolution=500: expected a positive multiple of 64"),
    ("judge.max_tries", 0, "config.judge.max_tries=0: expected an integer >= 1"),
])
def test_bad_evaluation_fields_fail_before_editing(tmp_path, field, value, match, fake_edit):
  factory, log, _ = fake_edit
  config = eval_config(write_real_edit(tmp_path / "re", photos=1), "http://127.0.0.1:9/v1", factory)
  section, _, name = field.rpartition(".")
  setattr(config[section] if section else config, name, value)
  with pytest.raises(ConfigError, match=re.escape(match)):
    evaluate_job.evaluate(config, str(tmp_path / "run"))
  assert edit_count(log) == 0


def test_real_model_edits_through_the_default_edit_factory(tmp_path, tiny_folder):
  """config.checkpoint + config.edit.* -> mre_jax.infer.edit.make_edit_fn -> judged edits."""
  info = testing.write_synthetic_real_edit(str(tmp_path / "re"), 1, size=32)
  config = evaluate_config.get_config()
  config.real_edit_dir = str(tmp_path / "re")
  config.checkpoint = str(tiny_folder)
  config.edit.steps, config.edit.resolution = 2, 64
  config.judge.backend, config.judge.truth = "synthetic", info["truth"]
  table = evaluate_job.run_real_edit(config, str(tmp_path / "run"))
  assert table["counts"]["items"] == 7 and table["counts"]["failed"] == 0
  assert table["rows"]["overall"]["quality"]["judged"] == 7
  assert len(list((tmp_path / "run").rglob("*.png"))) >= 7  # the edits, on disk for resuming


def test_annotate_a_tfds_source(tmp_path):
  """Triplets from a data/ builder (instruct_pix2pix built from a folder) instead of a folder."""
  info = testing.write_synthetic_ip2p(str(tmp_path / "ip"), 3, size=32)
  answer = "{'verdict': 'yes', 'score': 4, 'failure': 'None'}"
  with FakeOpenAI(lambda body, n: Reply(answer)) as server:
    config = annotate_config.get_config()
    config.dataset, config.manual_dir, config.data_dir = "instruct_pix2pix", str(tmp_path / "ip"), str(tmp_path / "tfds")
    config.judge.base_url, config.judge.api_key, config.judge.backoff_s = server.url, KEY, 0.01
    out = annotate_job.annotate(config, str(tmp_path / "run"))
    assert server.count == 9
  assert sorted(out) == sorted(info["examples"])
  assert [e["seed"] for e in out["synth_00001"]] == ["1"] * 3
  assert all([e["Score"] for e in entries] == [4.0, 4.0, 4.0] for entries in out.values())
