"""Contrastive pretraining of the demo's text encoder on a data/ builder's edits (synthetic_edit).

SD's U-Net reads a text encoder that was pretrained on image-text pairs (CLIP) and then frozen; the
demo's random one leaves the U-Net to find a colour word among ~70 near-constant padding states,
and local edits stay unlearnt (docs/experiments.md). The `text` job (mre_jax/jobs/text.py)
trains the tiny CLIP text encoder the way CLIP was trained, at the scale of the synthetic world:
InfoNCE between the encoder's pooled output (through a linear head) and a small CNN's embedding of
the edit it describes (original, truth and their difference), each instruction a random paraphrase
of its edit. Only the text encoder is kept (diffusers folder text_encoder/, with its tokenizer/);
the head and the CNN are training scaffolding, as CLIP's image tower is for SD.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mre_jax import models
from mre_jax.io import pretrained


class EditEncoder(nn.Module):
  """(original, truth) [B, S, S, 6] in [-1, 1] -> embedding [B, dim]: strided 3x3 convolutions over
  both images and their difference, mean-pooled, then a linear layer."""

  dim: int
  widths: tuple[int, ...] = (32, 64, 64, 128)

  @nn.compact
  def __call__(self, pair: jax.Array) -> jax.Array:
    x = jnp.concatenate([pair, pair[..., 3:] - pair[..., :3]], axis=-1)
    for width in self.widths:
      x = nn.silu(nn.Conv(width, (3, 3), strides=2)(x))
    return nn.Dense(self.dim)(x.mean(axis=(1, 2)))


def init_params(text_encoder: models.CLIPTextEncoder, text_params: Any, edit_encoder: EditEncoder,
                image_size: int, seed: int) -> dict:
  """{"text", "edit", "head", "logit_scale"}: the text encoder's params and fresh scaffolding."""
  k_edit, k_head = jax.random.split(jax.random.PRNGKey(seed))
  width = text_encoder.config.hidden_size
  return {"text": text_params,
          "edit": edit_encoder.init(k_edit, jnp.zeros((1, image_size, image_size, 6)))["params"],
          "head": nn.Dense(edit_encoder.dim).init(k_head, jnp.zeros((1, width)))["params"],
          "logit_scale": jnp.asarray(np.log(1 / 0.07), jnp.float32)}  # CLIP's initial temperature


def embed(params: dict, pairs: jax.Array, ids: jax.Array, *, text_encoder: models.CLIPTextEncoder,
          edit_encoder: EditEncoder) -> tuple[jax.Array, jax.Array]:
  """(edit embeddings, text embeddings), each [B, dim] and of unit length."""
  _, pooled = pretrained.encode_text(text_encoder, params["text"], ids)
  text = nn.Dense(edit_encoder.dim).apply({"params": params["head"]}, pooled)
  edit = edit_encoder.apply({"params": params["edit"]}, pairs)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  return unit(edit), unit(text)


def loss_fn(params: dict, pairs: jax.Array, ids: jax.Array, **modules: Any) -> jax.Array:
  """CLIP's symmetric InfoNCE over the batch (example i's instruction belongs to example i's edit);
  the logit scale is learnt and capped at 100, as CLIP's."""
  edit, text = embed(params, pairs, ids, **modules)
  logits = jnp.exp(jnp.minimum(params["logit_scale"], np.log(100.0))) * edit @ text.T
  labels = jnp.arange(edit.shape[0])
  return 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())


def optimizer(lr: float, num_steps: int, weight_decay: float) -> optax.GradientTransformation:
  return optax.adamw(optax.cosine_decay_schedule(lr, num_steps), weight_decay=weight_decay)


def train_step(params: dict, opt_state: optax.OptState, pairs: jax.Array, ids: jax.Array, *,
               tx: optax.GradientTransformation, **modules: Any) -> tuple[dict, optax.OptState, jax.Array]:
  loss, grads = jax.value_and_grad(functools.partial(loss_fn, **modules))(params, pairs, ids)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


def retrieval_accuracy(edit: np.ndarray, text: np.ndarray) -> float:
  """Share of edits whose own instruction (row i of `text`) is the most similar of all rows."""
  similarity = np.asarray(edit) @ np.asarray(text).T
  return float(np.mean(np.argmax(similarity, axis=1) == np.arange(len(similarity))))
