"""The serve job: config checks, the editing service (no recompiles, bad inputs, progress), the
examples, and the page itself in a real browser (Debian's Chromium driven by Playwright)."""

import dataclasses
import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from configs import serve as serve_config
from mre_jax.app import serve, serve_screenshot
from mre_jax.data import records, synthetic
from mre_jax.errors import ConfigError
from mre_jax.infer import edit, sampling
from mre_jax.jobs import serve as serve_job

ROOT = Path(__file__).resolve().parents[1]
RES = 64
STEPS = 4  # the service's default steps (a count no other test file compiles at this size)


def _settings(tiny_folder, **overrides):
  config = serve_config.get_config()
  config.update(dict(checkpoint=str(tiny_folder), resolution=RES, steps=STEPS))
  config.update(overrides)
  return serve_job.check_config(config)


@pytest.fixture(scope="module")
def service(tiny_folder):
  service = serve.EditService(edit.load_editor(tiny_folder), _settings(tiny_folder))
  service.warm_up()
  return service


def _png(path, width, height, seed=0, mode="RGB"):
  pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
  Image.fromarray(pixels).convert(mode).save(path)
  return path


@pytest.fixture
def photo(tmp_path):
  return _png(tmp_path / "photo.png", 80, 48)


def _values(image, **changes):
  """The page's raw values in `make_app`'s input order, as Gradio passes them (preprocess=False)."""
  values = dict(image={"path": str(image), "orig_name": Path(image).name} if image else None,
                instruction="make it blue", following=5.0, preserving=5.0, quality=5.0,
                reward_text=edit.DEFAULT_REWARD_TEXT, text_guidance=7.5, image_guidance=1.5, steps=STEPS,
                scheduler="euler_ancestral", seed=0)
  values.update(changes)
  return list(values.values())


def _no_progress(*args, **kwargs):
  del args, kwargs


def _total_traces():
  return sum(sampling.TRACES.values())


# ----------------------------------------------------------------------------- config


def test_the_config_documents_every_field():
  lines = (ROOT / "configs" / "serve.py").read_text().splitlines()
  for field in set(serve_config.get_config()) - {"job"}:
    i = next(i for i, line in enumerate(lines) if line.strip().startswith(f"config.{field} = "))
    assert "#" in lines[i] or lines[i - 1].strip().startswith("#"), f"config.{field}: no comment"


@pytest.mark.parametrize("changes, message", [
    (dict(checkpoint=""), r"config.checkpoint is required"),
    (dict(resolution=100), r"config.resolution=100: expected a positive multiple of 64"),
    (dict(port=70000), r"config.port=70000: expected an integer in \[0, 65535\]"),
    (dict(steps=200), r"config.steps=200: expected an integer in \[1, 100\]"),
    (dict(scheduler="heun"), r"config.scheduler='heun': expected one of"),
    (dict(dtype="float16"), r"config.dtype='float16': expected one of float32, bfloat16"),
    (dict(text_guidance=50.0), r"config.text_guidance=50.0: expected a number in \[0, 20\]"),
    (dict(scores=(5.0, 6.0, 5.0)), r"config.scores=.*: every score must be in \[0, 5\]"),
    (dict(max_megapixels=-1.0), r"config.max_megapixels=-1.0: expected a positive number"),
    (dict(examples=-1), r"config.examples=-1: expected an integer in \[0, 100\]"),
])
def test_bad_config_fields_are_named(tiny_folder, changes, message):
  with pytest.raises(ConfigError, match=message):
    _settings(tiny_folder, **changes)


def test_cli_a_taken_port_exits_1_naming_it_before_loading_the_model(tmp_path):
  taken = serve_job.listen("127.0.0.1", 0)
  try:
    port = taken.getsockname()[1]
    out = subprocess.run([sys.executable, "main.py", "--config=configs/serve.py", f"--config.checkpoint={tmp_path}",
                          f"--config.port={port}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  finally:
    taken.close()
  assert out.returncode == 1 and f"config.port={port}: cannot listen there" in out.stderr, out.stderr[-2000:]


# ----------------------------------------------------------------------------- the service


def test_an_edit_keeps_the_aspect_ratio_at_the_working_scale(service, photo):
  image, line = serve._handle(service, _values(photo), _no_progress)
  assert line.startswith("Edited: 107x64 px"), line
  assert image.size == edit.output_size((80, 48), RES) == (107, 64)
  assert image.mode == "RGB"


def test_after_the_warm_up_the_first_edit_does_not_compile(service, photo):
  fresh = serve.EditService(service.editor, dataclasses.replace(service.settings, steps=7))  # a program of its own
  fresh.warm_up()
  traces = _total_traces()
  _, line = serve._handle(fresh, _values(photo, steps=7), _no_progress)  # another image, same working size
  assert line.startswith("Edited") and _total_traces() == traces, dict(sampling.TRACES)


def test_moving_sliders_or_the_seed_never_recompiles(service, photo):
  traces = _total_traces()  # the fixture's warm-up compiled the default program
  for change in (dict(), dict(following=0.0), dict(preserving=2.5, quality=1.0), dict(seed=123456),
                 dict(seed=4_000_000_000.0), dict(text_guidance=3.0, image_guidance=2.25),
                 dict(reward_text="The triangle is still white; None; None"), dict(instruction="make it red")):
    _, line = serve._handle(service, _values(photo, **change), _no_progress)
    assert line.startswith("Edited"), (change, line)
  assert _total_traces() == traces, dict(sampling.TRACES)
  # The counter does see compiles: a new step count is a new program (once).
  for _ in range(2):
    serve._handle(service, _values(photo, steps=9), _no_progress)
  assert _total_traces() == traces + 1


def test_the_result_depends_on_the_sliders_and_the_seed(service, photo):
  base, _ = serve._handle(service, _values(photo), _no_progress)
  again, _ = serve._handle(service, _values(photo), _no_progress)
  np.testing.assert_array_equal(np.asarray(base), np.asarray(again))
  for change in (dict(following=0.0), dict(seed=7), dict(image_guidance=0.5)):
    other, _ = serve._handle(service, _values(photo, **change), _no_progress)
    assert not np.array_equal(np.asarray(base), np.asarray(other)), change


def _png_header(width, height):
  """A PNG that claims width x height and holds no pixel data (nothing big is ever allocated)."""
  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) +
          chunk(b"IEND", b""))


def test_bad_inputs_become_messages(service, photo, tmp_path):
  text = tmp_path / "notes.png"
  text.write_text("not an image")
  huge = tmp_path / "huge.png"
  huge.write_bytes(_png_header(10_000, 8_000))  # 80 megapixels: over config.max_megapixels (50)
  bomb = tmp_path / "bomb.png"
  bomb.write_bytes(_png_header(30_000, 30_000))  # over PIL's own decompression-bomb limit
  truncated = tmp_path / "cut.png"
  truncated.write_bytes(photo.read_bytes()[:200])
  cases = [
      (_values(photo, instruction=""), "The instruction is empty"),
      (_values(photo, instruction="   "), "The instruction is empty"),
      (_values(None), "No image: upload one"),
      (_values(text), "notes.png is not an image"),
      (_values(truncated), "cut.png is not a readable image"),
      (_values(huge), "huge.png is 10000x8000 (80.0 megapixels); this server accepts up to 50 megapixels "
                      "(config.max_megapixels)"),
      (_values(bomb), "bomb.png is too large"),
      (_values(photo, following=7), "The following score must be a number in [0, 5], got 7"),
      (_values(photo, quality=float("nan")), "The quality score must be a number in [0, 5]"),
      (_values(photo, seed=-1), "The seed must be a number in [0, 4.29497e+09], got -1"),
      (_values(photo, seed=1.5), "The seed must be a whole number"),
      (_values(photo, seed=None), "The seed must be a number"),
      (_values(photo, steps=0), "Steps must be a number in [1, 100], got 0"),
      (_values(photo, scheduler="heun"), "The scheduler must be one of euler_ancestral, euler, ddim"),
      (_values(photo, text_guidance="x"), "Text guidance must be a number in [0, 20], got 'x'"),
  ]
  for values, message in cases:
    image, line = serve._handle(service, values, _no_progress)
    assert image is None and "Error: " in line and message in line, (message, line)
  _, line = serve._handle(service, _values(photo), _no_progress)
  assert line.startswith("Edited"), line  # and the service still edits


def test_a_huge_image_is_refused_before_it_is_decoded(service, tmp_path):
  small_limit = dataclasses.replace(service.settings, max_megapixels=0.001)  # 1000 pixels
  ok, too_big = _png(tmp_path / "ok.png", 40, 25), _png(tmp_path / "big.png", 40, 26)
  assert serve.parse_request(small_limit, *_values(ok)).image.size == (40, 25)
  with pytest.raises(serve.InputError, match=r"big.png is 40x26 \(0.0 megapixels\); this server accepts up to "
                                             r"0.001 megapixels \(config.max_megapixels\)"):
    serve.parse_request(small_limit, *_values(too_big))


def test_uploads_of_any_mode_are_edited(service, tmp_path):
  for mode in ("L", "RGBA", "P", "I;16", "CMYK"):
    path = tmp_path / f"photo_{mode.replace(';', '')}.{'jpg' if mode == 'CMYK' else 'png'}"
    _png(path, 64, 64, mode=mode)
    image, line = serve._handle(service, _values(path), _no_progress)
    assert line.startswith("Edited: 64x64"), (mode, line)


def test_a_non_finite_result_is_a_message(service, photo):
  params = jax.tree.map(lambda x: x * np.nan, service.editor.unet_params)
  broken = serve.EditService(dataclasses.replace(service.editor, unet_params=params), service.settings)
  traces = _total_traces()
  image, line = serve._handle(broken, _values(photo), _no_progress)
  assert image is None and "Error: The edit came out non-finite (NaN/inf pixels)" in line, line
  assert _total_traces() == traces


def test_an_unexpected_failure_is_a_message_too(service, photo, monkeypatch):
  def fail(*args, **kwargs):
    raise RuntimeError("device lost")
  monkeypatch.setattr(edit, "sample_arrays", fail)
  image, line = serve._handle(service, _values(photo), _no_progress)
  assert image is None and "Error: the edit failed (RuntimeError: device lost)" in line, line


def test_progress_is_reported_from_the_request_thread_while_steps_run():
  def slow_sampler():  # advances the sampler's progress bar as the jitted sampler's callback does
    for _ in range(5):
      time.sleep(0.15)
      sampling._PROGRESS_BAR[0].update(1)
    return "done"
  calls, threads = [], set()

  def report(done, total):
    calls.append((done, total))
    threads.add(threading.get_ident())

  assert serve._run_reporting(slow_sampler, 5, report) == "done"
  done = [d for d, _ in calls]
  assert len(calls) >= 4 and done == sorted(done) and 0 < done[-1] <= 5, calls
  assert {t for _, t in calls} == {5} and threads == {threading.get_ident()}
  assert sampling._PROGRESS_BAR[0] is None


def test_a_compiling_edit_reports_progress(service, photo):
  calls = []
  request = serve.parse_request(service.settings, *_values(photo, steps=6))
  assert service.compiles(request)
  service.edit(request, lambda done, total: calls.append((done, total)))
  assert calls and all(total == 6 and 0 <= done <= 6 for done, total in calls), calls
  assert not service.compiles(request)


def test_the_examples_come_from_the_synthetic_test_split(tmp_path):
  rows = serve.write_examples(tmp_path, 7, seed=0)
  assert len(rows) == 7
  categories = []
  for index, (path, instruction) in enumerate(rows):
    example = synthetic.make_example(index, "test", seed=0, size=serve.EXAMPLE_SIZE)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), example["original"])
    assert instruction == example["instruction"]
    categories.append(example["category"])
  assert sorted(categories) == sorted(records.CATEGORIES)


# ----------------------------------------------------------------------------- the page, in Chromium


def _missing(what):
  """A browser-test requirement is missing: CI fails (it must install it), elsewhere the test skips."""
  if os.environ.get("CI") == "true":
    pytest.fail(f"{what} is missing; .ci/run installs it")
  pytest.skip(f"{what} is missing")


@pytest.fixture(scope="module")
def browser():
  try:
    import gradio  # noqa: F401
    from playwright.sync_api import sync_playwright
  except ImportError as e:
    _missing(f"the [app] extra ({e.name}): pip install -e '.[app]'")
  if not Path(serve_screenshot.CHROMIUM).exists():
    _missing(f"{serve_screenshot.CHROMIUM} (apt-get install chromium)")
  with sync_playwright() as playwright:
    browser = serve_screenshot.launch_chromium(playwright)
    yield browser
    browser.close()


@pytest.fixture(scope="module")
def url(browser, tiny_folder):
  del browser  # the server is started only where the browser can run
  overrides = [f"--config.resolution={RES}", "--config.steps=2", "--config.examples=3"]
  with serve_screenshot.running_server(tiny_folder, overrides) as url:
    yield url


def test_page_edits_reacts_to_a_slider_and_reports_bad_input(browser, url, tmp_path):
  page = serve_screenshot.open_page(browser, url)
  serve_screenshot.upload(page, _png(tmp_path / "photo.png", 80, 48))
  serve_screenshot.set_instruction(page, "make it blue")
  line = serve_screenshot.click_edit(page)
  assert line.startswith("Edited: 107x64 px") and "scores 5, 5, 5" in line, line
  first = serve_screenshot.result_info(page)
  assert (first["width"], first["height"]) == edit.output_size((80, 48), RES) == (107, 64)

  serve_screenshot.set_number(page, "following", 2)
  line = serve_screenshot.click_edit(page)
  assert line.startswith("Edited") and "scores 2, 5, 5" in line, line
  second = serve_screenshot.result_info(page)
  assert second["src"] != first["src"] and (second["width"], second["height"]) == (107, 64)

  page.locator("#random_seed").click()
  page.wait_for_function("() => document.querySelector('#seed input').value !== '0'", timeout=30_000)
  seed = int(page.locator("#seed input").input_value())
  assert 0 < seed < 2 ** 32
  line = serve_screenshot.click_edit(page)
  assert line.startswith("Edited") and f"(seed {seed}, scores 2, 5, 5" in line, line

  serve_screenshot.set_instruction(page, "")
  line = serve_screenshot.click_edit(page)
  assert line.startswith("Error: The instruction is empty"), line
  assert page.locator("#status .mre-error").is_visible()
  assert serve_screenshot.result_info(page) is None

  (tmp_path / "notes.png").write_text("not an image")
  serve_screenshot.upload(page, tmp_path / "notes.png")
  serve_screenshot.set_instruction(page, "make it red")
  line = serve_screenshot.click_edit(page)
  assert line.startswith("Error: notes.png is not an image"), line

  # Still serving: an example from the gallery, in one click, with a new step count (compiles,
  # and the page shows the progress meanwhile).
  serve_screenshot.set_number(page, "steps", 12)
  before = page.locator(serve_screenshot.STATUS).inner_html()
  page.locator("#examples table tbody tr").first.click()
  page.wait_for_function("() => document.body.innerText.includes('compiling for this size')", timeout=60_000)
  line = serve_screenshot.wait_for_status_change(page, before)
  assert line.startswith("Edited: 64x64 px"), line
  assert page.locator("#instruction textarea").input_value() == synthetic.make_example(0, "test")["instruction"]
  page.context.close()


def test_visitors_at_once_all_get_their_image(browser, url, tmp_path):
  pages, sizes = [], [(80, 48), (48, 80), (64, 64)]
  for i, (w, h) in enumerate(sizes):
    page = serve_screenshot.open_page(browser, url)
    serve_screenshot.upload(page, _png(tmp_path / f"visitor{i}.png", w, h, seed=i))
    serve_screenshot.set_instruction(page, f"make it {('red', 'green', 'blue')[i]}")
    pages.append(page)
  before = [page.locator(serve_screenshot.STATUS).inner_html() for page in pages]
  for page in pages:
    page.locator("#edit_button").click()
  for page, old, (w, h) in zip(pages, before, sizes):
    line = serve_screenshot.wait_for_status_change(page, old, timeout=60)
    info = serve_screenshot.result_info(page)
    assert line.startswith("Edited") and (info["width"], info["height"]) == edit.output_size((w, h), RES), line
  for page in pages:
    page.context.close()


def test_screenshot_of_the_page_after_an_edit(browser, url, tmp_path):
  out = tmp_path / "docs" / "app.png"
  line = serve_screenshot.screenshot(url, out, example=1, browser=browser)
  assert line.startswith("Edited: 64x64 px"), line
  with Image.open(out) as shot:
    assert shot.format == "PNG" and shot.width == serve_screenshot.VIEWPORT["width"] and shot.height >= 800
  print(f"screenshot: {out}")
