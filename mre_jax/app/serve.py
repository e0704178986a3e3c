"""The web editing page: a Gradio page that edits uploaded images with one loaded model.

The `serve` job (mre_jax/jobs/serve.py) loads the model once (`edit.load_editor`) and, with
`config.warmup`, compiles its sampler once for the default steps and scheduler at the square
working size before the server listens. Everything a visitor moves on the page (reward sliders,
reward text, guidance, seed) is a traced value of that program; a new steps count, scheduler or
working size (another aspect ratio) compiles once more and is then cached. Edits go through
Gradio's queue one at a time (one edit holds the devices), so concurrent visitors wait their
turn and each gets their image; the page shows the queue position and, while an edit runs, its
denoising steps.

A visitor's bad input (no image, not an image, an image over `config.max_megapixels`, an empty
instruction, values out of range, a non-finite result) becomes a message on the page, never
a server error. The page is built in `make_app`; `EditService` is the part without Gradio.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import math
import random
import time
import warnings
import os
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from absl import logging
from PIL import Image, UnidentifiedImageError

from mre_jax.data import synthetic
from mre_jax.infer import edit, sampling
from mre_jax.infer.sizes import output_size, working_size

if TYPE_CHECKING:
  import gradio

MAX_SEED = 2 ** 32
TEXT_GUIDANCE_MAX = 20.0  # slider ranges; values sent through the API are checked against them
IMAGE_GUIDANCE_MAX = 5.0
EXAMPLE_SIZE = 64  # pixels: synthetic examples are rendered at the world's largest size
URL_LINE = "Serving the editor on "  # the line the serve job prints once the server listens (tests read it)


class InputError(ValueError):
  """A visitor's bad input or an unusable result (non-finite); its message is shown on the page."""


@dataclasses.dataclass(frozen=True)
class Settings:
  """Validated `configs/serve.py` fields (see there)."""

  host: str
  port: int
  queue_size: int
  max_upload_mb: int
  max_megapixels: float
  warmup: bool
  examples: int
  examples_seed: int
  resolution: int
  size_rule: str
  scheduler: str
  steps: int
  max_steps: int
  text_guidance: float
  image_guidance: float
  seed: int
  scores: tuple[float, float, float]
  reward_text: str


@dataclasses.dataclass(frozen=True)
class EditRequest:
  """One edit as the page asks for it, validated (`parse_request`)."""

  image: Image.Image
  instruction: str
  scores: tuple[float, float, float]
  reward_text: str
  text_guidance: float
  image_guidance: float
  steps: int
  scheduler: str
  seed: int


# ----------------------------------------------------------------------------- page inputs


def open_upload(path: str | os.PathLike, name: str, max_megapixels: float) -> Image.Image:
  """Decodes an uploaded file as the edit CLI does (`edit.read_image`), refusing what is not an
  image and, before decoding, images over `max_megapixels`. `name` is what the visitor called it."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      with Image.open(path) as probe:
        width, height = probe.size
  except UnidentifiedImageError:
    raise InputError(f"{name} is not an image (not a format PIL reads): upload a PNG, JPEG, WebP, ...") from None
  except Image.DecompressionBombError as e:
    raise InputError(f"{name} is too large ({e}); this server accepts up to {max_megapixels:g} megapixels "
                     "(config.max_megapixels)") from None
  except OSError as e:
    raise InputError(f"{name}: cannot read the upload ({e})") from None
  megapixels = width * height / 1e6
  if megapixels > max_megapixels:
    raise InputError(f"{name} is {width}x{height} ({megapixels:.1f} megapixels); this server accepts up to "
                     f"{max_megapixels:g} megapixels (config.max_megapixels): downscale it first")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      return edit.read_image(path, "image")
  except ValueError as e:
    reason = str(e.__cause__ or e)
    raise InputError(f"{name} is not a readable image ({reason})") from None


def _number(value: Any, what: str, low: float, high: float) -> float:
  try:
    number = float(value)
  except (TypeError, ValueError):
    raise InputError(f"{what} must be a number in [{low:g}, {high:g}], got {value!r}") from None
  if not (math.isfinite(number) and low <= number <= high):
    raise InputError(f"{what} must be a number in [{low:g}, {high:g}], got {value!r}")
  return number


def _integer(value: Any, what: str, low: int, high: int) -> int:
  number = _number(value, what, low, high)
  if number != int(number):
    raise InputError(f"{what} must be a whole number in [{low}, {high}], got {value!r}")
  return int(number)


def parse_request(settings: Settings, image: Any, instruction: Any, following: Any, preserving: Any, quality: Any,
                  reward_text: Any, text_guidance: Any, image_guidance: Any, steps: Any, scheduler: Any,
                  seed: Any) -> EditRequest:
  """The page's raw values -> an `EditRequest` (InputError naming the first bad one).

  `image` is Gradio's raw file payload ({"path", "orig_name", ...}), a path, or None.
  """
  if not isinstance(instruction, str) or not instruction.strip():
    raise InputError("The instruction is empty: type what to change, e.g. \"make the sky blue\".")
  if isinstance(image, dict):
    path, name = image.get("path"), image.get("orig_name") or "the upload"
  else:
    path, name = image, Path(image).name if image else ""
  if not path:
    raise InputError("No image: upload one (or click an example below).")
  scores = tuple(_number(v, f"The {what} score", 0.0, edit.MAX_SCORE)
                 for v, what in zip((following, preserving, quality), ("following", "preserving", "quality")))
  if not isinstance(reward_text, str):
    raise InputError(f"The reward text must be text, got {reward_text!r}")
  if scheduler not in sampling.SCHEDULERS:
    raise InputError(f"The scheduler must be one of {', '.join(sampling.SCHEDULERS)}, got {scheduler!r}")
  return EditRequest(
      image=open_upload(path, name, settings.max_megapixels), instruction=instruction.strip(), scores=scores,
      reward_text=reward_text, text_guidance=_number(text_guidance, "Text guidance", 0.0, TEXT_GUIDANCE_MAX),
      image_guidance=_number(image_guidance, "Image guidance", 0.0, IMAGE_GUIDANCE_MAX),
      steps=_integer(steps, "Steps", 1, settings.max_steps), scheduler=scheduler,
      seed=_integer(seed, "The seed", 0, MAX_SEED - 1))


# ----------------------------------------------------------------------------- the editing service


class _StepCounter:
  """What `sampling.set_progress_bar` advances: the steps done so far."""

  def __init__(self):
    self.n = 0

  def update(self, n: int = 1) -> None:
    self.n += n


class EditService:
  """One loaded editor and the page's settings; edits one request at a time (no Gradio here)."""

  def __init__(self, editor: edit.Editor, settings: Settings):
    self.editor = editor
    self.settings = settings
    self._compiled: set = set()  # (scheduler, steps, working size) programs traced in this process
    self.requests = itertools.count(1)  # numbers the page's requests

  def warm_up(self) -> float:
    """Compiles the default program (default steps and scheduler, square image); returns seconds."""
    start = time.perf_counter()
    s = self.settings
    blank = Image.new("RGB", (s.resolution, s.resolution), (128, 128, 128))
    self.edit(EditRequest(blank, "warm up", s.scores, s.reward_text, s.text_guidance, s.image_guidance, s.steps,
                          s.scheduler, s.seed))
    return time.perf_counter() - start

  def compiles(self, request: EditRequest) -> bool:
    """Whether this request needs a program not yet compiled by this service."""
    return self._key(request) not in self._compiled

  def _key(self, request: EditRequest) -> tuple:
    return (request.scheduler, request.steps, working_size(request.image.size, self.settings.resolution,
                                                           self.settings.size_rule))

  def edit(self, request: EditRequest, report: Callable[[int, int], None] | None = None) -> Image.Image:
    """Edits one image; `report(steps_done, steps)` is called about 10 times a second meanwhile.

    Returns the result (RGB, the input's aspect ratio at the working scale, `sizes.output_size`).
    Raises InputError for a non-finite result.
    """
    s = self.settings
    pixels = edit.prepare_image(request.image, s.resolution, s.size_rule)[None]

    def run():
      return edit.sample_arrays(
          self.editor, pixels, [request.instruction], seeds=[request.seed], scores=[request.scores],
          reward_texts=[request.reward_text], steps=request.steps, scheduler=request.scheduler,
          text_guidance=request.text_guidance, image_guidance=request.image_guidance)

    images, finite = _run_reporting(run, request.steps, report)
    self._compiled.add(self._key(request))
    if not finite[0]:
      raise InputError("The edit came out non-finite (NaN/inf pixels): the model cannot make this edit with these "
                       "settings; try other guidance values or steps" +
                       (", or config.dtype=float32" if np.dtype(self.editor.unet.dtype) != np.float32 else "") + ".")
    return edit.to_image(images[0], output_size(request.image.size, s.resolution, s.size_rule))


def _run_reporting(fn: Callable, steps: int, report: Callable[[int, int], None] | None) -> Any:
  """fn() in a worker thread while this thread calls report(steps_done, steps) every 0.1 s.

  The sampler's step callbacks arrive on a JAX runtime thread; Gradio's progress tracker must be
  called from the request's own thread (it reads the event from a context variable).
  """
  counter = _StepCounter()
  sampling.set_progress_bar(counter)
  try:
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mre-edit") as pool:
      future = pool.submit(fn)
      while True:
        try:
          return future.result(timeout=0.1)
        except concurrent.futures.TimeoutError:
          if report is not None:
            report(min(counter.n, steps), steps)
  finally:
    sampling.set_progress_bar(None)


# ----------------------------------------------------------------------------- examples


def write_examples(folder: Path, count: int, seed: int) -> list[list[str]]:
  """`count` synthetic test-split examples as PNGs in `folder`: [[image path, instruction], ...]
  (one category after another, `records.CATEGORIES` order)."""
  rows = []
  for index in range(count):
    example = synthetic.make_example(index, "test", seed=seed, size=EXAMPLE_SIZE)
    path = folder / f"example_{index:02d}_{example['category'].lower()}.png"
    Image.fromarray(example["original"]).save(path)
    rows.append([str(path), example["instruction"]])
  return rows


# ----------------------------------------------------------------------------- the page


def load_gradio() -> ModuleType:
  """The gradio module (the optional [app] extra, imported only for the page); OSError naming the extra if absent."""
  try:
    import gradio
  except ImportError:
    raise OSError("the serve job needs Gradio: pip install -e \".[app]\"") from None
  return gradio


# Small images (the 64 px demo) are shown scaled up to the panel; the error line stands out.
CSS = ("#input_image img, #result img {width: 100%; height: 100%; object-fit: contain} "
       ".mre-error {color: #b42318; font-weight: 600}")


def make_app(service: EditService, examples: list[list[str]]) -> gradio.Blocks:
  """The page (a `gr.Blocks`, queued: one edit at a time, `settings.queue_size` waiting)."""
  gr = load_gradio()
  s = service.settings
  with gr.Blocks(title="MRE image editor", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
    gr.Markdown(f"## Instruction-based image editing with reward conditions\nModel: `{service.editor.source}`; "
                f"edits run at resolution {s.resolution} ({s.size_rule} size rule). Upload an image, say what to "
                "change, and ask for the rewards you want (5, 5, 5 and \"None; None; None\": the best).")
    with gr.Row():
      with gr.Column():
        image = gr.Image(label="Input image", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                         elem_id="input_image", height=300)
        instruction = gr.Textbox(label="Instruction", placeholder="make the sky blue", elem_id="instruction",
                                 max_lines=2)
        button = gr.Button("Edit", variant="primary", elem_id="edit_button")
        examples_box = gr.Column()
      with gr.Column():
        result = gr.Image(label="Result", type="pil", format="png", interactive=False, buttons=["download"],
                          elem_id="result", height=300)
        status = gr.Markdown("", elem_id="status")
        rewards = _reward_controls(gr, s)
        sampler, randomize = _sampler_controls(gr, s)
    _connect(gr, service, [image, instruction, *rewards, *sampler], [result, status], button, randomize,
             (examples, examples_box))
  demo.queue(max_size=s.queue_size, default_concurrency_limit=1)
  return demo


def _reward_controls(gr: ModuleType, s: Settings) -> list:
  """The reward condition's inputs: [following, preserving, quality sliders, reward text]."""
  with gr.Accordion("Reward condition", open=True):
    with gr.Row():
      following = gr.Slider(0, edit.MAX_SCORE, s.scores[0], step=0.1, label="Instruction following",
                            elem_id="following")
      preserving = gr.Slider(0, edit.MAX_SCORE, s.scores[1], step=0.1, label="Detail preserving",
                             elem_id="preserving")
      quality = gr.Slider(0, edit.MAX_SCORE, s.scores[2], step=0.1, label="Generation quality",
                          elem_id="quality")
    reward_text = gr.Textbox(s.reward_text, label="Reward text (following; preserving; quality failures)",
                             elem_id="reward_text", max_lines=2)
  return [following, preserving, quality, reward_text]


def _sampler_controls(gr: ModuleType, s: Settings) -> tuple[list, Any]:
  """([text guidance, image guidance, steps, scheduler, seed], the random-seed button)."""
  with gr.Accordion("Sampler", open=True):
    with gr.Row():
      text_guidance = gr.Slider(0, TEXT_GUIDANCE_MAX, s.text_guidance, step=0.1, label="Text guidance",
                                elem_id="text_guidance")
      image_guidance = gr.Slider(0, IMAGE_GUIDANCE_MAX, s.image_guidance, step=0.05, label="Image guidance",
                                 elem_id="image_guidance")
    with gr.Row():
      steps = gr.Slider(1, s.max_steps, s.steps, step=1, label="Steps (a new value compiles once)",
                        elem_id="steps")
      scheduler = gr.Dropdown(list(sampling.SCHEDULERS), value=s.scheduler, label="Scheduler",
                              elem_id="scheduler")
    with gr.Row(equal_height=True):
      seed = gr.Number(s.seed, label="Seed", precision=0, minimum=0, maximum=MAX_SEED - 1, elem_id="seed")
      randomize = gr.Button("Random seed", elem_id="random_seed", scale=0)
  return [text_guidance, image_guidance, steps, scheduler, seed], randomize


def _connect(gr: ModuleType, service: EditService, inputs: list, outputs: list, button: Any, randomize: Any,
             examples: tuple[list[list[str]], Any]) -> None:
  """The page's events (inside its Blocks): edit on the button, Enter or an example; a random seed.

  inputs: [image, instruction, the reward controls, the sampler controls (seed last)], in
  `parse_request`'s order; examples: (rows, the column they are shown in).
  """
  image, instruction, seed = inputs[0], inputs[1], inputs[-1]

  def edit_fn(*values, progress=gr.Progress()):
    return _handle(service, values, progress)

  # Raw values (preprocess=False): the upload is opened by `open_upload`, so a file that is not
  # an image gets the page's message rather than an error inside Gradio's image decoding.
  run = dict(fn=edit_fn, inputs=inputs, outputs=outputs, preprocess=False, concurrency_limit=1,
             concurrency_id="model")
  button.click(api_name="edit", **run)
  instruction.submit(api_visibility="undocumented", **run)
  randomize.click(lambda: random.randrange(MAX_SEED), outputs=seed, queue=False, api_visibility="private")
  rows, box = examples
  if rows:
    with box:
      gallery = gr.Examples(rows, [image, instruction], label="Examples from the synthetic world: click one "
                            "to edit it", elem_id="examples", examples_per_page=len(rows))
    gallery.load_input_event.then(api_visibility="private", **run)


def _handle(service: EditService, values: tuple, progress: Callable) -> tuple[Any, str]:
  """Gradio's edit event: (result image or None, status markdown). Never raises.

  The status names the request's number, so that two equal messages in a row still differ.
  """
  number = next(service.requests)
  start = time.perf_counter()
  try:
    request = parse_request(service.settings, *values)
    compiling = service.compiles(request)

    def report(done, total):
      desc = "compiling for this size, steps and scheduler (once)" if compiling and not done else "denoising"
      progress((done, total), desc=desc, unit="steps")

    image = service.edit(request, report)
  except InputError as e:
    return None, f"<span class='mre-error'>Error: {e}</span> (request {number})"
  except Exception as e:  # the page must keep working: report it, log the traceback
    logging.exception("edit failed")
    return None, f"<span class='mre-error'>Error: the edit failed ({type(e).__name__}: {e}).</span> (request {number})"
  seconds = time.perf_counter() - start
  return image, (f"Edited: {image.size[0]}x{image.size[1]} px in {seconds:.2f} s (seed {request.seed}, "
                 f"scores {', '.join(f'{v:g}' for v in request.scores)}; request {number}).")
