"""Our CLIP text encoder (mre_jax/models/clip.py) against transformers' PyTorch CLIPTextModel."""

import jax.numpy as jnp
import numpy as np
import pytest

from mre_jax.io import pretrained
from mre_jax.models import tiny

torch = pytest.importorskip("torch")
import parity  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

VOCAB = 1000
# tiny: end-of-text found by its id (transformers' current convention), which here is not the
# highest id (start-of-text is); 768-d: SD 1.5's ViT-L/14 widths (12 heads of 64, MLP 3072) with
# 2 of its 12 layers and a small vocabulary, end-of-text found as the highest id (SD 1.5's
# config: eos_token_id 2, end-of-text the top id).
CONFIGS = {"tiny": {**tiny.text_config(VOCAB), "bos_token_id": VOCAB - 1, "eos_token_id": VOCAB - 2},
           "768d": {**tiny.text_config(VOCAB), "hidden_size": 768, "intermediate_size": 3072,
                    "num_attention_heads": 12, "projection_dim": 768}}


def _pair(config, seed, dtype=jnp.float32):
  ref = parity.randomize(CLIPTextModel(CLIPTextConfig(**config)), seed)
  module = pretrained.make_text_encoder(config, dtype)
  return ref, module, pretrained.text_encoder_params(parity.state_dict(ref), module)


def _ids(config, seed):
  """[3, 77]: start, words, end-of-text, padding (end-of-text again; "" is the third row)."""
  start, end = (VOCAB - 2, VOCAB - 1) if config["eos_token_id"] == 2 else (config["bos_token_id"], config["eos_token_id"])
  r = np.random.default_rng(seed)
  ids = np.full((3, 77), end, np.int32)
  ids[:, 0] = start
  for row, n in enumerate((6, 40, 0)):
    ids[row, 1:1 + n] = r.integers(0, VOCAB - 2, n)
  return ids


def _torch_outputs(ref, ids):
  with torch.no_grad():
    out = ref(torch.tensor(ids, dtype=torch.long))
  return out.last_hidden_state.float().numpy(), out.pooler_output.float().numpy()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hidden_states_and_pooled_output_match_torch_in_float32(name):
  ref, module, params = _pair(CONFIGS[name], seed=1)
  ids = _ids(CONFIGS[name], seed=2)
  hidden, pooled = pretrained.encode_text(module, params, ids)
  want_hidden, want_pooled = _torch_outputs(ref, ids)
  assert parity.rel_err(hidden, want_hidden) < 1e-4
  assert parity.rel_err(pooled, want_pooled) < 1e-4
  # the pooled output is the end-of-text position, which differs between the texts
  assert np.abs(np.asarray(pooled[0]) - np.asarray(pooled[1])).max() > 1e-3


@pytest.mark.parametrize("name", list(CONFIGS))
def test_text_encoder_in_bfloat16_is_as_close_as_torch_autocast(name):
  ref, module, params = _pair(CONFIGS[name], seed=3, dtype=jnp.bfloat16)
  ids = _ids(CONFIGS[name], seed=4)
  want = _torch_outputs(ref, ids)
  with parity.autocast_bf16():
    torch_bf16 = _torch_outputs(ref, ids)
  ours = pretrained.encode_text(module, params, ids)
  assert ours[0].dtype == jnp.bfloat16
  for got, half, full, what in zip(ours, torch_bf16, want, ("hidden", "pooled")):
    parity.assert_bf16_close(got, half, full, what)


def test_unsupported_activation_is_an_error():
  with pytest.raises(ValueError, match="text_encoder config: hidden_act 'relu' is not supported"):
    pretrained.make_text_encoder({**tiny.text_config(VOCAB), "hidden_act": "relu"})
