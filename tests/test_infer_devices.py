"""Inference and precompute split their batches over every local device; results do not depend on how many."""

# Runs in a child process with 8 simulated CPU devices (conftest.run_on_8_devices): one editor and
# one precompute over all 8, against the same over a 1-device mesh. 3 examples pad to 8 on 8 devices.
# Measured differences (float rounding of other per-device batch sizes): edits ~6e-6, latents ~7e-7.
CODE = """
import dataclasses, jax, numpy as np
from pathlib import Path
from configs import train as train_config
from mre_jax.data import input_pipeline, latent_cache
from mre_jax.infer import edit, sampling
from mre_jax.train import precompute, sharding, trainer

folder, tfds, workdir = {folder!r}, {tfds!r}, {workdir!r}
one = sharding.make_mesh(devices=jax.local_devices()[:1])

# ---- edits: 3 examples, 2 seed sets, Euler ancestral (fresh noise every step)
eight = edit.load_editor(folder)
assert eight.mesh.size == 8, eight.mesh
single = dataclasses.replace(eight, mesh=one, unet_params=jax.device_put(eight.unet_params, sharding.replicated(one)),
                             vae_params=jax.device_put(eight.vae_params, sharding.replicated(one)))
pixels = np.random.default_rng(0).uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
prompts = ["make it blue", "add snow", "turn the sky red"]
edits = {{}}
for name, editor in (("eight", eight), ("one", single)):
  for seed in (0, 1):
    seeds = [1000 * seed + i for i in range(3)]
    edits[name, seed] = edit.edit_arrays(editor, pixels, prompts, seeds=seeds, steps=2, scores=[[5, 5, 5], [1, 2, 3],
                                         [0, 5, 2]])
for seed in (0, 1):
  assert edits["eight", seed].shape == (3, 32, 32, 3)
  for b in range(3):
    diff = np.abs(edits["eight", seed][b] - edits["one", seed][b]).max()
    assert diff < 1e-4, ("edit", seed, b, diff)
assert all(np.abs(edits["one", 0][b] - edits["one", 1][b]).max() > 1e-3 for b in range(3)), "seeds do not matter"
shapes = {{key[2][0] for key in sampling.TRACES}}
assert shapes == {{8, 3}}, shapes  # padded to 8 over 8 devices; 3 on one

# ---- precompute: 15 test examples in batches of 3
config = train_config.get_config("tiny")
config.data.data_dir, config.data.builder_config, config.data.split, config.batch_size = tfds, "tiny", "test", 3
builder = input_pipeline.build_dataset("synthetic_edit", tfds, None, config="tiny")
frozen, fparams = trainer.load_frozen(workdir, jax.numpy.float32)
caches = {{}}
for name, mesh in (("eight", None), ("one", one)):
  path = precompute.write_latent_cache(config, builder, frozen, fparams, Path(workdir) / f"cache-{{name}}", mesh=mesh)
  caches[name] = latent_cache.CacheSource(path)
assert len(caches["eight"]) == len(caches["one"]) == 15, (len(caches["eight"]), len(caches["one"]))
for i in range(15):
  for f in latent_cache.FIELDS:
    diff = np.abs(caches["eight"][i][f] - caches["one"][i][f]).max()
    assert diff < 1e-4, ("latents", i, f, diff)
print("devices", jax.device_count(), "ok")
"""


def test_8_devices_edit_and_precompute_like_1_device(run_on_8_devices, tiny_folder, tfds_tiny, tmp_path):
  """Per example and per seed, an editor over 8 devices gives the 1-device images; precompute the same latents."""
  (tmp_path / "frozen").symlink_to(tiny_folder, target_is_directory=True)
  run_on_8_devices(CODE.format(folder=str(tiny_folder), tfds=tfds_tiny, workdir=str(tmp_path)))
