"""A procedural edit world: scenes, instructions, exact edits, corrupted edits, a judge.

Pure numpy (no TensorFlow, no JAX): the TFDS builder in data/synthetic_edit/ writes what
`make_example` returns, and evaluation code reuses `judge` to score an edit exactly
against its ground truth from the three perspectives of the paper (instruction following,
detail preserving, generation quality).

Images are uint8 [S, S, 3] at the API; the maths runs on float64 in [0, 1].
A scene is a plain dict:
  {"background": {"kind": "plain"|"vertical"|"horizontal", "colours": [name, name]},
   "objects": [{"shape", "colour", "texture", "cx", "cy", "r"}, ...]}
with positions and radii in units of the image side.
"""

from __future__ import annotations

import zlib
from typing import Any, Sequence

import numpy as np

from mre_jax.data import records

SPLITS = ("train", "test")
COLOURS = {
    "red": (0.86, 0.16, 0.16), "green": (0.16, 0.67, 0.24), "blue": (0.16, 0.27, 0.86),
    "yellow": (0.92, 0.82, 0.16), "purple": (0.55, 0.24, 0.71),
    "orange": (0.94, 0.55, 0.12), "white": (0.96, 0.96, 0.96), "black": (0.1, 0.1, 0.1),
    "pink": (0.96, 0.6, 0.75), "cyan": (0.2, 0.8, 0.85), "grey": (0.5, 0.5, 0.5),
}
SHAPES = ("square", "circle", "triangle")
TEXTURES = ("plain", "striped", "dotted", "checkered")
TONES = ("darker", "brighter", "warmer", "cooler", "black and white")
STYLES = ("a pencil sketch", "a pop-art poster", "a photo negative")
BLOCK = 8  # pixels: the judge's cell and the codec block of the blocking artifact.
MIN_SIZE, MAX_SIZE = 32, 64
Scene = dict[str, Any]  # {"background": {...}, "objects": [object, ...]} (module docstring)
Object = dict[str, Any]  # {"shape", "colour", "texture", "cx", "cy", "r"}

# Judge calibration (units: intensities in [0, 1]).
FOLLOW_FULL = 0.9      # share of the way to the truth that counts as fully applied
FOLLOW_NONE = 0.1      # share of the way to the truth that still counts as not applied
FOLLOW_SMOOTH = 0.5    # std (pixels) of the Gaussian applied before measuring following
EDIT_TOL = 2 / 255     # colour change of a pixel that the edit counts as changed
QUALITY_AREA = 0.25    # share of the image that must be measurable for full quality credit
CELL_TOL = 0.1         # RMS colour change of an 8x8 cell that still counts as unchanged
CHANGED_ZERO = 0.25    # share of cells changed that scores 0 for detail preserving
NOISE_ZERO = 0.15      # noise std that scores 0 for quality
BLUR_ZERO = 1.0        # loss of edge contrast (1 - ratio) that scores 0 for quality
BLOCK_ZERO = 0.15      # excess edge contrast on block borders that scores 0 for quality
DEAD_ZONE = 0.04       # penalties below this are measurement noise (uint8 rounding)


# ----------------------------------------------------------------------------- scenes

def _colour_distance(a, b):
  """RMS distance in [0, 1] between two named colours."""
  return float(np.sqrt(np.mean((np.array(COLOURS[a]) - np.array(COLOURS[b])) ** 2)))


def _where(cx, cy):
  """Position words ("top left", "centre", ...) for unit coordinates."""
  row = ("top", "", "bottom")[min(2, int(cy * 3))]
  col = ("left", "", "right")[min(2, int(cx * 3))]
  return " ".join(w for w in (row, col) if w) or "centre"


def _overlaps(obj, objects):
  return any(np.hypot(obj["cx"] - o["cx"], obj["cy"] - o["cy"]) < (obj["r"] + o["r"]) * 1.5
             for o in objects)


def _sample_object(rng, objects, colours_taken):
  """A new object that does not overlap `objects`; None if there is no room."""
  free = [c for c in COLOURS if c not in colours_taken]
  for _ in range(50):
    r = float(rng.uniform(0.11, 0.18))
    obj = {"shape": str(rng.choice(SHAPES)), "colour": str(rng.choice(free)),
           "texture": str(rng.choice(TEXTURES, p=[0.55, 0.15, 0.15, 0.15])),
           "cx": float(rng.uniform(r + 0.02, 0.98 - r)), "cy": float(rng.uniform(r + 0.02, 0.98 - r)),
           "r": r}
    if not _overlaps(obj, objects):
      return obj
  return None


def _sample_background(rng, avoid=()):
  kind = str(rng.choice(["plain", "plain", "vertical", "horizontal"]))
  names = [c for c in COLOURS if c not in avoid]
  first = str(rng.choice(names))
  second = str(rng.choice([c for c in names if _colour_distance(c, first) > 0.25]))
  return {"kind": kind, "colours": [first, second if kind != "plain" else first]}


def sample_scene(rng: np.random.Generator) -> Scene:
  """A random scene: a background and 1 to 3 non-overlapping objects of distinct colours."""
  background = _sample_background(rng)
  objects = []
  for _ in range(int(rng.integers(1, 4))):
    taken = {o["colour"] for o in objects} | set(background["colours"])
    obj = _sample_object(rng, objects, taken)
    if obj is not None:
      objects.append(obj)
  return {"background": background, "objects": objects}


def scene_key(scene: Scene) -> str:
  """A canonical, coarse description of a scene: equal keys = the same scene."""
  bg = scene["background"]
  objs = sorted((o["shape"], o["colour"], o["texture"], round(o["cx"] * 8), round(o["cy"] * 8),
                 round(o["r"] * 16)) for o in scene["objects"])
  return repr((bg["kind"], tuple(bg["colours"]), tuple(objs)))


def scene_split(scene: Scene) -> str:
  """"test" for a fixed fifth of all scene keys, "train" for the rest (disjoint by construction)."""
  return "test" if zlib.crc32(scene_key(scene).encode()) % 5 == 0 else "train"


# -------------------------------------------------------------------------- rendering

def _grid(size):
  """Pixel-centre coordinates in units of the side: (y, x), each [S, S]."""
  c = (np.arange(size) + 0.5) / size
  return np.meshgrid(c, c, indexing="ij")


def object_mask(obj: Object, size: int) -> np.ndarray:
  """bool [S, S]: the pixels covered by `obj`."""
  y, x = _grid(size)
  dx, dy = x - obj["cx"], y - obj["cy"]
  r = obj["r"]
  if obj["shape"] == "square":
    return (np.abs(dx) < r) & (np.abs(dy) < r)
  if obj["shape"] == "circle":
    return dx ** 2 + dy ** 2 < r ** 2
  # Triangle pointing up: the half-width grows from 0 at the apex to r at the base.
  return (np.abs(dy) < r) & (np.abs(dx) < (dy + r) / 2)


def _texture_pattern(texture, size):
  """bool [S, S]: the darker pixels of a texture (all False for "plain")."""
  period = max(3, size // 12)
  iy, ix = np.mgrid[0:size, 0:size]
  if texture == "striped":
    return ((ix + iy) // period) % 2 == 1
  if texture == "checkered":
    return ((ix // period) + (iy // period)) % 2 == 1
  if texture == "dotted":
    return ((ix % (2 * period)) < period - 1) & ((iy % (2 * period)) < period - 1)
  return np.zeros((size, size), bool)


def _render_background(background, size):
  y, x = _grid(size)
  first, second = (np.array(COLOURS[c]) for c in background["colours"])
  w = {"plain": np.zeros_like(x), "vertical": y, "horizontal": x}[background["kind"]]
  return first * (1 - w[..., None]) + second * w[..., None]


def render_float(scene: Scene, size: int) -> np.ndarray:
  """float [S, S, 3] in [0, 1]: the scene drawn at side `size`."""
  img = _render_background(scene["background"], size)
  for obj in scene["objects"]:
    colour = np.array(COLOURS[obj["colour"]])
    layer = np.where(_texture_pattern(obj["texture"], size)[..., None], colour * 0.45, colour)
    img = np.where(object_mask(obj, size)[..., None], layer, img)
  return img


def to_uint8(img: np.ndarray) -> np.ndarray:
  return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def to_float(img: np.ndarray) -> np.ndarray:
  return np.asarray(img, np.float64) / 255.0


# ------------------------------------------------------------------ global operations

def _luminance(img):
  return img @ np.array([0.299, 0.587, 0.114])


def apply_tone(img: np.ndarray, tone: str) -> np.ndarray:
  """float [S, S, 3] -> same: a global tone change."""
  if tone == "darker":
    return img * 0.55
  if tone == "brighter":
    return 1 - (1 - img) * 0.5
  if tone in ("warmer", "cooler"):
    sign = 1.0 if tone == "warmer" else -1.0
    return np.clip(img + sign * np.array([0.18, 0.04, -0.18]), 0, 1)
  grey = _luminance(img)[..., None]
  return np.repeat(grey, 3, axis=-1)


def apply_style(img: np.ndarray, style: str) -> np.ndarray:
  """float [S, S, 3] -> same: a global style change."""
  if style == "a pencil sketch":
    grey = _luminance(img)
    gy, gx = np.gradient(grey)
    return np.repeat((1 - np.clip(np.hypot(gx, gy) * 4, 0, 0.85))[..., None], 3, axis=-1)
  if style == "a pop-art poster":
    return np.where(img > 0.5, 0.95, 0.1)
  return 1 - img


# ------------------------------------------------------------------------------ edits

def _describe(obj):
  return f"{obj['colour']} {obj['shape']}"


def _a(words):
  """The indefinite article and `words`: "an orange square"."""
  return ("an " if words[0] in "aeiou" else "a ") + words


def _bg_words(background):
  first, second = background["colours"]
  return first if background["kind"] == "plain" else f"{first} and {second}"


def _edit_local(rng, scene):
  obj = dict(scene["objects"][int(rng.integers(len(scene["objects"])))])
  taken = {o["colour"] for o in scene["objects"]} | set(scene["background"]["colours"])
  new = str(rng.choice([c for c in COLOURS if c not in taken and _colour_distance(c, obj["colour"]) > 0.3]))
  d, s = _describe(obj), obj["shape"]
  texts = [f"make the {d} {new}", f"change the colour of the {d} to {new}",
           f"turn the {d} {new}", f"paint the {s} {new}"]
  failures = (f"the {s} is still {obj['colour']}", f"the {s} is only partly {new}")
  truth = _replace_object(scene, obj, {**obj, "colour": new})
  return truth, texts, failures, obj


def _replace_object(scene, old, new):
  objects = [new if o == old else o for o in scene["objects"]]
  return {**scene, "objects": [o for o in objects if o is not None]}


def _edit_remove(rng, scene):
  obj = scene["objects"][int(rng.integers(len(scene["objects"])))]
  d = _describe(obj)
  texts = [f"remove the {d}", f"delete the {d}", f"take away the {d}", f"get rid of the {d}"]
  failures = (f"the {d} is still there", f"the {d} is only partly removed")
  return _replace_object(scene, obj, None), texts, failures, obj


def _edit_add(rng, scene):
  taken = {o["colour"] for o in scene["objects"]} | set(scene["background"]["colours"])
  obj = _sample_object(rng, scene["objects"], taken)
  if obj is None:
    return None
  obj = {**obj, "texture": "plain"}
  d, where = _describe(obj), _where(obj["cx"], obj["cy"])
  texts = [f"add {_a(d)} at the {where}", f"put {_a(d)} at the {where}",
           f"place {_a(d)} at the {where} of the picture"]
  failures = (f"there is no {d}", f"the {d} is barely visible")
  return {**scene, "objects": scene["objects"] + [obj]}, texts, failures, obj


def _edit_texture(rng, scene):
  obj = scene["objects"][int(rng.integers(len(scene["objects"])))]
  new = str(rng.choice([t for t in TEXTURES if t != obj["texture"]]))
  d, s = _describe(obj), obj["shape"]
  if new == "plain":
    texts = [f"make the {d} plain", f"remove the pattern from the {d}"]
  else:
    texts = [f"make the {d} {new}", f"give the {d} {_a(new)} pattern", f"make the {s} look {new}"]
  failures = (f"the {s} is not {new}", f"the {s} is only faintly {new}")
  return _replace_object(scene, obj, {**obj, "texture": new}), texts, failures, obj


def _edit_background(rng, scene):
  old = scene["background"]
  avoid = {o["colour"] for o in scene["objects"]} | set(old["colours"])
  new = _sample_background(rng, avoid=avoid)
  words = _bg_words(new)
  if new["kind"] != "plain":
    words = _a(f"{new['colours'][0]} to {new['colours'][1]} gradient")
  texts = [f"change the background to {words}", f"make the background {words}",
           f"replace the background with {words}"]
  failures = (f"the background is still {_bg_words(old)}", "the background is only partly changed")
  return {**scene, "background": new}, texts, failures, None


def _edit_global(rng, scene):
  tone = str(rng.choice(TONES))
  texts = [f"make it {tone}", f"make the image {tone}", f"make the whole picture {tone}"]
  failures = (f"the image is not {tone}", f"the image is only slightly {tone}")
  return ("tone", tone), texts, failures, None


def _edit_style(rng, scene):
  style = str(rng.choice(STYLES))
  texts = [f"make it look like {style}", f"turn it into {style}", f"in the style of {style}"]
  failures = (f"the image does not look like {style}", f"the image only slightly looks like {style}")
  return ("style", style), texts, failures, None


_EDIT_FNS = {"Local": _edit_local, "Remove": _edit_remove, "Add": _edit_add,
             "Texture": _edit_texture, "Background": _edit_background,
             "Global": _edit_global, "Style": _edit_style}


def sample_edit(rng: np.random.Generator, scene: Scene, category: str, size: int) -> dict[str, Any] | None:
  """An exact edit of `scene`.

  Returns a dict with `truth` (float [S, S, 3]), `truth_scene` (the edited scene; for global
  edits the unchanged scene), `instructions` (paraphrases, list of str), `failures` (texts
  for "not applied" and "partly applied"), `target` (the edited object or None); or None
  when this scene cannot take this edit (e.g. no room to add an object).
  """
  out = _EDIT_FNS[category](rng, scene)
  if out is None:
    return None
  result, texts, failures, target = out
  if isinstance(result, tuple):
    op = apply_tone if result[0] == "tone" else apply_style
    truth, truth_scene = op(render_float(scene, size), result[1]), scene
  else:
    truth, truth_scene = render_float(result, size), result
  return {"truth": truth, "truth_scene": truth_scene, "instructions": texts,
          "failures": failures, "target": target}


# ------------------------------------------------------------------------- corruption

def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
  """float [H, W, C] -> same, separable Gaussian blur of std `sigma` pixels (reflect edges)."""
  if sigma <= 0:
    return img
  radius = int(np.ceil(3 * sigma))
  taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  taps /= taps.sum()
  for axis in (0, 1):
    pad = [(0, 0)] * img.ndim
    pad[axis] = (radius, radius)
    padded = np.pad(img, pad, mode="reflect")
    img = sum(w * np.take(padded, np.arange(i, i + img.shape[axis]), axis=axis)
              for i, w in enumerate(taps))
  return img


def block_means(img: np.ndarray, block: int = BLOCK) -> np.ndarray:
  """float [H, W, C] -> [H // block, W // block, C]: means of the aligned blocks."""
  h, w = img.shape[0] // block, img.shape[1] // block
  return img[:h * block, :w * block].reshape(h, block, w, block, -1).mean(axis=(1, 3))


def _upsample_blocks(cells, shape, block=BLOCK):
  """[h, w, C] -> [H, W, C]: each cell repeated over its block; the ragged edge keeps 0."""
  out = np.zeros(shape)
  up = np.repeat(np.repeat(cells, block, axis=0), block, axis=1)
  out[:up.shape[0], :up.shape[1]] = up
  return out


def blocking(img: np.ndarray, amount: float, block: int = BLOCK) -> np.ndarray:
  """Codec-like blocking: blend each aligned block towards its mean (block means are kept)."""
  if amount <= 0:
    return img
  h, w = (img.shape[0] // block) * block, (img.shape[1] // block) * block
  means = _upsample_blocks(block_means(img, block), img.shape, block)
  out = img.copy()
  out[:h, :w] = (1 - amount) * img[:h, :w] + amount * means[:h, :w]
  return out


def _rect_mask(size, cx, cy, w, h):
  y, x = _grid(size)
  return (np.abs(x - cx) < w / 2) & (np.abs(y - cy) < h / 2)


def _far_colour(rng, colour, min_distance=0.4):
  return str(rng.choice([c for c in COLOURS if _colour_distance(c, colour) > min_distance]))


def sample_corruption(rng: np.random.Generator, truth_scene: Scene, target: Object | None,
                      clean_prob: float = 0.25) -> dict[str, Any]:
  """Random corruption parameters for an edit (a plain dict; see `corrupt`)."""
  spec = {"strength": 1.0, "unrelated": None, "blur": 0.0, "blocking": 0.0, "noise": 0.0,
          "noise_seed": int(rng.integers(2 ** 31))}
  if rng.random() < clean_prob:
    return spec
  if rng.random() < 0.5:
    spec["strength"] = float(rng.uniform(0.0, 0.85))
  if rng.random() < 0.45:
    spec["unrelated"] = _sample_unrelated(rng, truth_scene, target)
  if rng.random() < 0.3:
    spec["blur"] = float(rng.uniform(0.5, 1.2))
  if rng.random() < 0.25:
    spec["blocking"] = float(rng.uniform(0.4, 0.9))
  if rng.random() < 0.35:
    spec["noise"] = float(rng.uniform(0.02, 0.12))
  return spec


def _sample_unrelated(rng, truth_scene, target):
  others = [o for o in truth_scene["objects"] if not _same_place(o, target)]
  if others and rng.random() < 0.5:
    obj = others[int(rng.integers(len(others)))]
    return {"kind": "object", "object": obj, "colour": _far_colour(rng, obj["colour"])}
  w, h = rng.uniform(0.25, 0.5, size=2)
  return {"kind": "blob", "cx": float(rng.uniform(w / 2, 1 - w / 2)),
          "cy": float(rng.uniform(h / 2, 1 - h / 2)), "w": float(w), "h": float(h),
          "colour": _far_colour(rng, truth_scene["background"]["colours"][0])}


def _same_place(a, b):
  return b is not None and abs(a["cx"] - b["cx"]) < 1e-9 and abs(a["cy"] - b["cy"]) < 1e-9


def corrupt(original: np.ndarray, truth: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
  """The edited image a generator would produce, from the exact edit.

  Args:
    original, truth: float [S, S, 3] in [0, 1].
    spec: from `sample_corruption`: `strength` (share of the edit applied, 0..1),
      `unrelated` (None, a recoloured object or a painted rectangle, drawn where the edit
      changes nothing unless it changes everything), `blur` (Gaussian std, pixels),
      `blocking` (blend towards 8x8 block means, 0..1), `noise` (Gaussian std).
  Returns:
    float [S, S, 3] in [0, 1].
  """
  size = original.shape[0]
  img = original + spec["strength"] * (truth - original)
  change = spec["unrelated"]
  if change is not None:
    if change["kind"] == "object":
      mask = object_mask(change["object"], size)
    else:
      mask = _rect_mask(size, change["cx"], change["cy"], change["w"], change["h"])
    untouched = np.all(truth == original, axis=-1)
    if untouched.mean() > 0.2:
      mask &= untouched
    img = np.where(mask[..., None], np.array(COLOURS[change["colour"]]), img)
  img = blocking(gaussian_blur(img, spec["blur"]), spec["blocking"])
  noise = np.random.default_rng(spec["noise_seed"]).normal(0.0, 1.0, img.shape)
  return np.clip(img + spec["noise"] * noise, 0.0, 1.0)


# ----------------------------------------------------------------------------- judge

def _box(img, radius):
  """Mean over a (2r+1)^2 window, edges replicated. [H, W, ...] -> same."""
  pad = [(radius, radius), (radius, radius)] + [(0, 0)] * (img.ndim - 2)
  p = np.pad(img, pad, mode="edge")
  c = np.cumsum(np.cumsum(p, 0), 1)
  c = np.pad(c, [(1, 0), (1, 0)] + [(0, 0)] * (img.ndim - 2))
  k = 2 * radius + 1
  h, w = img.shape[:2]
  return (c[k:k + h, k:k + w] - c[:h, k:k + w] - c[k:k + h, :w] + c[:h, :w]) / k ** 2


def _window_max(mask, radius):
  """bool [H, W] -> bool [H, W]: True where any pixel in the window is True."""
  return _box(mask.astype(np.float64), radius) > 1e-9


def measure_following(original: np.ndarray, truth: np.ndarray, edited: np.ndarray) -> float:
  """Share of the way from the original to the truth that the edited image covers.

  1 - ||e - t|| / ||o - t||, both norms over the pixels the edit changes, on images smoothed
  by a Gaussian of std FOLLOW_SMOOTH pixels (so that mild pixel noise, which quality scores,
  barely counts). A copy of the original scores 0, the truth 1, a linear blend with weight s
  exactly s; overshooting, noise and blank images come out near 0 because they are no closer
  to the truth than the original is. Inputs float [S, S, 3]; returns a float in [0, 1]
  (1 when the edit changes nothing).
  """
  region = np.any(np.abs(truth - original) > EDIT_TOL, axis=-1)
  o, t, e = (gaussian_blur(x, FOLLOW_SMOOTH) for x in (original, truth, edited))
  denom = float(np.sum((t - o)[region] ** 2))
  if denom < 1e-12:
    return 1.0
  error = float(np.sum((e - t)[region] ** 2))
  return float(np.clip(1.0 - np.sqrt(error / denom), 0.0, 1.0))


def measure_changes(original: np.ndarray, truth: np.ndarray,
                    edited: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
  """Changes the edit does not ask for, on the 8x8 cell grid.

  Each cell's mean colour is compared with the closest point on the segment from the
  original's to the truth's cell mean (so a partial edit is not a change); the RMS distance
  beyond CELL_TOL counts, fully from 2 * CELL_TOL on. Returns (changed share in [0, 1], cell
  deviations [h, w], per-cell changed amounts [h, w] in [0, 1]).
  """
  o, t, e = (block_means(x) for x in (original, truth, edited))
  d = t - o
  norm = np.sum(d ** 2, axis=-1, keepdims=True)
  s = np.clip(np.sum((e - o) * d, axis=-1, keepdims=True) / np.maximum(norm, 1e-12), 0, 1)
  dev = np.sqrt(np.mean((e - o - s * d) ** 2, axis=-1))
  changed = np.clip((dev - CELL_TOL) / CELL_TOL, 0.0, 1.0)
  return float(changed.mean()), dev, changed


def measure_on_path(original: np.ndarray, truth: np.ndarray, cell_changed: np.ndarray) -> float:
  """Share of the edit's change energy in cells whose mean colour stays on the way from the
  original to the truth (1 - the cell's `changed` amount), weighted by each cell's
  sum of squared pixel changes. A cell painted a colour the edit does not lead to (noise
  averages to grey, a blank image, a wrong colour) is off the path. 1 when nothing changes.
  """
  weight = block_means(np.sum((truth - original) ** 2, axis=-1, keepdims=True))[..., 0]
  total = float(weight.sum())
  if total < 1e-12:
    return 1.0
  return float(np.sum(weight * (1.0 - cell_changed)) / total)


def _border_mask(shape, block=BLOCK):
  """bool [H, W]: pixels on the first or last row/column of an aligned block."""
  iy, ix = np.mgrid[0:shape[0], 0:shape[1]]
  return (iy % block == 0) | (iy % block == block - 1) | (ix % block == 0) | (ix % block == block - 1)


def measure_noise(reference: np.ndarray, edited: np.ndarray, flat_sources: Sequence[np.ndarray],
                  valid: np.ndarray) -> float:
  """Std of the noise in `edited` around `reference`, estimated where the scene is flat.

  Uses the median absolute high-pass residual (robust to the few edges left by unrelated
  changes) inside flat areas of every image in `flat_sources`, away from block borders,
  where `valid` (bool [H, W]) holds.
  """
  hp = (edited - reference) - _box(edited - reference, 1)
  busy = np.zeros(reference.shape[:2], bool)
  for img in flat_sources:
    busy |= np.max(np.abs(img - _box(img, 1)), axis=-1) > 1e-3
  inside = ~_border_mask(busy.shape) & valid
  keep = ~_window_max(busy, 2) & inside
  if keep.sum() < 64:
    keep = inside
  if keep.sum() == 0:
    return 0.0
  return float(np.median(np.abs(hp[keep])) / 0.6745 / np.sqrt(8 / 9))


def _diffs(img):
  """Forward differences: (horizontal [H, W-1, ...], vertical [H-1, W, ...])."""
  return img[:, 1:] - img[:, :-1], img[1:] - img[:-1]


def _pair_valid(valid):
  """bool masks of the forward differences whose two pixels are both valid."""
  return valid[:, 1:] & valid[:, :-1], valid[1:] & valid[:-1]


def measure_sharpness(reference: np.ndarray, edited: np.ndarray, valid: np.ndarray) -> float:
  """Median ratio of edge contrast in `edited` to that in `reference` (1 = as sharp)."""
  ratios = []
  for de, dr, ok in zip(_diffs(edited), _diffs(reference), _pair_valid(valid)):
    strength = np.sum(dr ** 2, axis=-1)
    edge = (strength > 3 * 0.15 ** 2) & ok
    ratios.append(np.sum(de * dr, axis=-1)[edge] / strength[edge])
  ratios = np.concatenate(ratios)
  return float(np.median(ratios)) if ratios.size >= 4 else 1.0


def _border_excess(img, valid, block):
  """Mean edge contrast on block borders minus that inside blocks (both directions)."""
  total = 0.0
  for axis, (d, ok) in enumerate(zip(_diffs(img), _pair_valid(valid))):
    g = np.abs(d).mean(axis=-1)
    pos = np.arange(g.shape[1 - axis]) % block == block - 1
    border = np.broadcast_to(pos[None, :] if axis == 0 else pos[:, None], g.shape)
    if (ok & border).any() and (ok & ~border).any():
      total += g[ok & border].mean() - g[ok & ~border].mean()
  return total


def measure_blocking(reference: np.ndarray, edited: np.ndarray, valid: np.ndarray, block: int = BLOCK) -> float:
  """Excess edge contrast on block borders over block interiors, beyond the reference's."""
  if min(reference.shape[:2]) < 2 * block:
    return 0.0
  return float(max(0.0, _border_excess(edited, valid, block) - _border_excess(reference, valid, block)))


def _blend_share(original, truth, edited, valid):
  """Least-squares s in [0, 1] with edited ~ original + s (truth - original) on `valid` pixels:
  the reference quality is measured against (unbiased by zero-mean noise)."""
  d = (truth - original)[valid]
  denom = float(np.sum(d ** 2))
  if denom < 1e-12:
    return 1.0
  return float(np.clip(np.sum((edited - original)[valid] * d) / denom, 0.0, 1.0))


def _penalty(value, zero_at):
  """Linear penalty in [0, 1], with a dead zone for measurement noise."""
  return float(np.clip((value / zero_at - DEAD_ZONE) / (1 - DEAD_ZONE), 0.0, 1.0))


def _valid_pixels(cell_dev, shape, margin=2):
  """bool [H, W]: pixels at least `margin` + 1 pixels away from changed cells, where quality is
  measured (the edges of an unasked change are not artifacts)."""
  changed = (cell_dev > CELL_TOL).astype(np.float64)[..., None]
  changed = _upsample_blocks(changed, shape[:2] + (1,))[..., 0] > 0.5
  return ~_window_max(changed, margin)


def judge(original: np.ndarray, truth: np.ndarray, edited: np.ndarray) -> dict[str, Any]:
  """Scores an edit exactly against its ground truth from the paper's three perspectives.

  Args:
    original, truth, edited: uint8 [S, S, 3] (or float in [0, 1]) of the same shape.
  Returns:
    dict: `scores` float32 [3] in [0, 5] (instruction following, detail preserving,
    generation quality; 5 = perfect), and the measurements behind them: `following`
    (`covered` x `on_path`: share of the way to the truth covered, and share of the edit's
    cells that stay on the way from the original to the truth), `changed` (share of unrelated cells changed),
    `cell_dev` [h, w], `noise` (std), `sharpness` (edge-contrast ratio), `blocking`,
    `measured_area` (share of pixels where quality could be measured), `penalties`.
  """
  o, t, e = (to_float(x) if np.asarray(x).dtype == np.uint8 else np.asarray(x, np.float64)
             for x in (original, truth, edited))
  if not o.shape == t.shape == e.shape:
    raise ValueError(f"judge: shapes differ: original {o.shape}, truth {t.shape}, edited {e.shape}")
  changed, cell_dev, cell_changed = measure_changes(o, t, e)
  covered, on_path = measure_following(o, t, e), measure_on_path(o, t, cell_changed)
  # Following needs both: getting closer to the truth, and by way of colours the edit leads to.
  following = covered * on_path
  valid = _valid_pixels(cell_dev, o.shape)
  reference = o + _blend_share(o, t, e, valid) * (t - o)
  m = {"following": following, "covered": covered, "on_path": on_path, "changed": changed, "cell_dev": cell_dev,
       "noise": measure_noise(reference, e, (o, t), valid),
       "sharpness": measure_sharpness(reference, e, valid),
       "blocking": measure_blocking(reference, e, valid)}
  p = {"noise": _penalty(m["noise"], NOISE_ZERO),
       "blur": _penalty(1.0 - m["sharpness"], BLUR_ZERO),
       "blocking": _penalty(m["blocking"], BLOCK_ZERO)}
  m["penalties"] = p
  follow = 5.0 * float(np.clip((following - FOLLOW_NONE) / (FOLLOW_FULL - FOLLOW_NONE), 0.0, 1.0))
  preserve = 5.0 * (1.0 - _penalty(changed, CHANGED_ZERO))
  # Blur and blocking both remove detail (blocking also lowers edge contrast): count the worse.
  # Quality is measured away from unasked changes; credit only what could be measured, so an
  # image that changed everywhere (noise, a blank image) gets none.
  m["measured_area"] = float(valid.mean())
  coverage = min(1.0, m["measured_area"] / QUALITY_AREA)
  quality = 5.0 * coverage * (1.0 - min(1.0, p["noise"] + max(p["blur"], p["blocking"])))
  m["scores"] = np.array([follow, preserve, quality], np.float32)
  return m


# ------------------------------------------------------------------- failure texts

def _changed_words(cell_dev, truth_scene, target, size):
  """What an unrelated change hit: "the red circle changed", "the background changed at the top"."""
  changed = cell_dev > CELL_TOL
  if not changed.any():
    changed = cell_dev >= cell_dev.max()
  best, best_share = None, 0.5
  for obj in (truth_scene or {}).get("objects", []):
    if _same_place(obj, target):
      continue
    cover = block_means(object_mask(obj, size)[..., None].astype(np.float64))[..., 0]
    share = float(cover[changed].max()) if changed.any() else 0.0
    if share > best_share:
      best, best_share = obj, share
  if best is not None:
    return f"the {_describe(best)} changed"
  iy, ix = np.nonzero(changed)
  where = _where((ix.mean() + 0.5) / changed.shape[1], (iy.mean() + 0.5) / changed.shape[0])
  return ("the background" if truth_scene else "the image") + f" changed at the {where}"


GENERIC_FAILURES = ("the edit is not applied", "the edit is only partly applied")


def failure_texts(measures: dict[str, Any], failures: Sequence[str] = GENERIC_FAILURES,
                  truth_scene: Scene | None = None, target: Object | None = None, size: int | None = None) -> list[str]:
  """The 3 reward texts (following, preserving, quality) for a judged edit; "None" if perfect.

  Args:
    measures: from `judge`.
    failures: (text when the edit is not applied, text when it is partly applied).
    truth_scene, target: the edited scene and object, to name what an unrelated change hit
      (without them, e.g. for a model's output on a photo, the texts are generic).
  """
  follow, preserve, quality = (float(x) for x in measures["scores"])
  texts = ["None", "None", "None"]
  if follow < 5.0:
    texts[0] = failures[0] if measures["following"] < 0.35 else failures[1]
  if preserve < 5.0:
    size = size or measures["cell_dev"].shape[0] * BLOCK
    texts[1] = _changed_words(measures["cell_dev"], truth_scene, target, size)
  if quality < 5.0:
    texts[2] = _quality_words(measures)
  return texts


def _quality_words(measures):
  p = measures["penalties"]
  if p["noise"] >= max(p["blur"], p["blocking"]):
    return "the image is noisy"
  if p["blocking"] > 0 and measures["blocking"] > 0.04 * (1.0 - measures["sharpness"]):
    return "the image has blocky artifacts"
  return "the image is blurry"


# --------------------------------------------------------------------------- examples

def _check_size(size):
  if not (MIN_SIZE <= size <= MAX_SIZE and size % BLOCK == 0):
    raise ValueError(f"synthetic image size must be a multiple of {BLOCK} in "
                     f"[{MIN_SIZE}, {MAX_SIZE}], got {size}")


def _sample_scene_and_edit(rng, split, category, size):
  for _ in range(1000):
    scene = sample_scene(rng)
    if scene_split(scene) != split:
      continue
    edit = sample_edit(rng, scene, category, size)
    original = to_uint8(render_float(scene, size))
    # The edit must visibly change at least a few pixels after uint8 rounding.
    if edit is not None and np.sum(np.any(to_uint8(edit["truth"]) != original, -1)) >= 16:
      return scene, edit
  raise RuntimeError(f"could not sample a {category} edit for split {split!r}")


def make_example(index: int, split: str = "train", seed: int = 0, size: int = 64,
                 clean_prob: float = 0.25) -> dict[str, Any]:
  """One example of the edit world, a pure function of (seed, split, index, size).

  Returns a dict: `original`, `truth` (exact edit), `edited` (corrupted edit), each uint8
  [size, size, 3]; `instruction` (str), `instructions` (paraphrases, list of str),
  `category` (one of records.CATEGORIES, balanced by index), `scores` float32 [3] in [0, 5] and
  `reward_texts` (3 str) measured by `judge`; `scene_key` (str); `corruption` (the spec).
  """
  _check_size(size)
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  rng = np.random.default_rng([seed, SPLITS.index(split), index])
  category = records.CATEGORIES[index % len(records.CATEGORIES)]
  scene, edit = _sample_scene_and_edit(rng, split, category, size)
  original, truth = render_float(scene, size), edit["truth"]
  spec = sample_corruption(rng, edit["truth_scene"], edit["target"], clean_prob)
  edited = to_uint8(corrupt(original, truth, spec))
  original, truth = to_uint8(original), to_uint8(truth)
  measures = judge(original, truth, edited)
  texts = failure_texts(measures, edit["failures"], edit["truth_scene"], edit["target"], size)
  instructions = edit["instructions"]
  return {"original": original, "truth": truth, "edited": edited,
          "instruction": instructions[int(rng.integers(len(instructions)))],
          "instructions": instructions, "category": category,
          "scores": measures["scores"], "reward_texts": texts,
          "scene_key": scene_key(scene), "corruption": spec}
