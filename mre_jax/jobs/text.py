"""The `text` job: pretrains the demo's tiny CLIP text encoder on a data/ builder's edits (synthetic_edit).

python main.py --config=configs/text.py --workdir=W

The model and loss are mre_jax.train.text_train's. It starts from the random encoder a
`model.init=tiny` train run would write for the same seed, and writes, in diffusers format:

  W/text_encoder/ (config.json, model.safetensors)   the pretrained encoder
  W/tokenizer/                                      the demo's tokenizer (the encoder's vocabulary)
  W/text_eval.json   test retrieval: the share of held-out edits whose own instruction is the
                     nearest of `eval_count` instructions (chance 1 / eval_count)
  W/metrics.jsonl    the contrastive loss every `log_every` steps

Train with it: `--config.model.text_encoder=W` (configs/train.py).
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np

from mre_jax.data import input_pipeline, tokens
from mre_jax.errors import ConfigError, require_workdir
from mre_jax.io import checkpointing, export, files, pretrained, weights
from mre_jax.models import tiny
from mre_jax.train import text_train


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def load_edits(builder, split: str, limit: int = 0) -> tuple[np.ndarray, list[list[str]]]:
  """(float32 [N, S, S, 6] original and truth in [-1, 1], each edit's paraphrases) of a split."""
  source = input_pipeline.data_source(builder, split)
  count = len(source) if limit <= 0 else min(limit, len(source))
  rows = [source[i] for i in range(count)]
  pairs = np.stack([np.concatenate([r["original"], r["truth"]], axis=-1) for r in rows]).astype(np.float32)
  return pairs / 127.5 - 1.0, [[_text(t) for t in r["instructions"]] for r in rows]


def check_config(config: ml_collections.ConfigDict) -> None:
  if config.num_steps < 1 or config.batch_size < 2:
    raise ConfigError(f"config.num_steps={config.num_steps}, config.batch_size={config.batch_size}: need "
                      "num_steps >= 1 and batch_size >= 2 (the other examples of a batch are the negatives)")
  if config.eval_count < 2:
    raise ConfigError(f"config.eval_count={config.eval_count}: must be >= 2")


def train_text(config: ml_collections.ConfigDict, workdir: str | os.PathLike | None) -> Path:
  """Job: pretrains the text encoder; writes `<workdir>/text_encoder`, `tokenizer/` and `text_eval.json`."""
  workdir = require_workdir(workdir, "the text encoder and its evaluation are written there")
  check_config(config)
  workdir.mkdir(parents=True, exist_ok=True)
  builder = input_pipeline.build_dataset(config.data.name, config.data.data_dir or str(workdir / "tfds"), None,
                                         config=config.data.builder_config)
  train_pairs, train_texts = load_edits(builder, "train")
  test_pairs, test_texts = load_edits(builder, "test", config.eval_count)
  if len(train_texts) < config.batch_size or len(test_texts) < config.eval_count:
    raise ConfigError(f"{config.data.name}:{config.data.builder_config} has {len(train_texts)} training and "
                      f"{len(test_texts)} test edits: fewer than config.batch_size={config.batch_size} or "
                      f"config.eval_count={config.eval_count}")
  tokenizer_dir = workdir / "tokenizer"
  vocab_size = tiny.write_tokenizer(tokenizer_dir)
  tokenizer = pretrained.load_tokenizer(workdir)
  text_cfg = tiny.text_config(vocab_size)
  text_encoder = pretrained.make_text_encoder(text_cfg)
  # The random encoder a train run of this seed starts from (tiny.write_frozen_parts: seed + 2).
  text_params = weights.init_like_torch(pretrained.text_encoder_param_shapes(text_encoder), config.seed + 2)
  edit_encoder = text_train.EditEncoder(config.embed_dim)
  params = jax.device_put(text_train.init_params(text_encoder, text_params, edit_encoder, train_pairs.shape[1],
                                                 config.seed))
  tx = text_train.optimizer(config.lr, config.num_steps, config.weight_decay)
  opt_state = tx.init(params)
  modules = dict(text_encoder=text_encoder, edit_encoder=edit_encoder)
  step_fn = jax.jit(functools.partial(text_train.train_step, tx=tx, **modules), donate_argnums=(0, 1))
  rng, t0 = np.random.default_rng(config.seed), time.time()
  with open(workdir / "metrics.jsonl", "a") as log:
    for step in range(1, config.num_steps + 1):
      idx = rng.choice(len(train_texts), config.batch_size, replace=False)
      texts = [train_texts[i][rng.integers(len(train_texts[i]))] for i in idx]
      params, opt_state, loss = step_fn(params, opt_state, train_pairs[idx], tokens.tokenize(tokenizer, texts))
      if step % config.log_every == 0 or step == config.num_steps:
        log.write(json.dumps({"step": step, "loss": float(loss), "seconds": time.time() - t0}) + "\n")
        log.flush()
        print(f"text step {step}/{config.num_steps}: loss {float(loss):.4f} ({time.time() - t0:.0f} s)", flush=True)
  params = jax.device_get(params)
  edit, text = jax.jit(functools.partial(text_train.embed, **modules))(
      params, test_pairs, tokens.tokenize(tokenizer, [t[0] for t in test_texts]))
  report = {"step": config.num_steps, "test_retrieval_top1": text_train.retrieval_accuracy(edit, text),
            "chance": 1.0 / len(test_texts), "test_edits": len(test_texts), "train_seconds": time.time() - t0,
            "config": config.to_dict()}
  tmp = checkpointing.staging_dir(workdir / "text_encoder")
  export.write_component(tmp, text_cfg, pretrained.text_encoder_state_dict(params["text"]), export.TEXT_WEIGHTS)
  checkpointing.publish(tmp, workdir / "text_encoder")
  files.write_json(workdir / "text_eval.json", report, indent=2)
  print(f"text encoder: test retrieval {report['test_retrieval_top1']:.3f} among {len(test_texts)} "
        f"(chance {report['chance']:.3f}); wrote {workdir / 'text_encoder'}", flush=True)
  return workdir / "text_encoder"
