"""The edit job and Editor: image preparation, loading, single and batch edits, bad inputs, the CLI."""

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import convert as convert_config
from configs import edit as edit_config
from configs import evaluate as evaluate_config
from mre_jax import ops
from mre_jax.errors import ConfigError
from mre_jax.infer import edit, sampling
from mre_jax.jobs import convert as convert_job
from mre_jax.jobs import edit as edit_job

ROOT = Path(__file__).resolve().parents[1]
STEPS = 2
RES = 64


@pytest.fixture(scope="module")
def checkpoint(tiny_folder, tmp_path_factory):
  config = convert_config.get_config()
  config.source = str(tiny_folder)
  return convert_job.convert(config, str(tmp_path_factory.mktemp("edit") / "ckpt"))


@pytest.fixture
def photo(tmp_path):
  """A 96x64 (landscape 3:2) JPEG."""
  path = tmp_path / "photo.jpg"
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(path)
  return path


def _config(checkpoint, **overrides):
  config = edit_config.get_config()
  config.update(dict(checkpoint=str(checkpoint), steps=STEPS, resolution=RES, instruction="make it blue"))
  config.update(overrides)
  return config


def _files(folder):
  return sorted(p.name for p in Path(folder).iterdir())


def spec_release_size(w, h, r):
  """SPEC section 4's formula, written out here (not the code's): ((W, H), f)."""
  f = r / max(w, h)
  f = math.ceil(min(w, h) * f / 64) * 64 / min(w, h)
  return (math.floor(w * f / 64) * 64, math.floor(h * f / 64) * 64), f


@pytest.mark.parametrize("size, expected", [
    ((777, 777), (512, 512)),  # square
    ((1533, 1022), (576, 384)),  # 3:2
    ((1022, 1533), (384, 576)),  # 2:3
    ((1020, 765), (512, 384)),  # 4:3
    ((1392, 783), (512, 320)),  # 16:9
    ((707, 505), (512, 384)),  # 7:5
    ((1536, 1024), (576, 384)),  # SPEC's example
    ((99, 67), (64, 64)),  # small, resolution 64 below
])
def test_release_working_size_is_the_default(size, expected):
  r = 64 if max(size) < 100 else 512
  (w, h), f = spec_release_size(*size, r)
  assert (w, h) == expected
  assert edit.working_size(size, r) == edit.working_size(size, r, "release") == (w, h)
  assert min(w, h) == math.ceil(min(size) * r / max(size) / 64) * 64  # shorter side rounded up
  out = edit.output_size(size, r)
  assert out == (round(size[0] * f), round(size[1] * f))  # the input's aspect ratio, same scale
  assert abs(out[0] / out[1] - size[0] / size[1]) < 1.0 / min(out)


def test_release_working_size_keeps_the_release_float_arithmetic():
  # 98 * (512 / 98) is just under 512 in floats, so the release edits a 98x98 photo at 448x448.
  assert spec_release_size(98, 98, 512)[0] == (448, 448) == edit.working_size((98, 98), 512)
  assert edit.working_size((60, 60), 64) == (64, 64)  # never under 64


def test_short_side_rule_working_and_output_sizes():
  ss = "short_side"
  assert edit.working_size((512, 512), 512, ss) == (512, 512)
  assert edit.working_size((1000, 750), 512, ss) == (704, 512)  # 682.7 -> 704
  assert edit.working_size((300, 700), 512, ss) == (512, 1216)  # 1194.7 -> 1216
  assert edit.working_size((20, 10), 64, ss) == (128, 64)
  assert edit.working_size((1536, 1024), 512, ss) == (768, 512)
  assert edit.output_size((1000, 750), 512, ss) == (683, 512)  # the input's aspect ratio
  assert edit.output_size((300, 700), 512, ss) == (512, 1195)
  with pytest.raises(ConfigError, match="size_rule='paper': expected one of release, short_side"):
    edit.working_size((10, 10), 64, "paper")


def test_prepare_image_crops_to_the_rounded_aspect_ratio_instead_of_stretching():
  # 120x50 -> working size 128x64 (aspect 2.4 -> 2): a fit cuts ~8 columns off each side
  array = np.zeros((50, 120, 3), np.uint8)
  array[:, :5] = (255, 0, 0)  # red edge columns, blue elsewhere
  array[:, 5:] = (0, 0, 255)
  pixels = edit.prepare_image(Image.fromarray(array), 64)
  assert pixels.shape == (64, 128, 3)
  left = (pixels[:, :2] + 1) * 127.5
  assert left[..., 0].max() < 40 and left[..., 2].min() > 200  # no red left: cropped, not squeezed in


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16", "1"])
def test_prepare_image_any_mode(mode):
  image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)).convert(mode)
  pixels = edit.prepare_image(image, 64)
  assert pixels.shape == (64, 64, 3) and pixels.dtype == np.float32  # 50x30: release size 64x64
  assert edit.prepare_image(image, 64, "short_side").shape == (64, 128, 3)
  assert -1.0 <= pixels.min() and pixels.max() <= 1.0
  transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
  assert edit.to_rgb(transparent).getpixel((0, 0)) == (255, 255, 255)  # over white, not black


def test_checkpoint_and_diffusers_folder_give_the_same_edit(checkpoint, tiny_folder, photo, tmp_path):
  # convert's step 0 has EMA == raw params, so both sources hold the same weights.
  outputs = []
  for source in (checkpoint, tiny_folder):
    out = tmp_path / f"{Path(source).name}.png"
    [record] = edit_job.edit(_config(source, image=str(photo), output=str(out), seed=7))
    assert record["status"] == "ok" and Path(record["output"]) == out
    outputs.append(np.asarray(Image.open(out)))
  assert outputs[0].shape == (64, 96, 3)  # the input's aspect ratio, shorter side at the resolution
  np.testing.assert_array_equal(outputs[0], outputs[1])
  assert outputs[0].std() > 1.0
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_second_edit_of_the_same_size_does_not_recompile(checkpoint, photo, tmp_path, sampler_traces):
  for i, seed in enumerate((1, 2)):
    edit_job.edit(_config(checkpoint, image=str(photo), output=str(tmp_path / f"{i}.png"), seed=seed,
                      scores=(3.0, 4.0, 5.0), text_guidance=5.0 + i))
    if i == 0:  # 96x64 -> working size 64x64 (release, R=64): one program
      assert sampler_traces.since() == {("euler_ancestral", STEPS, (1, 64, 64, 3)): 1}
      sampler_traces.mark()
  assert not sampler_traces.since()  # the second edit (other seed, scores' values, guidance) reused it
  assert not np.array_equal(np.asarray(Image.open(tmp_path / "0.png")), np.asarray(Image.open(tmp_path / "1.png")))


@pytest.mark.parametrize("overrides,error,match", [
    (dict(image="missing.jpg"), FileNotFoundError, r"config.image=.*missing.jpg: no such file"),
    (dict(image="notes.txt"), ValueError, r"config.image=.*notes.txt: not an image"),
    (dict(image="truncated.png"), ValueError, r"config.image=.*truncated.png: unreadable image"),
    (dict(instruction="  "), ConfigError, r"config.instruction='  ': the instruction must be a non-empty"),
    (dict(scores=(5.0, 6.0, 5.0)), ConfigError, r"config.scores=\(5.0, 6.0, 5.0\): every score must be in \[0, 5\]"),
    (dict(scores=(5.0, 5.0)), ConfigError, r"config.scores=\(5.0, 5.0\): expected three numbers"),
    (dict(steps=0), ConfigError, r"config.steps=0: expected an integer >= 1"),
    (dict(resolution=100), ConfigError, r"config.resolution=100: expected a positive multiple of 64"),
    (dict(resolution=0), ConfigError, r"config.resolution=0"),
    (dict(scheduler="plms"), ConfigError, r"config.scheduler='plms'"),
    (dict(dtype="float16"), ConfigError, r"config.dtype='float16': expected one of float32, bfloat16"),
    (dict(size_rule="longer"), ConfigError, r"config.size_rule='longer': expected one of release, short_side"),
    (dict(attention="flash"), ConfigError, r"config.attention='flash': expected one of auto, xla, cudnn"),
    (dict(output="nowhere/out.png"), FileNotFoundError, r"config.output=.*nowhere/out.png: folder .* does not exist"),
    (dict(output="out.gif2"), ConfigError, r"config.output=.*out.gif2: unknown image extension"),
    (dict(checkpoint=""), ConfigError, r"config.checkpoint is required"),
    (dict(checkpoint="nomodel"), FileNotFoundError, r"nomodel: neither a project checkpoint"),
])
def test_bad_inputs_fail_early_with_no_output(overrides, error, match, checkpoint, photo, tmp_path):
  (tmp_path / "notes.txt").write_text("not an image")
  Image.open(photo).save(tmp_path / "full.png")
  (tmp_path / "truncated.png").write_bytes((tmp_path / "full.png").read_bytes()[:200])
  paths = {k: str(tmp_path / v) for k, v in overrides.items() if k in ("image", "output", "checkpoint") and v}
  config = _config(checkpoint, image=str(photo), output=str(tmp_path / "out.png"))
  config.update({**overrides, **paths})
  before = _files(tmp_path)
  with pytest.raises(error, match=match):
    edit_job.edit(config)
  assert _files(tmp_path) == before


def test_unwritable_output_folder_and_failed_sampling_leave_nothing(checkpoint, photo, tmp_path, monkeypatch):
  with pytest.raises(FileExistsError, match="photo.jpg: exists"):
    edit_job.edit(_config(checkpoint, image=str(photo), output=str(photo)))

  def refuse(*args, **kwargs):
    raise PermissionError(13, "Permission denied")
  with monkeypatch.context() as m:
    m.setattr(edit_job.tempfile, "NamedTemporaryFile", refuse)
    with pytest.raises(PermissionError, match=r"config.output=.*out.png: folder .* is not writable"):
      edit_job.edit(_config(checkpoint, image=str(photo), output=str(tmp_path / "out.png")))
  _poison_unet(monkeypatch)
  with pytest.raises(sampling.NonFiniteError, match=r"batch example\(s\) \[0\] has non-finite values"):
    edit_job.edit(_config(checkpoint, image=str(photo), output=str(tmp_path / "out.png"), scores=POISON))
  assert _files(tmp_path) == ["photo.jpg"]


POISON = (0.25, 5.0, 5.0)  # scores for which `_PoisonedUNet` returns NaN


@dataclasses.dataclass(frozen=True)
class _PoisonedUNet:
  """The editor's U-Net, but its output is NaN for examples scored POISON (a model that diverges
  on some inputs); the sampler, the finiteness check and the reports run as they are."""
  unet: object

  @property
  def reward(self):
    return self.unet.reward

  def apply(self, variables, sample, t, context, scores, reward_embeds):
    eps = self.unet.apply(variables, sample, t, context, scores, reward_embeds)
    return jnp.where((scores[:, 0] == POISON[0])[:, None, None, None], jnp.nan, eps)


def _poison_unet(monkeypatch):
  """Editors loaded from now on (in this test) have a `_PoisonedUNet`."""
  load = edit.load_editor

  def poisoned(*args, **kwargs):
    editor = load(*args, **kwargs)
    return dataclasses.replace(editor, unet=_PoisonedUNet(editor.unet))
  monkeypatch.setattr(edit, "load_editor", poisoned)


@pytest.mark.parametrize("rule, working", [("release", (64, 64)), ("short_side", (64, 128))])
def test_size_rule_reaches_single_batch_and_evaluation_edits(rule, working, checkpoint, photo, tmp_path, monkeypatch):
  """The rule sets the sampler's input size in every path; outputs keep the photo's 96x64."""
  shapes = []

  def fake_edit(editor, pixels, instructions, **kwargs):
    shapes.append(pixels.shape)
    return np.full(pixels.shape, 0.5, np.float32)
  monkeypatch.setattr(edit, "edit_arrays", fake_edit)
  monkeypatch.setattr(edit, "sample_arrays", lambda *a, **k: (fake_edit(*a, **k), np.ones(len(a[1]), bool)))
  edit_job.edit(_config(checkpoint, image=str(photo), output=str(tmp_path / "one.png"), size_rule=rule))
  (tmp_path / "r.jsonl").write_text(json.dumps({"image": "photo.jpg", "instruction": "x"}) + "\n")
  edit_job.edit(_config(checkpoint, requests=str(tmp_path / "r.jsonl"), size_rule=rule))
  config = evaluate_config.get_config()
  config.checkpoint, config.edit.resolution = str(checkpoint), RES
  assert config.edit.size_rule == "release"
  config.edit.size_rule = rule
  [out] = edit.make_edit_fn(config)([Image.open(photo)], ["x"])
  assert shapes == [(1, *working, 3)] * 3
  assert Image.open(tmp_path / "one.png").size == Image.open(tmp_path / "edits" / "0001-photo.png").size == out.size == (96, 64)


def test_kernel_fields_reach_every_model_of_the_edit_and_evaluate_editors(checkpoint, photo, tmp_path, monkeypatch):
  kernels, real = [], edit.load_editor

  def load(*args, **kw):
    editor = real(*args, **kw)
    kernels.append({editor.unet.kernels, editor.vae.kernels, editor.text_encoder.kernels})
    return editor
  monkeypatch.setattr(edit, "load_editor", load)
  monkeypatch.setattr(edit, "sample_arrays", lambda e, pixels, *a, **k: (np.zeros_like(pixels), np.ones(len(pixels), bool)))
  edit_job.edit(_config(checkpoint, image=str(photo), output=str(tmp_path / "one.png"), attention="xla", conv="winograd"))
  config = evaluate_config.get_config()
  config.checkpoint, config.edit.resolution, config.edit.norm = str(checkpoint), RES, "xla"
  monkeypatch.setattr(edit, "edit_arrays", lambda e, pixels, *a, **k: np.zeros_like(pixels))
  edit.make_edit_fn(config)([Image.open(photo)], ["x"])
  assert kernels == [{ops.Kernels(attention="xla", conv="winograd")}, {ops.Kernels(norm="xla")}]


def test_batch_mode_reports_failures_and_runs_the_rest(checkpoint, photo, tmp_path):
  single = tmp_path / "single.png"
  edit_job.edit(_config(checkpoint, image=str(photo), output=str(single), seed=5))
  lines = [
      {"image": "photo.jpg", "instruction": "make it blue", "seed": 5},
      {"image": "missing.jpg", "instruction": "add snow"},
      {"image": "photo.jpg", "instruction": "add snow", "scores": [5, 5, 9]},
      "this is not json",
      {"image": "photo.jpg", "instruction": "", "output": "never.png"},
      {"image": "photo.jpg", "instruction": "add snow", "scores": [1, 2, 3], "output": "mine/snow.png",
       "reward_text": "still blurry; None; None"},
  ]
  (tmp_path / "mine").mkdir()
  requests = tmp_path / "requests.jsonl"
  requests.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n\n")
  records = edit_job.edit(_config(checkpoint, requests=str(requests), instruction=""))
  written = [json.loads(line) for line in (tmp_path / "edits" / "results.jsonl").read_text().splitlines()]
  assert written == records and [r["line"] for r in records] == [1, 2, 3, 4, 5, 6]
  assert [r["status"] for r in records] == ["ok", "error", "error", "error", "error", "ok"]
  assert "missing.jpg: no such file" in records[1]["error"]
  assert "scores=[5, 5, 9]: every score must be in [0, 5]" in records[2]["error"]
  assert "not a JSON object" in records[3]["error"]
  assert "instruction='': the instruction must be a non-empty string" in records[4]["error"]
  assert _files(tmp_path / "edits") == ["0001-photo.png", "results.jsonl"]
  assert _files(tmp_path / "mine") == ["snow.png"]
  assert not (tmp_path / "never.png").exists()
  # batch and single mode give the same image for the same seed
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "edits" / "0001-photo.png")),
                                np.asarray(Image.open(single)))


def test_batch_mode_reports_a_non_finite_edit_and_completes_its_batch_mates(checkpoint, photo, tmp_path,
                                                                             monkeypatch):
  _poison_unet(monkeypatch)
  lines = [{"image": "photo.jpg", "instruction": "make it blue", "seed": 5},
           {"image": "photo.jpg", "instruction": "make it blue", "seed": 5, "scores": list(POISON)},
           {"image": "photo.jpg", "instruction": "add snow", "seed": 6}]
  requests = tmp_path / "requests.jsonl"
  requests.write_text("".join(json.dumps(x) + "\n" for x in lines))
  records = edit_job.edit(_config(checkpoint, requests=str(requests), batch_size=4))  # one sampler call for all
  assert [r["status"] for r in records] == ["ok", "error", "ok"]
  assert records[1]["error"].startswith("non-finite values (NaN/inf) in the decoded image")
  assert _files(tmp_path / "edits") == ["0001-photo.png", "0003-photo.png", "results.jsonl"]
  for name in ("0001-photo.png", "0003-photo.png"):
    assert np.asarray(Image.open(tmp_path / "edits" / name)).std() > 1.0


def test_batch_mode_fails_when_every_request_fails(checkpoint, tmp_path):
  requests = tmp_path / "r.jsonl"
  requests.write_text(json.dumps({"image": "gone.png", "instruction": "x"}) + "\n")
  with pytest.raises(ValueError, match="all 1 requests failed"):
    edit_job.edit(_config(checkpoint, requests=str(requests)))
  assert json.loads((tmp_path / "edits" / "results.jsonl").read_text())["status"] == "error"
  with pytest.raises(ConfigError, match="config.image and config.requests are exclusive"):
    edit_job.edit(_config(checkpoint, requests=str(requests), image="x.png"))
  with pytest.raises(FileNotFoundError, match="config.requests=.*none.jsonl: no such file"):
    edit_job.edit(_config(checkpoint, requests=str(tmp_path / "none.jsonl")))


def _main(*args):
  """Starts `main.py --config=configs/edit.py ARGS`; returns the Popen (text pipes)."""
  return subprocess.Popen([sys.executable, "main.py", "--config=configs/edit.py", *args], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_cli_success_in_bfloat16_and_failure(checkpoint, photo, tmp_path):
  out, bad = tmp_path / "cli.png", tmp_path / "bad.png"
  common = [f"--config.checkpoint={checkpoint}", f"--config.image={photo}", f"--config.steps={STEPS}",
            f"--config.resolution={RES}", "--config.instruction=make it winter"]
  # both at once: the failing run is mostly imports, which overlap the successful run's work
  failure = _main(*common, f"--config.output={bad}", "--config.scores=(5.0, 5.0, 7.0)")
  success = _main(*common, f"--config.output={out}", "--config.dtype=bfloat16", "--config.scheduler=ddim",
                  "--config.scores=(4.0, 5.0, 3.5)")
  stdout, stderr = success.communicate(timeout=300)
  assert success.returncode == 0, stderr[-2000:]
  assert f"wrote {out}" in stdout
  assert Image.open(out).size == (96, 64)
  _, stderr = failure.communicate(timeout=300)
  assert failure.returncode == 2
  assert stderr.strip().splitlines()[-1] == "error: config.scores=(5.0, 5.0, 7.0): every score must be in [0, 5]"
  assert not bad.exists()


def test_an_image_conditioned_decoder_decodes_each_edit_with_its_own_input(tiny_folder, monkeypatch):
  """The sampler hands the decoder the batch's input images (models/vae.py, image_condition_width);
  with the conditioning at zero the edits are SD's decoder's."""
  from mre_jax.io import pretrained
  from mre_jax.train import vae_train
  editor = edit.load_editor(tiny_folder)
  vae, params = vae_train.add_image_condition(editor.vae, editor.vae_params, 8)
  conditioned = dataclasses.replace(editor, vae=vae, vae_params=params, _text_cache={})
  pixels = np.random.default_rng(3).uniform(-1, 1, (2, RES, RES, 3)).astype(np.float32)
  kwargs = dict(seeds=[0, 1], steps=STEPS, scheduler="ddim")
  seen, decode = [], pretrained.vae_decode

  def spy(vae, params, latents, images=None):
    jax.debug.callback(lambda a: seen.append(np.asarray(a)), images)
    return decode(vae, params, latents, images)
  monkeypatch.setattr(sampling.pretrained, "vae_decode", spy)
  out = edit.edit_arrays(conditioned, pixels, ["make it red", "add snow"], **kwargs)
  np.testing.assert_array_equal(seen[-1], pixels)
  monkeypatch.undo()
  np.testing.assert_allclose(out, edit.edit_arrays(editor, pixels, ["make it red", "add snow"], **kwargs), atol=1e-6)
