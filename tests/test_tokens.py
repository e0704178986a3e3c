"""The one CLIP tokenization (mre_jax/data/tokens.py): SD 1.5's padding and truncation."""

import pickle
import re

import numpy as np

from mre_jax.data import synthetic, tokens
from mre_jax.io import pretrained
from mre_jax.models import tiny


def _tokenizer(tmp_path):
  tiny.write_tokenizer(tmp_path / "model" / "tokenizer")
  return pretrained.load_tokenizer(tmp_path / "model")


def test_pads_with_the_pad_token_to_77(tmp_path):
  tokenizer = _tokenizer(tmp_path)
  ids = tokens.tokenize(tokenizer, ["make the sky blue", "None; None; None", ""])
  assert ids.shape == (3, tokens.MAX_LENGTH) == (3, 77) and ids.dtype == np.int32
  bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
  assert tokenizer.pad_token_id == eos  # SD 1.5's tokenizer pads with <|endoftext|>
  for row, text in zip(ids, ["make the sky blue", "None; None; None", ""]):
    words = tokenizer(text).input_ids  # unpadded: <|startoftext|> ... <|endoftext|>
    assert row[0] == bos and list(row[:len(words)]) == words
    assert (row[len(words):] == tokenizer.pad_token_id).all()
  assert list(ids[2, :2]) == [bos, eos]


def test_truncates_at_77_keeping_the_end_of_text(tmp_path):
  tokenizer = _tokenizer(tmp_path)
  long_text = " ".join(["sky"] * 200)
  [row] = tokens.tokenize(tokenizer, [long_text])
  assert row.shape == (77,) and row[0] == tokenizer.bos_token_id and row[-1] == tokenizer.eos_token_id
  assert list(row[:-1]) == tokenizer(long_text).input_ids[:76]


def test_tokenize_fn_pickles_and_matches(tmp_path):
  tokenizer = _tokenizer(tmp_path)
  fn = pickle.loads(pickle.dumps(tokens.tokenize_fn(tokenizer)))  # as grain's worker processes get it
  texts = ["make it red", "None; None; None"]
  np.testing.assert_array_equal(fn(texts), tokens.tokenize(tokenizer, texts))


def test_every_word_of_the_synthetic_world_is_one_token_of_the_demo_tokenizer(tmp_path):
  # The demo's text encoder reads the world's instructions and reward texts; a word outside the
  # tokenizer's merges is spelled out byte by byte, which a random text encoder scrambles.
  tokenizer = _tokenizer(tmp_path)
  words = set()
  for split in synthetic.SPLITS:
    for i in range(150):
      ex = synthetic.make_example(i, split, seed=0, size=32)
      for text in list(ex["instructions"]) + list(ex["reward_texts"]):
        words.update(re.findall(r"[a-z]+", text.lower()))
  assert {"left", "cyan", "striped", "warmer", "gradient"} <= words  # the sample covers the world
  spelled = sorted(w for w in words if len(tokenizer(w).input_ids) != 3)  # <|startoftext|> w <|endoftext|>
  assert not spelled, f"words the demo tokenizer spells out: {spelled}"
