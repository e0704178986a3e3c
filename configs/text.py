"""Text-encoder config: pretrains the embedded demo's text encoder on the synthetic world (CLIP-style).

python main.py --config=configs/text.py --workdir=T
python main.py --config=configs/train.py --config.model.text_encoder=T --workdir=W

Writes T/text_encoder and T/tokenizer (diffusers format) and T/text_eval.json (test retrieval).
The encoder configs/train.py freezes by default (model.text_encoder="synthetic_64px") is this
config's T/text_encoder, T/tokenizer and T/text_eval.json, copied to
mre_jax/models/assets/text_synthetic_64px/.
"""

import ml_collections


def get_config(arg: str | None = None):
  config = ml_collections.ConfigDict()
  config.job = "text"
  config.seed = 0  # the random encoder of a train run with this seed, the scaffolding's init, the batches
  config.num_steps = 2000  # optimiser steps (7.5 and 18 minutes on two 2-core CPU machines)
  config.batch_size = 128  # edits per step (each one's instruction is the others' negative)
  config.lr = 1e-3  # AdamW peak learning rate, cosine decay to 0
  config.weight_decay = 1e-4
  config.embed_dim = 32  # width of the shared embedding (the head and the edit CNN's output)
  config.eval_count = 140  # held-out edits for the retrieval measure
  config.log_every = 100

  config.data = ml_collections.ConfigDict()
  config.data.name = "synthetic_edit"  # a builder in data/ with original/truth images and instructions
  config.data.builder_config = "64px"
  config.data.data_dir = ""  # where TFDS data is built/read ("" = <workdir>/tfds)

  if arg == "quick":  # a smoke run for tests
    config.num_steps = 30
    config.batch_size = 16
    config.eval_count = 7
    config.log_every = 10
    config.data.builder_config = "tiny"
  elif arg not in (None, ""):
    raise ValueError(f"configs/text.py: unknown variant {arg!r} (expected quick)")
  return config
