"""synthetic_edit: a procedural instruction-editing world with measured rewards.

The default data for training and tests: no download. Scenes of shapes, colours, textures
and backgrounds; instructions in the 7 Real-Edit categories; for each example the exact
edit (`truth`), a corrupted one (`edited`) like generated training data, and the scores and
failure texts a judge gives when it measures `edited` against `truth`. All generation logic
lives in mre_jax/data/synthetic.py; this file only describes features and splits.

Build: `tfds build data/synthetic_edit --data_dir=OUT [--config=32px]`, or
`mre_jax.data.input_pipeline.build_dataset("synthetic_edit", OUT)`. Like every builder in
data/, it imports the installed `mre_jax` package (`pip install -e .`, see README.md).
"""
import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from mre_jax.data import synthetic


@dataclasses.dataclass
class SyntheticEditConfig(tfds.core.BuilderConfig):
  """image_size: side in pixels (multiple of 8 in [32, 64]); num_train / num_test: examples
  per split; seed: world seed; clean_prob: share of examples drawn without corruption."""
  image_size: int = 64
  num_train: int = 2000
  num_test: int = 200
  seed: int = 0
  clean_prob: float = 0.25


class Builder(tfds.core.GeneratorBasedBuilder):
  """DatasetBuilder for synthetic_edit."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      SyntheticEditConfig(name="64px", description="64 px images, 2000 train / 200 test."),
      SyntheticEditConfig(name="64px_10k", num_train=10000, num_test=280,
                          description="64 px images, 10000 train / 280 test: the embedded demo's long run's data."),
      SyntheticEditConfig(name="64px_50k", num_train=50000, num_test=280,
                          description="64 px images, 50000 train / 280 test: 64px_10k's examples and 40000 more."),
      SyntheticEditConfig(name="64px_clean", clean_prob=1.0,
                          description="64 px images, 2000 train / 200 test, every target the exact edit."),
      SyntheticEditConfig(name="48px", image_size=48, description="48 px images."),
      SyntheticEditConfig(name="32px", image_size=32, description="32 px images."),
      SyntheticEditConfig(name="tiny", image_size=32, num_train=64, num_test=16,
                          description="32 px, 64 train / 16 test: for tests."),
  ]
  DEFAULT_CONFIG_NAME = "64px"

  def __init__(self, *, file_format=None, **kwargs):
    super().__init__(file_format=file_format or "array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.image_size
    image = lambda: tfds.features.Image(shape=(s, s, 3), encoding_format="png")
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "original": image(),
            "truth": image(),
            "edited": image(),
            "instruction": tfds.features.Text(),
            "instructions": tfds.features.Sequence(tfds.features.Text()),
            "category": tfds.features.Text(),
            "scores": tfds.features.Tensor(shape=(3,), dtype=np.float32),
            "reward_texts": tfds.features.Sequence(tfds.features.Text(), length=3),
            "scene_key": tfds.features.Text(),
        }),
        supervised_keys=None,
        homepage="https://github.com/bytedance/Multi-Reward-Editing",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing to download.
    return {"train": self._generate_examples("train"), "test": self._generate_examples("test")}

  def _generate_examples(self, split):
    cfg = self.builder_config
    count = cfg.num_train if split == "train" else cfg.num_test
    for index in range(count):
      ex = synthetic.make_example(index, split, seed=cfg.seed, size=cfg.image_size,
                                  clean_prob=cfg.clean_prob)
      yield index, {k: ex[k] for k in ("original", "truth", "edited", "instruction", "instructions",
                                       "category", "scores", "reward_texts", "scene_key")}
