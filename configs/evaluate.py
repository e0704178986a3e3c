"""Evaluate an editing model on Real-Edit with a vision-language judge (SPEC section 5).

python main.py --config=configs/evaluate.py --config.checkpoint=DIR \
    --config.real_edit_dir=DIR --workdir=OUT [--config.compare=OTHER_RUN]

The API key comes from $OPENAI_API_KEY (config.judge.api_key_env); it is never saved.
Offline (no API), on a synthetic Real-Edit folder (mre_jax.testing.write_synthetic_real_edit):
  --config.judge.backend=synthetic --config.judge.truth=DIR/truth/index.json
"""

import ml_collections

from mre_jax.eval import judge


def get_config():
  config = ml_collections.ConfigDict()
  config.job = "evaluate"
  config.real_edit_dir = ""  # folder with the Real-Edit JSON and its photos (next to it or in images/)
  config.json_name = ""  # the JSON's file name in real_edit_dir; "" -> its only *.json
  config.checkpoint = ""  # project checkpoint folder the edits are made with
  # "module:function" returning edit_fn(images, instructions) -> images; gets this whole config.
  config.edit_factory = "mre_jax.infer.edit:make_edit_fn"
  config.batch_size = 7  # (photo, instruction) pairs per edit_fn call; a call never mixes photos
  config.limit = 0  # only the first N pairs (sorted by photo, then index); 0: all
  # Printed side by side with this run: another run's workdir (or table.json), or a protocol
  # (proper | release): this run's results read that way. Without real_edit_dir: the workdir's table.
  config.compare = ""
  config.bootstrap_samples = 1000  # resamples of the 95% intervals
  config.seed = 0  # bootstrap seed
  # Editing options for the edit factory; the names follow configs/edit.py (SPEC section 4).
  config.edit = ml_collections.ConfigDict()
  config.edit.step = -1  # checkpoint step; -1 = latest
  config.edit.use_ema = True  # EMA params
  config.edit.dtype = "float32"  # U-Net compute dtype: float32 or bfloat16
  config.edit.attention = "auto"  # kernel families (mre_jax/ops): auto | xla | cudnn | splash | cpu
  config.edit.conv = "auto"  # auto | xla | winograd
  config.edit.norm = "auto"  # GroupNorm: auto | xla | cpu
  config.edit.scheduler = "euler_ancestral"  # euler_ancestral (release), euler or ddim
  config.edit.steps = 30  # denoising steps
  config.edit.text_guidance = 7.5  # g_text
  config.edit.image_guidance = 1.5  # g_image
  config.edit.seed = 0  # noise seed
  config.edit.resolution = 512  # R, a multiple of 64: the scale of the working size (see size_rule)
  config.edit.size_rule = "release"  # release: longer side near R, shorter rounded up to 64s | short_side: shorter R
  config.edit.scores = (5.0, 5.0, 5.0)  # reward condition: following, preserving, quality
  config.edit.reward_text = "None; None; None"  # reward condition: failure texts
  # The judge sees the photo fitted to the working size and the edit, both resized to this height
  # (width round-down(height * w / h)), as the release does; 0: the photo and the edit as they are.
  config.judge_height = 512
  config.judge = judge.judge_config()
  # How answers become the table: proper (each answer's dictionary parsed) | release (substring
  # "yes", first 'score': <float>, an item with an answer unreadable so dropped everywhere).
  config.judge.protocol = "proper"
  return config
