"""mre_jax.infer.diffusion against diffusers' PyTorch schedulers with SD 1.5's scheduler_config."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
schedulers = pytest.importorskip("diffusers.schedulers")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from diffusers.schedulers import scheduling_euler_ancestral_discrete as ea_module  # noqa: E402

from mre_jax.infer import diffusion, sampling  # noqa: E402

# SD 1.5 scheduler_config.json (runwayml/stable-diffusion-v1-5, scheduler/).
SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
            beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading")
NUM_STEPS = 30
SHAPE = (2, 8, 8, 4)  # NHWC latents
REL = 1e-5


def assert_close(actual, expected, rel=REL):
  """max |actual - expected| <= rel * max |expected| (float32 relative tolerance)."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  err = np.max(np.abs(actual - expected))
  scale = max(np.max(np.abs(expected)), 1e-30)
  assert err <= rel * scale, f"max abs err {err:.3g} > {rel:g} * {scale:.3g}"


def model_eps(rng_table, i, scaled_x):
  """A fixed stand-in "model": a random table entry plus a term depending on its input."""
  return rng_table[i] + 0.1 * scaled_x


@pytest.fixture(scope="module")
def schedule():
  return diffusion.make_schedule()


@pytest.fixture(scope="module")
def eps_table():
  return np.random.default_rng(0).standard_normal((NUM_STEPS,) + SHAPE).astype(np.float32)


@pytest.fixture(scope="module")
def start_noise():
  return np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)


def test_schedule_matches_ddpm(schedule):
  ref = schedulers.DDPMScheduler(**SD15, clip_sample=False)
  assert schedule.num_train_timesteps == 1000
  assert_close(schedule.betas, ref.betas.numpy())
  assert_close(schedule.alphas_cumprod, ref.alphas_cumprod.numpy())
  # Relative per element too: alpha_bar spans 0.0047..0.999.
  np.testing.assert_allclose(schedule.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=REL)
  assert schedule.betas.dtype == jnp.float32


def test_add_noise_matches_ddpm(schedule):
  rng = np.random.default_rng(2)
  latents = rng.standard_normal((5,) + SHAPE[1:]).astype(np.float32)
  noise = rng.standard_normal(latents.shape).astype(np.float32)
  t = np.array([0, 1, 500, 998, 999])
  ref = schedulers.DDPMScheduler(**SD15, clip_sample=False).add_noise(
      torch.from_numpy(latents), torch.from_numpy(noise), torch.from_numpy(t))
  out = diffusion.add_noise(schedule, jnp.asarray(latents), jnp.asarray(noise), jnp.asarray(t))
  assert out.shape == latents.shape and out.dtype == jnp.float32
  assert_close(out, ref.numpy())
  out_bf16 = diffusion.add_noise(schedule, jnp.asarray(latents, jnp.bfloat16),
                                 jnp.asarray(noise, jnp.bfloat16), jnp.asarray(t))
  assert out_bf16.dtype == jnp.bfloat16


def test_sample_timesteps():
  t = diffusion.sample_timesteps(jax.random.key(0), 20000, 1000)
  assert t.shape == (20000,) and jnp.issubdtype(t.dtype, jnp.integer)
  assert int(t.min()) == 0 and int(t.max()) == 999
  assert len(np.unique(np.asarray(t))) == 1000
  assert not np.array_equal(t, diffusion.sample_timesteps(jax.random.key(1), 20000, 1000))


def _torch_scheduler(cls, spacing, **extra):
  sched = cls(**{**SD15, "timestep_spacing": spacing}, **extra)
  sched.set_timesteps(NUM_STEPS)
  return sched


@pytest.mark.parametrize("spacing", diffusion.SPACINGS)
def test_euler_ancestral_matches_diffusers(schedule, eps_table, start_noise, spacing,
                                           monkeypatch):
  ref = _torch_scheduler(schedulers.EulerAncestralDiscreteScheduler, spacing)
  ts, sigmas = diffusion.euler_ancestral_timesteps(schedule, NUM_STEPS, spacing)
  assert ts.shape == (NUM_STEPS,) and sigmas.shape == (NUM_STEPS + 1,)
  np.testing.assert_array_equal(ts, ref.timesteps.numpy())
  assert_close(sigmas, ref.sigmas.numpy())
  np.testing.assert_allclose(sigmas[:-1], ref.sigmas.numpy()[:-1], rtol=REL)
  init = diffusion.init_noise_sigma(sigmas, spacing)
  np.testing.assert_allclose(init, float(ref.init_noise_sigma), rtol=REL)

  step_noise = np.random.default_rng(3).standard_normal((NUM_STEPS,) + SHAPE).astype(np.float32)
  draws = iter(torch.from_numpy(n) for n in step_noise)

  def fake_randn(shape, **kwargs):
    out = next(draws)
    assert tuple(shape) == out.shape
    return out

  monkeypatch.setattr(ea_module, "randn_tensor", fake_randn)
  x_ref = torch.from_numpy(start_noise) * ref.init_noise_sigma
  x = jnp.asarray(start_noise) * init
  for i, t in enumerate(ref.timesteps):
    scaled_ref = ref.scale_model_input(x_ref, t)
    scaled = diffusion.scale_model_input(x, sigmas[i])
    assert_close(scaled, scaled_ref.numpy())
    x_ref = ref.step(model_eps(torch.from_numpy(eps_table), i, scaled_ref), t, x_ref).prev_sample
    x = diffusion.euler_ancestral_step(model_eps(eps_table, i, scaled), sigmas[i],
                                       sigmas[i + 1], x, jnp.asarray(step_noise[i]))
    assert_close(x, x_ref.numpy())
  assert next(draws, None) is None  # diffusers drew exactly one noise tensor per step


@pytest.mark.parametrize("spacing", diffusion.SPACINGS)
def test_euler_matches_diffusers(schedule, eps_table, start_noise, spacing):
  ref = _torch_scheduler(schedulers.EulerDiscreteScheduler, spacing)
  ts, sigmas = diffusion.euler_timesteps(schedule, NUM_STEPS, spacing)
  np.testing.assert_array_equal(ts, ref.timesteps.numpy())
  np.testing.assert_allclose(sigmas[:-1], ref.sigmas.numpy()[:-1], rtol=REL)
  assert float(sigmas[-1]) == 0.0
  init = diffusion.init_noise_sigma(sigmas, spacing)
  np.testing.assert_allclose(init, float(ref.init_noise_sigma), rtol=REL)

  x_ref = torch.from_numpy(start_noise) * ref.init_noise_sigma
  x = jnp.asarray(start_noise) * init
  for i, t in enumerate(ref.timesteps):
    scaled_ref = ref.scale_model_input(x_ref, t)
    scaled = diffusion.scale_model_input(x, sigmas[i])
    x_ref = ref.step(model_eps(torch.from_numpy(eps_table), i, scaled_ref), t, x_ref).prev_sample
    x = diffusion.euler_step(model_eps(eps_table, i, scaled), sigmas[i], sigmas[i + 1], x)
    assert_close(x, x_ref.numpy())


@pytest.mark.parametrize("spacing", diffusion.SPACINGS)
def test_ddim_matches_diffusers(schedule, eps_table, start_noise, spacing):
  ref = _torch_scheduler(schedulers.DDIMScheduler, spacing, clip_sample=False,
                         set_alpha_to_one=False)
  ts, prev = diffusion.ddim_timesteps(schedule, NUM_STEPS, spacing)
  np.testing.assert_array_equal(ts, ref.timesteps.numpy())
  assert int(prev[-1]) < 0 and np.all(np.asarray(prev[:-1]) >= 0)
  assert float(ref.init_noise_sigma) == 1.0

  x_ref = torch.from_numpy(start_noise)
  x = jnp.asarray(start_noise)
  for i, t in enumerate(ref.timesteps):
    eps_ref = model_eps(torch.from_numpy(eps_table), i, ref.scale_model_input(x_ref, t))
    x_ref = ref.step(eps_ref, int(t), x_ref, eta=0.0).prev_sample
    x = diffusion.ddim_step(schedule, model_eps(eps_table, i, x), ts[i], prev[i], x)
    assert_close(x, x_ref.numpy())


def test_sd15_leading_tables(schedule):
  """The release's inference tables: 30 Euler-ancestral steps, t = 958..1."""
  ts, sigmas = diffusion.euler_ancestral_timesteps(schedule, 30)
  assert float(ts[0]) == 958.0 and float(ts[-1]) == 1.0
  # "leading" uses sqrt(sigma_max^2 + 1) with sigma_max = sigma(958) ~ 11.48.
  np.testing.assert_allclose(diffusion.init_noise_sigma(sigmas, "leading"),
                             np.sqrt(float(sigmas[0]) ** 2 + 1), rtol=1e-6)
  assert 11.5 < float(diffusion.init_noise_sigma(sigmas, "leading")) < 11.55
  _, sigmas_trailing = diffusion.euler_ancestral_timesteps(schedule, 30, "trailing")
  assert 14.6 < float(diffusion.init_noise_sigma(sigmas_trailing, "trailing")) < 14.62
  with pytest.raises(ValueError):
    diffusion.euler_ancestral_timesteps(schedule, 30, "bogus")


def _run_samplers(schedule, eps_table, start_noise, loop):
  """Runs all three samplers with `loop(n, body, init)`; returns their final samples."""
  eps_table = jnp.asarray(eps_table)
  ts_e, sig = diffusion.euler_ancestral_timesteps(schedule, NUM_STEPS)
  ts_d, prev = diffusion.ddim_timesteps(schedule, NUM_STEPS)
  key = jax.random.key(7)

  def ancestral(i, x):
    eps = model_eps(eps_table, i, diffusion.scale_model_input(x, sig[i]))
    noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
    return diffusion.euler_ancestral_step(eps, sig[i], sig[i + 1], x, noise)

  def euler(i, x):
    eps = model_eps(eps_table, i, diffusion.scale_model_input(x, sig[i]))
    return diffusion.euler_step(eps, sig[i], sig[i + 1], x)

  def ddim(i, x):
    return diffusion.ddim_step(schedule, model_eps(eps_table, i, x), ts_d[i], prev[i], x)

  x0 = jnp.asarray(start_noise)
  init = diffusion.init_noise_sigma(sig, "leading")
  return (loop(NUM_STEPS, ancestral, x0 * init), loop(NUM_STEPS, euler, x0 * init),
          loop(NUM_STEPS, ddim, x0))


def test_steps_under_jit_and_fori_loop(schedule, eps_table, start_noise):
  def python_loop(n, body, x):
    for i in range(n):
      x = body(i, x)
    return x

  @jax.jit
  def jitted(sched, eps, noise):
    return _run_samplers(sched, eps, noise,
                         lambda n, body, x: jax.lax.fori_loop(0, n, body, x))

  expected = _run_samplers(schedule, eps_table, start_noise, python_loop)
  got = jitted(schedule, jnp.asarray(eps_table), jnp.asarray(start_noise))
  for g, e in zip(got, expected):
    assert g.shape == SHAPE and bool(jnp.all(jnp.isfinite(g)))
    assert_close(g, e, rel=1e-5)
  # The ancestral sampler really is stochastic and the deterministic ones differ from it.
  assert float(jnp.max(jnp.abs(got[0] - got[1]))) > 1e-2


@pytest.mark.parametrize("offset", [0.0, 0.3])
def test_training_noise_offset_is_one_value_per_example_and_channel(offset):
  """The spatial mean of each (example, channel) of the noise has variance offset^2 + 1/(H*W):
  the offset is shared by all pixels (not per pixel, which would add offset^2 per pixel instead)."""
  noise = np.asarray(diffusion.training_noise(jax.random.PRNGKey(0), (512, 16, 16, 8), offset))
  spatial_means = noise.mean(axis=(1, 2))
  np.testing.assert_allclose(spatial_means.var(), offset ** 2 + 1 / 256, rtol=0.1)
  np.testing.assert_allclose((noise - spatial_means[:, None, None]).var(), 1 - 1 / 256, rtol=0.02)


def test_pyramid_noise_has_unit_variance_and_the_expected_low_frequencies():
  """16x16 latents, d = 0.8: levels i = 1..4 repeat N(0, 1) over 2^i blocks, weighted d^i, and the
  sum is divided by sqrt(1 + sum d^(2i)). The whole-image mean of level i averages 256 / 4^i
  independent values, so its variance is d^(2i) 4^i / 256 (1 / 256 for the white part)."""
  d = 0.8
  noise = np.asarray(diffusion.training_noise(jax.random.PRNGKey(0), (1024, 16, 16, 4), pyramid=d))
  norm = 1 + sum(d ** (2 * i) for i in range(1, 5))
  np.testing.assert_allclose(noise.var(), 1.0, rtol=0.02)
  want = sum(d ** (2 * i) * 4 ** i / 256 for i in range(0, 5)) / norm
  np.testing.assert_allclose(noise.mean(axis=(1, 2)).var(), want, rtol=0.1)


def test_velocity_matches_diffusers(schedule):
  rng = np.random.default_rng(4)
  latents = rng.standard_normal((5,) + SHAPE[1:]).astype(np.float32)
  noise = rng.standard_normal(latents.shape).astype(np.float32)
  t = np.array([0, 1, 500, 998, 999])
  ref = schedulers.DDPMScheduler(**SD15, clip_sample=False).get_velocity(
      torch.from_numpy(latents), torch.from_numpy(noise), torch.from_numpy(t))
  assert_close(diffusion.velocity(schedule, jnp.asarray(latents), jnp.asarray(noise), jnp.asarray(t)), ref.numpy())


def _follow_v_reference(spec, schedule, ref, ref_step, eps_table, start_noise, draws):
  """Runs a v-predicting stand-in model through diffusers' scheduler `ref` (one `ref_step(v, t, x)`
  per step) and through our sampler's tables, v -> eps conversion and step (noise `draws[i]` at
  step i, the same draws diffusers is given); asserts that the samples agree after every step."""
  tables = sampling._tables(spec, schedule)
  x_ref = torch.from_numpy(start_noise) * ref.init_noise_sigma
  x = jnp.asarray(start_noise) * tables.init_sigma
  for i, t in enumerate(ref.timesteps):
    v_ref = model_eps(torch.from_numpy(eps_table), i, ref.scale_model_input(x_ref, t))
    x_ref = ref_step(v_ref, t, x_ref).prev_sample
    x_in = sampling._model_input(spec, tables, i, x)
    eps = diffusion.v_to_eps(model_eps(eps_table, i, x_in), x_in, sampling._alpha_bar(spec, schedule, tables, i))
    x = sampling._step(spec, schedule, tables, i, eps, x, jnp.asarray(draws[i]))
    assert_close(x, x_ref.numpy(), rel=1e-4)


@pytest.mark.parametrize("scheduler", ["euler_ancestral", "ddim"])
def test_v_prediction_sampling_matches_diffusers(schedule, eps_table, start_noise, scheduler, monkeypatch):
  """A v-predicting model through the sampler's conversion (v -> eps at the step's noise level)
  and our steps follows diffusers' schedulers configured with prediction_type="v_prediction"."""
  spec = sampling.SamplerSpec(scheduler=scheduler, num_steps=NUM_STEPS, prediction_type="v_prediction")
  draws = np.random.default_rng(3).standard_normal((NUM_STEPS,) + SHAPE).astype(np.float32)
  if scheduler == "ddim":
    ref = _torch_scheduler(schedulers.DDIMScheduler, "leading", clip_sample=False, set_alpha_to_one=False,
                           prediction_type="v_prediction")
  else:
    ref = _torch_scheduler(schedulers.EulerAncestralDiscreteScheduler, "leading", prediction_type="v_prediction")
    step_noise = iter(torch.from_numpy(n) for n in draws)
    monkeypatch.setattr(ea_module, "randn_tensor", lambda shape, **kw: next(step_noise))
  ref_step = (lambda v, t, x: ref.step(v, int(t), x, eta=0.0)) if scheduler == "ddim" else ref.step
  _follow_v_reference(spec, schedule, ref, ref_step, eps_table, start_noise, draws)


def test_unknown_prediction_type_is_named():
  with pytest.raises(ValueError, match="sample"):
    sampling.spec_from_scheduler_config({"prediction_type": "sample"}, "euler", 10)


ZERO_SNR = dict(SD15, rescale_betas_zero_snr=True, timestep_spacing="trailing")


def test_zero_terminal_snr_schedule_matches_diffusers():
  ours = diffusion.make_schedule(rescale_betas_zero_snr=True)
  ref = schedulers.DDPMScheduler(**ZERO_SNR, clip_sample=False)
  assert_close(ours.betas, ref.betas.numpy())
  assert_close(ours.alphas_cumprod, ref.alphas_cumprod.numpy())
  assert float(ours.alphas_cumprod[-1]) == 0.0 and float(ours.alphas_cumprod[0]) == pytest.approx(1 - 0.00085)
  rng = np.random.default_rng(5)
  latents = rng.standard_normal((3,) + SHAPE[1:]).astype(np.float32)
  noise = rng.standard_normal(latents.shape).astype(np.float32)
  t = np.array([0, 500, 999])
  args = [torch.from_numpy(a) for a in (latents, noise, t)]
  assert_close(diffusion.velocity(ours, *map(jnp.asarray, (latents, noise, t))), ref.get_velocity(*args).numpy())
  assert_close(diffusion.add_noise(ours, *map(jnp.asarray, (latents, noise, t))), ref.add_noise(*args).numpy())
  # At the last step the training input holds no trace of the image.
  np.testing.assert_array_equal(diffusion.add_noise(ours, jnp.asarray(latents), jnp.asarray(noise), jnp.asarray(t))[2],
                                noise[2])


def test_zero_terminal_snr_v_prediction_sampling_matches_diffusers(eps_table, start_noise, monkeypatch):
  """Euler ancestral, trailing spacing, zero terminal SNR, v-prediction: the configuration of
  Lin et al. 2023, through the sampler's tables, conversion and step."""
  spec = sampling.spec_from_scheduler_config({**ZERO_SNR, "prediction_type": "v_prediction"}, "euler_ancestral",
                                             NUM_STEPS)
  schedule = spec.make_schedule()
  tables = sampling._tables(spec, schedule)
  ref = schedulers.EulerAncestralDiscreteScheduler(**ZERO_SNR, prediction_type="v_prediction")
  ref.set_timesteps(NUM_STEPS)
  np.testing.assert_array_equal(tables.timesteps, ref.timesteps.numpy())
  assert float(tables.timesteps[0]) == 999.0
  np.testing.assert_allclose(tables.sigmas, ref.sigmas.numpy(), rtol=REL)
  np.testing.assert_allclose(tables.init_sigma, float(ref.init_noise_sigma), rtol=REL)
  draws = np.random.default_rng(3).standard_normal((NUM_STEPS,) + SHAPE).astype(np.float32)
  step_noise = iter(torch.from_numpy(n) for n in draws)
  monkeypatch.setattr(ea_module, "randn_tensor", lambda shape, **kw: next(step_noise))
  _follow_v_reference(spec, schedule, ref, ref.step, eps_table, start_noise, draws)


def test_ddim_with_zero_terminal_snr_is_refused_by_name():
  with pytest.raises(ValueError, match="ddim.*rescale_betas_zero_snr"):
    sampling.spec_from_scheduler_config(ZERO_SNR, "ddim", 10)


@pytest.mark.parametrize("gamma", [1.0, 5.0])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_diffusers(schedule, gamma, prediction_type):
  """The weights of diffusers' training scripts (train_text_to_image.py, --snr_gamma): SNR from
  diffusers.training_utils.compute_snr on the DDPM scheduler, min(SNR, gamma) divided by SNR
  (epsilon) or SNR + 1 (v_prediction)."""
  from diffusers.training_utils import compute_snr
  t = np.arange(1000)
  snr = compute_snr(schedulers.DDPMScheduler(**SD15, clip_sample=False), torch.from_numpy(t))
  capped = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
  ref = capped / snr if prediction_type == "epsilon" else capped / (snr + 1)
  out = diffusion.min_snr_weights(schedule, jnp.asarray(t), gamma, prediction_type)
  assert out.shape == (1000,) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref.numpy(), rtol=1e-4)
  np.testing.assert_array_equal(diffusion.min_snr_weights(schedule, jnp.asarray(t), 0.0, prediction_type), 1.0)


def test_min_snr_weights_name_an_unknown_prediction_type(schedule):
  with pytest.raises(ValueError, match="prediction_type='sample'"):
    diffusion.min_snr_weights(schedule, jnp.arange(3), 5.0, "sample")
