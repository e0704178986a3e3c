"""Loading frozen parts from diffusers folders (checked against PyTorch loading the same folder); loader errors."""

import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mre_jax.data import tokens
from mre_jax.io import pretrained, weights

torch = pytest.importorskip("torch")
from diffusers import AutoencoderKL  # noqa: E402
from transformers import CLIPTextModel  # noqa: E402


def _rel_err(a, b):
  return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def test_loaded_text_encoder_matches_torch_loading_the_same_folder(tiny_folder):
  module, params = pretrained.load_text_encoder(tiny_folder)
  tokenizer = pretrained.load_tokenizer(tiny_folder)
  ids = tokens.tokenize(tokenizer, ["make the sky blue", "None; None; None", ""])
  assert ids.shape == (3, 77) and ids.dtype == np.int32
  hidden, pooled = pretrained.encode_text(module, params, ids)
  ref = CLIPTextModel.from_pretrained(tiny_folder / "text_encoder").eval()
  with torch.no_grad():
    out = ref(torch.tensor(ids, dtype=torch.long))
  assert _rel_err(hidden, out.last_hidden_state.numpy()) < 1e-5
  assert _rel_err(pooled, out.pooler_output.numpy()) < 1e-5
  # the pooled output is the end-of-text position, which differs between the texts
  assert np.abs(np.asarray(pooled[0]) - np.asarray(pooled[1])).max() > 1e-3


def test_loaded_vae_encode_mode_and_decode_match_torch_loading_the_same_folder(tiny_folder, rng):
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


def test_text_encoder_saved_without_the_text_model_prefix_loads(tiny_folder, tmp_path):
  """transformers 5 saves CLIPTextModel's tensors without transformers 4's `text_model.` prefix."""
  shutil.copytree(tiny_folder, tmp_path / "m")
  file = tmp_path / "m" / "text_encoder" / "model.safetensors"
  save_file({k.removeprefix("text_model."): v for k, v in load_file(str(file)).items()}, str(file))
  _, params = pretrained.load_text_encoder(tmp_path / "m")
  _, expected = pretrained.load_text_encoder(tiny_folder)
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(expected)):
    np.testing.assert_array_equal(a, b)


def test_byte_symbols_are_gpt2s():
  """GPT-2's byte table (which CLIP's BPE uses): the 188 visible bytes, "!" first, stand for
  themselves; the 68 others follow from U+0100: byte 0 -> "Ā", the space -> "Ġ", the soft hyphen -> "Ń"."""
  symbols = pretrained.bpe_byte_symbols()
  assert len(set(symbols)) == 256 and symbols[0] == "!" and symbols[187] == "ÿ"
  assert symbols[188] == "Ā" and symbols[188 + 32] == "Ġ" and symbols[-1] == "Ń"


def test_tiny_tokenizer_knows_every_byte_symbol_of_clips_tokenizer(tiny_folder):
  """The tiny vocabulary is built from `bpe_byte_symbols`; a symbol that differed from the one CLIP's
  tokenizer uses for a byte would be unknown (the end-of-text id) in the middle of a text."""
  tokenizer = pretrained.load_tokenizer(tiny_folder)
  end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
  # ASCII, Latin-1 letters (visible bytes) and "≤" (UTF-8 e2 89 a4: 0x89 is one of the remapped bytes)
  for text in ("make it 100% blue!", "héllo wörld ¿qué? ~ ¬ ®", "x ≤ 3"):
    ids = tokenizer(text).input_ids
    assert end not in ids[1:-1] and ids[-1] == end, (text, ids)


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
