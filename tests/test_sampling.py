"""The jitted editing sampler against diffusers' PyTorch InstructPix2Pix pipeline, guidance, rewards, caching."""

import numpy as np
import pytest
from PIL import Image

from mre_jax.infer import edit, sampling

torch = pytest.importorskip("torch")
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionInstructPix2PixPipeline  # noqa: E402

from mre_jax.io import torch_twin  # noqa: E402

SIZE = 64  # pixels; latents 8x8
STEPS = 3
PROMPTS = ["make it blue", "add snow"]
# DDIMScheduler's own defaults (clip_sample, set_alpha_to_one True) differ from SD 1.5's config.
TORCH_SCHEDULERS = {
    "ddim": lambda cfg: DDIMScheduler.from_config(cfg, clip_sample=False, set_alpha_to_one=False),
    "euler": EulerDiscreteScheduler.from_config,
}


@pytest.fixture(scope="module")
def editor(tiny_folder):
  return edit.load_editor(tiny_folder)


@pytest.fixture(scope="module")
def images():
  r = np.random.default_rng(0)
  return [Image.fromarray(r.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in PROMPTS]


@pytest.fixture(scope="module")
def pixels(images):
  return np.stack([edit.prepare_image(image, SIZE) for image in images])


@pytest.fixture(scope="module")
def init_noise():
  return np.random.default_rng(1).standard_normal((len(PROMPTS), SIZE // 8, SIZE // 8, 4)).astype(np.float32)


@pytest.fixture(scope="module")
def pipeline(tiny_folder, editor):
  twin = torch_twin.MRERewardUNet.from_pretrained(tiny_folder / "unet").eval()
  _, pooled = edit.encode_texts(editor, [edit.DEFAULT_REWARD_TEXT])
  twin.set_default_rewards(torch.tensor(edit.DEFAULT_SCORES), torch.tensor(pooled[0]))
  return StableDiffusionInstructPix2PixPipeline.from_pretrained(tiny_folder, unet=twin, safety_checker=None)


def _ddim(editor, pixels, init_noise, **kwargs):
  return edit.edit_arrays(editor, pixels, PROMPTS, seeds=[0, 1], steps=STEPS, scheduler="ddim",
                          init_noise=init_noise, **kwargs)


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_deterministic_samplers_match_the_pytorch_pipeline(scheduler, editor, pipeline, images, pixels, init_noise):
  pipeline.scheduler = TORCH_SCHEDULERS[scheduler](pipeline.scheduler.config)
  pipeline.set_progress_bar_config(disable=True)
  with torch.no_grad():
    ref = pipeline(PROMPTS, image=images, num_inference_steps=STEPS, guidance_scale=7.5, image_guidance_scale=1.5,
                   latents=torch.tensor(init_noise.transpose(0, 3, 1, 2)), output_type="np").images
  out = edit.edit_arrays(editor, pixels, PROMPTS, seeds=[0, 1], steps=STEPS, scheduler=scheduler,
                         init_noise=init_noise)
  assert out.shape == ref.shape == (2, SIZE, SIZE, 3)
  assert np.abs(out - ref).max() < 1e-4, np.abs(out - ref).max()  # measured: ~4e-6 (pixels in [0, 1])
  assert out.std() > 0.05  # a real image, not a constant


def test_guidance_one_one_is_the_conditional_branch_alone(editor, pixels, init_noise):
  # g_text = g_image = 1 leaves eps_text only, so the "" context (branches 2 and 3) cannot matter.
  spec = sampling.spec_from_scheduler_config(editor.scheduler_config, "ddim", STEPS)
  fn = sampling.cached_sample_fn(editor.unet, editor.vae, editor.scaling_factor, spec)
  context, _ = edit.encode_texts(editor, PROMPTS)
  null, _ = edit.encode_texts(editor, ["", ""])
  _, reward = edit.encode_texts(editor, [edit.DEFAULT_REWARD_TEXT] * 2)
  scores = np.full((2, 3), 5.0, np.float32)
  cond = sampling.Conditioning(pixels, context, null, scores, reward, sampling.seed_keys([0, 1]))
  other = cond._replace(null_context=np.random.default_rng(2).standard_normal(null.shape).astype(np.float32))
  one = np.ones(2, np.float32)
  run = lambda c, g: np.asarray(fn(editor.unet_params, editor.vae_params, c._replace(init_noise=init_noise), g)[0])
  np.testing.assert_allclose(run(cond, one), run(other, one), atol=1e-5)
  assert np.abs(run(cond, np.array([7.5, 1.5])) - run(other, np.array([7.5, 1.5]))).max() > 1e-3


def test_guide_algebra():
  eps = np.arange(3 * 2 * 4, dtype=np.float32).reshape(3, 2, 4) ** 1.5
  text, image, uncond = eps
  out = np.asarray(sampling.guide(eps.reshape(6, 4), 7.5, 1.5)).reshape(2, 4)
  np.testing.assert_allclose(out, uncond + 7.5 * (text - image) + 1.5 * (image - uncond), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(sampling.guide(eps.reshape(6, 4), 1.0, 1.0)).reshape(2, 4), text, rtol=1e-6)


def test_rewards_change_the_result(editor, pixels, init_noise):
  best = _ddim(editor, pixels, init_noise)
  low = _ddim(editor, pixels, init_noise, scores=[[0, 0, 0], [1, 2, 0]])
  text = _ddim(editor, pixels, init_noise, reward_texts=["still blurry; not blue; noisy"] * 2)
  assert np.abs(best - low).max() > 1e-3 and np.abs(best - text).max() > 1e-3


def test_seeded_euler_ancestral_depends_only_on_the_example_and_compiles_once(editor, pixels, sampler_traces):
  def run(order, seeds, **kwargs):  # the examples (image, prompt) in `order`, with these seeds
    return edit.edit_arrays(editor, pixels[order], [PROMPTS[i] for i in order], seeds=seeds, steps=STEPS, **kwargs)
  first = run([0, 1], [3, 4])
  assert sampler_traces.since() == {("euler_ancestral", STEPS, pixels.shape): 1}
  sampler_traces.mark()
  np.testing.assert_array_equal(first, run([0, 1], [3, 4]))
  # example 0 with seed 3 at batch position 1, beside another image, prompt and seed: the same result
  moved = run([1, 0], [7, 3])
  np.testing.assert_allclose(moved[1], first[0], rtol=0, atol=1e-5)
  assert np.abs(moved[0] - first[1]).max() > 1e-3  # example 1's seed 7 instead of 4: another result
  run([0, 1], [3, 4], scores=[[1, 1, 1]] * 2, text_guidance=3.0, image_guidance=1.0)
  assert not sampler_traces.since()  # seeds, scores and guidance are traced values: no recompile


def test_non_finite_output_fails_loudly(editor, pixels, init_noise):
  broken = init_noise.copy()
  broken[0, 0, 0, 0] = np.nan
  with pytest.raises(sampling.NonFiniteError, match=r"batch example\(s\) \[0\]"):
    _ddim(editor, pixels, broken)
  with pytest.raises(ValueError, match="scheduler 'plms'"):
    sampling.SamplerSpec("plms", 10)
  with pytest.raises(ValueError, match="num_steps 0"):
    sampling.SamplerSpec("ddim", 0)
