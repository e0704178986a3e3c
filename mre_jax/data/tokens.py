"""The one CLIP tokenization, shared by training batches, sample grids and editing.

As Stable Diffusion 1.5 tokenizes its prompts: a transformers `CLIPTokenizer` (loaded from a
diffusers folder by mre_jax.io.pretrained.load_tokenizer), `<|startoftext|>` first, the text
truncated so that `<|endoftext|>` ends the 77 positions at the latest, and padded to 77 with the
tokenizer's pad token (`<|endoftext|>` in SD 1.5's tokenizer). Numpy only: grain's worker
processes unpickle `tokenize_fn` without importing JAX.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import numpy as np

MAX_LENGTH = 77  # CLIP's text context (max_position_embeddings)


def tokenize(tokenizer: Any, texts: Sequence[str]) -> np.ndarray:
  """Texts -> int32 ids [N, 77], padded to 77 with the pad token and truncated at 77."""
  return tokenizer(list(texts), padding="max_length", max_length=MAX_LENGTH, truncation=True,
                   return_tensors="np").input_ids.astype(np.int32)


def tokenize_fn(tokenizer: Any) -> Callable[[Sequence[str]], np.ndarray]:
  """`tokenize` bound to `tokenizer`, picklable (the input pipeline's `tokenize_fn`)."""
  return functools.partial(tokenize, tokenizer)
