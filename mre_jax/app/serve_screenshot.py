"""Starts the serve job, makes one edit in headless Chromium and saves a screenshot of the page.

```
python -m mre_jax.app.serve_screenshot --checkpoint DIR --out docs/app.png [--resolution 64] [--example 0]
python -m mre_jax.app.serve_screenshot --checkpoint DIR --out app.png --image in.jpg --instruction "make it winter"
```

Needs the `[app]` extra (Gradio, Playwright) and Debian's Chromium (`apt-get install chromium`):
Playwright drives the system browser through its executable path; it downloads none of its own.
The functions here (`running_server`, `launch_chromium`, `upload`, `click_edit`, ...) are also
what tests/test_serve.py drives the page with.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

from mre_jax.app.serve import URL_LINE
from mre_jax.io import files

if TYPE_CHECKING:
  from playwright.sync_api import Browser, Page, Playwright

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
MAIN = Path(__file__).resolve().parents[2] / "main.py"
VIEWPORT = {"width": 1280, "height": 900}


# ----------------------------------------------------------------------------- the server


@contextlib.contextmanager
def running_server(checkpoint: str | os.PathLike, overrides: Sequence[str] = (), *,
                   timeout: float = 300.0) -> Iterator[str]:
  """Runs `main.py --config=configs/serve.py` on a free port (port 0) in a child process.

  Yields the URL it prints once it listens; on exit sends SIGINT (SIGKILL after 15 s).
  overrides: extra flags such as "--config.resolution=64".
  """
  command = [sys.executable, str(MAIN), "--config=" + str(MAIN.parent / "configs" / "serve.py"),
             f"--config.checkpoint={checkpoint}", "--config.port=0", *overrides]
  process = subprocess.Popen(command, cwd=MAIN.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             bufsize=1)
  lines: list[str] = []
  found = threading.Event()

  def read():  # drains the pipe for the server's whole life (a full pipe would block it)
    for line in process.stdout:
      lines.append(line)
      if line.startswith(URL_LINE):
        found.set()

  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  try:
    deadline = time.monotonic() + timeout
    while not found.wait(0.2):
      if process.poll() is not None or time.monotonic() > deadline:
        reason = f"exited with code {process.returncode}" if process.poll() is not None else f"not up in {timeout:.0f} s"
        raise RuntimeError(f"the serve job {reason}; its output:\n{''.join(lines)[-4000:]}")
    url = re.search(r"http://\S+/", next(l for l in lines if l.startswith(URL_LINE))).group(0)
    yield url
  finally:
    if process.poll() is None:
      process.send_signal(signal.SIGINT)
      try:
        process.wait(15)
      except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    reader.join(5)


# ----------------------------------------------------------------------------- the browser


def launch_chromium(playwright: Playwright) -> Browser:
  """Debian's Chromium, headless, through Playwright (`playwright.sync_api.sync_playwright()`)."""
  if not Path(CHROMIUM).exists():
    raise FileNotFoundError(f"{CHROMIUM}: missing; install Debian's chromium (apt-get install chromium)")
  return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def open_page(browser: Browser, url: str) -> Page:
  """A new page (own context: own Gradio session) showing the editor; requests off this
  machine are aborted (the page needs none)."""
  context = browser.new_context(viewport=VIEWPORT)
  local = re.compile(r"^(https?|wss?)://(127\.0\.0\.1|localhost|\[::1\])[:/]")
  context.route("**/*", lambda route: route.continue_() if local.match(route.request.url) or
                route.request.url.startswith(("data:", "blob:")) else route.abort())
  page = context.new_page()
  page.goto(url)
  page.wait_for_selector("#edit_button", timeout=60_000)
  return page


def upload(page: Page, path: str | os.PathLike) -> None:
  """Uploads a file into the input image and waits until the page shows it (by its file name)."""
  page.locator("#input_image input[type=file]").set_input_files(str(path))
  page.wait_for_function("""name => { const i = document.querySelector('#input_image img');
      return i && decodeURIComponent(i.src).endsWith('/' + name); }""", arg=Path(path).name, timeout=30_000)


def set_instruction(page: Page, text: str) -> None:
  page.locator("#instruction textarea").fill(text)


def set_number(page: Page, elem_id: str, value: float) -> None:
  """Sets a slider (or number box) by typing into its number input."""
  box = page.locator(f"#{elem_id} input[type=number]")
  box.fill(str(value))
  box.press("Enter")


STATUS = "#status [data-testid=markdown]"  # the status line's text (not Gradio's progress overlay)


def status(page: Page) -> str:
  return page.locator(STATUS).inner_text().strip()


def result_info(page: Page) -> dict | None:
  """{"src", "width", "height"} of the loaded result image, or None."""
  return page.evaluate("""() => { const i = document.querySelector('#result img');
      return i && i.complete && i.naturalWidth ? {src: i.src, width: i.naturalWidth, height: i.naturalHeight}
                                               : null; }""")


def click_edit(page: Page, *, timeout: float = 120.0) -> str:
  """Clicks Edit and waits until the edit is over; returns the status line ("Edited: ..." or
  "Error: ..."). A result image, if any, is loaded when this returns."""
  before = page.locator(STATUS).inner_html()
  page.locator("#edit_button").click()
  return wait_for_status_change(page, before, timeout)


def wait_for_status_change(page: Page, before_html: str, timeout: float = 120.0) -> str:
  """Waits until the status line differs from `before_html` (the edit is over)."""
  # Every status line names its request number, so even a repeated message is a change.
  page.wait_for_function(
      """([selector, before]) => { const s = document.querySelector(selector);
          return s && s.innerHTML !== before && s.innerText.trim() !== ''; }""",
      arg=[STATUS, before_html], timeout=timeout * 1000)
  text = status(page)
  if text.startswith("Edited"):
    page.wait_for_function("() => { const i = document.querySelector('#result img'); "
                           "return i && i.complete && i.naturalWidth > 0; }", timeout=timeout * 1000)
  return text


# ----------------------------------------------------------------------------- the screenshot


def screenshot(url: str, out: str | os.PathLike, *, image: str | None = None, instruction: str | None = None,
               example: int = 0, browser: Browser | None = None) -> str:
  """Opens the page, makes one edit (an uploaded image, or gallery example `example`) and saves a
  full-page PNG at `out`; returns the page's status line. browser: a running one (`launch_chromium`),
  else Chromium is started and closed here."""
  if browser is None:
    from playwright.sync_api import sync_playwright  # the [app] extra
    with sync_playwright() as playwright:
      browser = launch_chromium(playwright)
      try:
        return screenshot(url, out, image=image, instruction=instruction, example=example, browser=browser)
      finally:
        browser.close()
  out = Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  page = open_page(browser, url)
  try:
    if image:
      upload(page, image)
      set_instruction(page, instruction or "")
      line = click_edit(page)
    else:
      before = page.locator(STATUS).inner_html()
      rows = page.locator("#examples table tbody tr")
      if not 0 <= example < rows.count():
        raise ValueError(f"--example={example}: the page shows {rows.count()} examples")
      rows.nth(example).click()  # fills the inputs and runs the edit
      line = wait_for_status_change(page, before)
    if not line.startswith("Edited"):
      raise RuntimeError(f"the edit failed on the page: {line}")
    page.mouse.move(0, 0)  # no hover highlight in the picture
    files.write_atomic(out, page.screenshot(full_page=True, type="png"))
    return line
  finally:
    page.context.close()


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--checkpoint", required=True, help="project checkpoint, training workdir or diffusers folder")
  parser.add_argument("--out", required=True, help="PNG file to write")
  parser.add_argument("--resolution", type=int, default=64, help="working resolution (the demo model: 64)")
  parser.add_argument("--steps", type=int, default=30, help="denoising steps")
  parser.add_argument("--example", type=int, default=0, help="gallery example to edit (without --image)")
  parser.add_argument("--image", help="edit this image instead of an example")
  parser.add_argument("--instruction", help="the instruction for --image")
  parser.add_argument("--config", action="append", default=[], metavar="FIELD=VALUE",
                      help="further configs/serve.py fields, e.g. --config seed=3 (repeatable)")
  args = parser.parse_args(argv)
  if args.image and not args.instruction:
    parser.error("--image needs --instruction")
  overrides = [f"--config.resolution={args.resolution}", f"--config.steps={args.steps}",
               *(f"--config.{kv}" for kv in args.config)]
  with running_server(args.checkpoint, overrides) as url:
    line = screenshot(url, args.out, image=args.image, instruction=args.instruction, example=args.example)
  print(f"wrote {args.out} ({line})")


if __name__ == "__main__":
  main()
