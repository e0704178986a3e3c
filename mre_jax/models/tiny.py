"""The embedded demo's model: the tiny U-Net architecture, the shipped VAEs, and the frozen parts
(tokenizer/, text_encoder/, vae/, scheduler/) a `model.init=tiny` run writes, in diffusers format,
needing neither PyTorch nor a download (mre_jax.testing adds a whole random model folder). The
tokenizer is a real CLIP BPE tokenizer over a small vocabulary: every byte, plus whole-word
merges for common edit words.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable

from mre_jax import models
from mre_jax.data import tokens
from mre_jax.io import export, pretrained, weights

UNET = models.UNetConfig(
    block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8, cross_attention_dim=32,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    sample_size=8)
VAE = {
    "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "norm_num_groups": 8, "act_fn": "silu",
    "sample_size": 64, "scaling_factor": 0.18215,
}
WORDS = (
    "a an the it to of and in on with make turn change add remove put give let be is are as into from "
    "red green blue yellow orange purple pink white black gray brown color colour background sky "
    "square circle triangle star stripes dots texture wood stone brick grass water snow winter summer "
    "night day sunset style painting sketch cartoon watercolor bright dark darker brighter warm cool "
    "tone image photo picture none still changed noisy blurry blocky missing not was wrong "
    # the rest of the synthetic world's instructions and reward texts (tests/test_tokens.py checks
    # that each of its words is one token: spelled out letter by letter, "top left" was 7 tokens)
    "grey cyan gradient plain striped dotted checkered pattern top bottom left right centre at "
    "warmer cooler whole pencil pop art poster negative look looks like paint delete take away get "
    "rid place replace removed only partly barely faintly slightly visible there has does no "
    "artifacts").split()


def text_config(vocab_size: int) -> dict:
  return {
      "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": vocab_size,
      "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
      "max_position_embeddings": tokens.MAX_LENGTH, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
      "projection_dim": 32, "bos_token_id": vocab_size - 2, "eos_token_id": 2, "pad_token_id": 1,
  }


def write_tokenizer(folder: str | os.PathLike, words: Iterable[str] = WORDS) -> int:
  """A CLIP BPE tokenizer in `folder` that keeps each of `words` whole (one token); returns its
  vocabulary size (end-of-text has the top id)."""
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  chars = pretrained.bpe_byte_symbols()
  vocab = chars + [c + "</w>" for c in chars]
  ranks: dict[tuple[str, str], int] = {}
  for word in dict.fromkeys(words):
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
      # BPE applies the lowest-ranked merge first, so a merge made for an earlier word ("r e" of
      # "red") can split a later one ("g re e n"): merge what BPE leaves, with a new last-ranked
      # merge, until the word is one token. Later merges never change how earlier words split.
      pieces = _bpe(pieces, ranks)
      if len(pieces) > 1:
        ranks[(pieces[0], pieces[1])] = len(ranks)
        vocab.append(pieces[0] + pieces[1])
  merges = [f"{a} {b}" for a, b in ranks]
  vocab = list(dict.fromkeys(vocab)) + ["<|startoftext|>", "<|endoftext|>"]
  (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
  (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
  (folder / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "CLIPTokenizer", "model_max_length": tokens.MAX_LENGTH, "bos_token": "<|startoftext|>",
      "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
      "do_lower_case": True}))
  return len(vocab)


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
  """CLIP's BPE on one word's symbols: merge the lowest-ranked adjacent pair until none is known."""
  while len(pieces) > 1:
    pair = min(zip(pieces, pieces[1:]), key=lambda p: ranks.get(p, len(ranks)))
    if pair not in ranks:
      break
    out, i = [], 0
    while i < len(pieces):
      if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == pair:
        out.append(pieces[i] + pieces[i + 1])
        i += 2
      else:
        out.append(pieces[i])
        i += 1
    pieces = out
  return pieces


# Trained parts shipped with the package, by name: VAEs (diffusers folders holding vae/), written by
# the vae job, and text encoders (folders holding text_encoder/ and tokenizer/), written by the text job.
ASSETS = Path(__file__).parent / "assets"
# synthetic_64px_sharp: synthetic_64px's decoder fine-tuned adversarially (configs/vae.py:adversarial);
# the same encoder, so the same latents and caches, and sharper edges when decoded.
VAES = {"synthetic_64px": ASSETS / "vae_synthetic_64px", "synthetic_64px_sharp": ASSETS / "vae_synthetic_64px_sharp",
        "synthetic_64px_cond": ASSETS / "vae_synthetic_64px_cond"}
TEXT_ENCODERS = {"synthetic_64px": ASSETS / "text_synthetic_64px"}


def _shipped_folder(name: str, shipped: dict[str, Path], component: str, what: str, expected: str) -> Path | None:
  """shipped[name], or the path `name`, holding `component`/config.json; None for ""."""
  if not name:
    return None
  folder = shipped.get(name, Path(name))
  if not (folder / component / "config.json").is_file():
    raise FileNotFoundError(f"{what} {name!r}: {folder / component / 'config.json'} does not exist (expected one of "
                            f"{sorted(shipped)} or {expected})")
  return folder


def vae_folder(name: str) -> Path | None:
  """The diffusers folder (with vae/) of `name`: a shipped VAE's name, a path, or "" (None: random)."""
  return _shipped_folder(name, VAES, "vae", "VAE", "a diffusers folder holding vae/")


def text_encoder_folder(name: str) -> Path | None:
  """The folder (with text_encoder/ and tokenizer/) of `name`: a shipped encoder's name, a path, or "" (None: random)."""
  return _shipped_folder(name, TEXT_ENCODERS, "text_encoder", "text encoder", "a folder written by the text job")


def write_frozen_parts(folder: str | os.PathLike, seed: int = 0, vae: str = "", scheduler: dict | None = None,
                       text_encoder: str = "") -> Path:
  """Tiny tokenizer/, text_encoder/ and scheduler/ in diffusers format, and vae/: random tiny, or
  copied from `vae` (see `vae_folder`). The text encoder is random, or copied from the folder
  `text_encoder` (holding text_encoder/ and tokenizer/: what the `text` job writes), whose
  tokenizer must be this one. `scheduler`: keys of SD 1.5's scheduler config
  (export.SCHEDULER_CONFIG) to change, for example the beta schedule."""
  unknown = sorted(set(scheduler or {}) - set(export.SCHEDULER_CONFIG))
  if unknown:
    raise ValueError(f"scheduler config keys {unknown}: expected some of {sorted(export.SCHEDULER_CONFIG)}")
  folder = Path(folder)
  vocab_size = write_tokenizer(folder / "tokenizer")
  text = pretrained.make_text_encoder(text_config(vocab_size))
  text_params = weights.init_like_torch(pretrained.text_encoder_param_shapes(text), seed + 2)
  source = vae_folder(vae)
  if source is None:
    vae_module = pretrained.make_vae(VAE)
    vae_params = weights.init_like_torch(pretrained.vae_param_shapes(vae_module), seed + 1)
    export.write_component(folder / "vae", VAE, pretrained.vae_state_dict(vae_params), export.UNET_WEIGHTS)
  else:
    shutil.copytree(source / "vae", folder / "vae")
  source = text_encoder_folder(text_encoder)
  if source is not None:
    for name in ("vocab.json", "merges.txt"):
      theirs = source / "tokenizer" / name
      if not theirs.is_file() or theirs.read_bytes() != (folder / "tokenizer" / name).read_bytes():
        raise ValueError(f"text encoder {text_encoder!r}: {theirs} is missing or differs from the demo "
                         "tokenizer's (expected a folder written by the text job)")
    pretrained.load_text_encoder(source)  # fails early, naming the file, if the weights do not load
    shutil.copytree(source / "text_encoder", folder / "text_encoder")
  else:
    export.write_component(folder / "text_encoder", text_config(vocab_size),
                           pretrained.text_encoder_state_dict(text_params), export.TEXT_WEIGHTS)
  (folder / "scheduler").mkdir(exist_ok=True)
  (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({**export.SCHEDULER_CONFIG, **(scheduler or {})}))
  return folder


