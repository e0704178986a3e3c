"""Frozen parts against PyTorch: CLIP text encoder, VAE; loader errors."""

import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mre_jax import pretrained, weights

torch = pytest.importorskip("torch")
from diffusers import AutoencoderKL  # noqa: E402
from transformers import CLIPTextModel  # noqa: E402


def _rel_err(a, b):
  return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def test_text_encoder_hidden_states_and_pooled_output_match_torch(tiny_folder):
  module, params = pretrained.load_text_encoder(tiny_folder)
  tokenizer = pretrained.load_tokenizer(tiny_folder)
  ids = pretrained.tokenize(tokenizer, ["make the sky blue", "None; None; None", ""])
  assert ids.shape == (3, 77) and ids.dtype == np.int32
  hidden, pooled = pretrained.encode_text(module, params, ids)
  ref = CLIPTextModel.from_pretrained(tiny_folder / "text_encoder").eval()
  with torch.no_grad():
    out = ref(torch.tensor(ids, dtype=torch.long))
  assert _rel_err(hidden, out.last_hidden_state.numpy()) < 1e-5
  assert _rel_err(pooled, out.pooler_output.numpy()) < 1e-5
  # the pooled output is the end-of-text position, which differs between the texts
  assert np.abs(np.asarray(pooled[0]) - np.asarray(pooled[1])).max() > 1e-3


def test_vae_encode_mode_and_decode_match_torch(tiny_folder, rng):
  vae, params = pretrained.load_vae(tiny_folder)
  ref = AutoencoderKL.from_pretrained(tiny_folder / "vae").eval()
  images = rng.uniform(-1, 1, (2, 32, 48, 3)).astype(np.float32)
  mean, logvar = pretrained.vae_encode(vae, params, images)
  with torch.no_grad():
    dist = ref.encode(torch.tensor(images.transpose(0, 3, 1, 2))).latent_dist
    ref_mode = dist.mode().numpy().transpose(0, 2, 3, 1)
    ref_logvar = dist.logvar.numpy().transpose(0, 2, 3, 1)
    latents = rng.standard_normal((2, 4, 6, 4)).astype(np.float32)
    ref_decoded = ref.decode(torch.tensor(latents.transpose(0, 3, 1, 2))).sample.numpy().transpose(0, 2, 3, 1)
  assert mean.shape == (2, 4, 6, 4)
  assert _rel_err(mean, ref_mode) < 1e-4
  assert _rel_err(logvar, ref_logvar) < 1e-4
  assert _rel_err(pretrained.vae_decode(vae, params, latents), ref_decoded) < 1e-4


def test_legacy_vae_attention_names_load(tiny_folder, tmp_path):
  """Old SD checkpoints name the VAE attention query/key/value/proj_attn, with 1x1-conv weights."""
  shutil.copytree(tiny_folder, tmp_path / "m")
  file = tmp_path / "m" / "vae" / "diffusion_pytorch_model.safetensors"
  state = load_file(str(file))
  renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  legacy = {}
  for key, value in state.items():
    for new, old in renames.items():
      if f".attentions.0.{new}." in key:
        key = key.replace(f".{new}.", f".{old}.")
        value = value[:, :, None, None] if value.ndim == 2 else value
    legacy[key] = value
  assert legacy.keys() != state.keys()
  save_file(legacy, str(file))
  _, params = pretrained.load_vae(tmp_path / "m")
  _, expected = pretrained.load_vae(tiny_folder)
  np.testing.assert_array_equal(params["encoder"]["mid_block"]["attentions_0"]["query"]["kernel"],
                                expected["encoder"]["mid_block"]["attentions_0"]["query"]["kernel"])


@pytest.fixture
def broken(tiny_folder, tmp_path):
  target = tmp_path / "m"
  shutil.copytree(tiny_folder, target)
  return target


def _edit_weights(folder, fn):
  file = folder / "text_encoder" / "model.safetensors"
  state = load_file(str(file))
  fn(state)
  save_file(state, str(file))


def test_loader_errors_name_the_problem(broken):
  _edit_weights(broken, lambda s: s.update({"text_model.extra.weight": np.zeros(3, np.float32)}))
  with pytest.raises(weights.WeightMismatchError, match=r"unexpected keys \(1\): text_model.extra.weight"):
    pretrained.load_text_encoder(broken)
  _edit_weights(broken, lambda s: (s.pop("text_model.extra.weight"), s.pop("text_model.final_layer_norm.bias")))
  with pytest.raises(weights.WeightMismatchError, match="missing keys.*final_layer_norm/bias"):
    pretrained.load_text_encoder(broken)
  _edit_weights(broken, lambda s: s.update({"text_model.final_layer_norm.bias": np.zeros(5, np.float32)}))
  with pytest.raises(weights.WeightMismatchError, match=r"final_layer_norm.bias: \(5,\) does not fit"):
    pretrained.load_text_encoder(broken)
  (broken / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors: cannot read"):
    pretrained.load_vae(broken)
  (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="vae: no weights file"):
    pretrained.load_vae(broken)
  shutil.rmtree(broken / "tokenizer")
  with pytest.raises(FileNotFoundError, match="tokenizer: missing folder"):
    pretrained.load_tokenizer(broken)
  (broken / "text_encoder" / "config.json").unlink()
  with pytest.raises(FileNotFoundError, match="text_encoder/config.json: missing file"):
    pretrained.load_text_encoder(broken)


def test_bin_weights_are_read_without_unpickling_code(tiny_folder, tmp_path):
  shutil.copytree(tiny_folder, tmp_path / "m")
  folder = tmp_path / "m" / "text_encoder"
  state = load_file(str(folder / "model.safetensors"))
  torch.save({k: torch.tensor(v) for k, v in state.items()}, folder / "pytorch_model.bin")
  (folder / "model.safetensors").unlink()
  _, params = pretrained.load_text_encoder(tmp_path / "m")
  _, expected = pretrained.load_text_encoder(tiny_folder)
  np.testing.assert_array_equal(params["text_model"]["final_layer_norm"]["scale"],
                                expected["text_model"]["final_layer_norm"]["scale"])

  class Evil:
    def __reduce__(self):
      return (print, ("pickled code ran",))

  torch.save({"x": Evil()}, folder / "pytorch_model.bin")
  with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
    pretrained.load_text_encoder(tmp_path / "m")


@pytest.mark.parametrize("implementation", ["xla", "auto"])  # diffusers' math; the fused CPU kernel
def test_attention_kernel_matches_torch_sdpa_for_self_and_cross_attention(rng, monkeypatch, implementation):
  monkeypatch.setattr(pretrained, "_ATTENTION", [implementation])
  heads, d = 4, 8
  for t, s in ((16, 16), (16, 7)):  # self-attention, cross-attention over 7 context tokens
    q, k, v = (rng.standard_normal((2, n, heads * d)).astype(np.float32) for n in (t, s, s))
    out = np.asarray(pretrained.multi_head_attention(q, k, v, heads))
    split = lambda x: torch.from_numpy(x).reshape(2, -1, heads, d).transpose(1, 2)
    want = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
    np.testing.assert_allclose(out, want.transpose(1, 2).reshape(2, t, heads * d).numpy(), atol=1e-5)


@pytest.mark.parametrize("t, s", [(32, 32), (32, 24)])
def test_blocked_attention_and_its_gradients_match_torch_sdpa(rng, monkeypatch, t, s):
  import jax
  import jax.numpy as jnp
  monkeypatch.setattr(pretrained, "_ATTENTION", ["xla"])  # XLA's ops, not the fused CPU kernel
  monkeypatch.setattr(pretrained, "_BLOCKED_MIN_TOKENS", 1)  # the blocked kernel for these small shapes,
  monkeypatch.setattr(pretrained, "_BLOCK_SCORES", 2 * 8 * s)  # in blocks of 8 query rows
  b, heads, d = 2, 3, 8
  q, k, v = (rng.standard_normal((b, n, heads * d)).astype(np.float32) for n in (t, s, s))
  d_out = rng.standard_normal((b, t, heads * d)).astype(np.float32)
  out, vjp = jax.vjp(lambda *a: pretrained.multi_head_attention(*a, heads), q, k, v)
  grads = jax.jit(vjp)(jnp.asarray(d_out))
  split = lambda x: torch.from_numpy(x).reshape(b, -1, heads, d).transpose(1, 2).requires_grad_()
  tq, tk, tv = split(q), split(k), split(v)
  want = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv).transpose(1, 2).reshape(b, t, heads * d)
  want.backward(torch.from_numpy(d_out))
  np.testing.assert_allclose(out, want.detach().numpy(), atol=1e-5)
  for got, x in zip(grads, (tq, tk, tv)):
    np.testing.assert_allclose(got, x.grad.transpose(1, 2).reshape(got.shape).numpy(), atol=1e-5)
  # bfloat16 inputs: float32 softmax inside, bfloat16 out
  half = pretrained.multi_head_attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), heads)
  assert half.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(half, np.float32), out, atol=0.05)


def test_attention_setting_reaches_the_unet_and_cudnn_is_gpu_only(monkeypatch):
  import jax
  import jax.numpy as jnp
  from mre_jax import models, tiny
  assert pretrained.attention_implementation(jnp.bfloat16) in ("xla", "cpu")  # cuDNN only on a GPU
  with pytest.raises(ValueError, match="expected one of"):
    pretrained.set_attention("flash")
  model = models.RewardUNet(tiny.UNET)
  params = models.unet_param_shapes(model)  # shapes suffice: the U-Net is only traced
  args = (jnp.zeros((1, 8, 8, 8)), jnp.zeros((1,)), jnp.zeros((1, 77, 32)), jnp.zeros((1, 3)), jnp.zeros((1, 32)))
  calls = []
  real = pretrained.multi_head_attention
  monkeypatch.setattr(pretrained, "multi_head_attention", lambda *a: calls.append(a[0].shape) or real(*a))
  jax.eval_shape(lambda p: model.apply({"params": p}, *args), params)
  # tiny.UNET: transformer blocks 1 down and 2 up at 8x8 (width 32), 1 in the mid block at 4x4
  # (width 64); each has a self- and a cross-attention
  assert sorted(calls) == [(1, 16, 64)] * 2 + [(1, 64, 32)] * 6
