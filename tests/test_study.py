"""The study job (configs/study.py:quick): runs end to end through the train job, the editor and the
exact judge, and writes well-formed tables and figures. Who wins is not tested here."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from configs import study as study_config
from mre_jax.data import records
from mre_jax.eval import study, synthetic_eval
from mre_jax.jobs import study as study_job

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
  out = tmp_path_factory.mktemp("study") / "out"
  proc = subprocess.run([sys.executable, "main.py", "--config=configs/study.py:quick", f"--workdir={out}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out, proc.stdout


def test_quick_study_trains_both_arms_and_writes_its_report(quick_study):
  out, stdout = quick_study
  config = study_config.get_config("quick")
  for arm in study.ARMS:
    assert (out / f"{arm}_seed0" / "mre_model.json").is_file()
  reward_spec = json.loads((out / "reward_seed0" / "mre_model.json").read_text())
  baseline_spec = json.loads((out / "baseline_seed0" / "mre_model.json").read_text())
  assert reward_spec["reward"] is True and baseline_spec["reward"] is False
  result = json.loads((out / "table.json").read_text())
  assert result["seeds"] == [0] and result["examples"] == config.eval.count
  rows = ["overall"] + list(records.CATEGORIES)
  for model in ("baseline", "reward", "reward - baseline"):
    assert list(result["models"][model]) == rows
    for row in rows:
      for p in synthetic_eval.PERSPECTIVES:
        cell = result["models"][model][row][p]
        lo, hi = cell["ci"]
        assert lo <= cell["mean"] + 1e-9 and cell["mean"] <= hi + 1e-9
        assert (-5 <= lo <= 5) if model == "reward - baseline" else (0 <= lo <= hi <= 5)
  # The paired difference is the difference of the means (same examples, same seeds).
  for p in synthetic_eval.PERSPECTIVES:
    diff = result["models"]["reward - baseline"]["overall"][p]["mean"]
    means = [result["models"][m]["overall"][p]["mean"] for m in ("reward", "baseline")]
    assert diff == pytest.approx(means[0] - means[1], abs=1e-6)
  assert result["references"]["truth"]["overall"]["following"]["mean"] == 5.0
  assert result["references"]["input"]["overall"]["following"]["mean"] == 0.0
  assert list(result["knobs"]) == list(synthetic_eval.PERSPECTIVES)
  assert all(list(curve) == ["0", "5"] for curve in result["knobs"].values())
  table = (out / "table.md").read_text()
  assert "reward - baseline" in table and "Knobs" in table and table in stdout
  for name in ("bars.png", "knobs.png", "examples.png"):
    with Image.open(out / name) as image:
      assert image.format == "PNG" and min(image.size) > 100
  edits = np.load(out / "edits" / "reward_seed0.npz")["edits"]
  assert edits.shape == (config.eval.count, 32, 32, 3) and edits.dtype == np.uint8


def test_knob_request_asks_for_one_perspective():
  assert study.knob_request(1, 2.0) == ((5.0, 2.0, 5.0), "None; the image changed; None")
  assert study.knob_request(0, 5.0) == ((5.0, 5.0, 5.0), "None; None; None")


def test_bootstrap_two_way_interval_covers_seed_spread():
  rng = np.random.default_rng(0)
  one_seed = rng.normal(3.0, 0.1, (1, 50))
  three_seeds = one_seed + np.array([[-1.0], [0.0], [1.0]])  # same examples, runs far apart
  narrow = synthetic_eval.bootstrap_mean(one_seed)
  wide = synthetic_eval.bootstrap_mean(three_seeds)
  assert narrow["ci"][1] - narrow["ci"][0] < 0.1
  assert wide["ci"][1] - wide["ci"][0] > 1.0  # resampling the runs shows their spread
  assert wide["mean"] == pytest.approx(one_seed.mean())


def test_train_jobs_final_evaluation_judges_the_model_and_its_references(quick_study, tmp_path):
  """`synthetic_eval.evaluate_run` (the train job's last step) on the quick study's reward model:
  the references score what the judge gives them by construction (input 0 / 5 / 5, truth 5 / 5 / 5),
  "truth through the VAE" is the judge of the truths encoded and decoded here with the VAE's own
  functions, and a rerun returns the stored report."""
  import shutil

  from configs import train as train_config
  from mre_jax.data import input_pipeline
  from mre_jax.infer import edit
  from mre_jax.io import pretrained
  out, _ = quick_study
  run = tmp_path / "run"
  shutil.copytree(out / "reward_seed0", run)
  config = train_config.get_config("tiny")
  config.eval.count, config.eval.steps, config.eval.batch_size = 7, 2, 7
  builder = input_pipeline.build_dataset("synthetic_edit", str(out / "tfds"), config="tiny")
  report = synthetic_eval.evaluate_run(config, run, builder, step=6)
  s = report["summaries"]
  assert [s["input"]["overall"][p]["mean"] for p in synthetic_eval.PERSPECTIVES] == [0.0, 5.0, 5.0]
  assert [s["truth"]["overall"][p]["mean"] for p in synthetic_eval.PERSPECTIVES] == [5.0, 5.0, 5.0]
  test = synthetic_eval.load_test_set(builder, "test", 7)
  editor = edit.load_editor(run)
  mean, _ = pretrained.vae_encode(editor.vae, editor.vae_params, test.truths.astype(np.float32) / 127.5 - 1.0)
  decoded = np.asarray(pretrained.vae_decode(editor.vae, editor.vae_params, mean))
  decoded = np.clip(np.round((decoded + 1.0) * 127.5), 0, 255).astype(np.uint8)
  want = synthetic_eval.judge_set(test, decoded).mean(axis=0)
  got = [s["truth through the VAE"]["overall"][p]["mean"] for p in synthetic_eval.PERSPECTIVES]
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert s["model at 5,5,5"]["overall"]["following"]["n"] == 7
  effect = report["text_effect"]
  assert effect["timesteps"] == list(synthetic_eval.TEXT_EFFECT_TIMESTEPS)
  assert effect["shares"]["overall"]["instruction"] != effect["shares"]["overall"]["empty"]
  assert all(np.isfinite(v).all() for row in effect["shares"].values() for v in row.values())
  assert "Does the U-Net read the instruction?" in (run / "eval.md").read_text()
  rebatched = synthetic_eval.text_effect(editor, test, batch_size=3)  # 3 + 3 + 1: other programs, same noise
  for row, shares in effect["shares"].items():
    for branch in ("instruction", "empty"):
      np.testing.assert_allclose(rebatched["shares"][row][branch], shares[branch], rtol=1e-5, atol=1e-4)
  stamp = (run / "eval.json").stat().st_mtime_ns
  assert synthetic_eval.evaluate_run(config, run, builder, step=6) == report
  assert (run / "eval.json").stat().st_mtime_ns == stamp


def test_a_training_stopped_early_stops_the_study_before_any_edit(tmp_path, monkeypatch):
  # The train job returns normally after a SIGTERM, with the step it reached: the study must not go
  # on to edit and judge that model as if it were trained.
  class Stopped:
    step = np.int32(1)

  calls = []
  monkeypatch.setattr(study_job.loop, "train_and_evaluate", lambda cfg, workdir: calls.append(workdir) or Stopped())
  config = study_config.get_config("quick")
  with pytest.raises(SystemExit, match=r"baseline seed 0 stopped at step 1 of 6 .*rerun"):
    study_job.run_study(config, tmp_path)
  assert calls == [str(tmp_path / "baseline_seed0")]
  assert not (tmp_path / "edits").exists() and not (tmp_path / "table.json").exists()


def test_text_effect_measures_the_share_of_the_way_to_the_truth_per_branch(quick_study):
  """A stand-in U-Net whose clean-latent prediction is input + w (truth - input), with w = 0.8 given
  the instruction and 0.2 given the empty text: `text_effect` must report exactly those shares, per
  branch, at every timestep and in every row (whatever the model's prediction type)."""
  import dataclasses

  import jax.numpy as jnp

  from mre_jax.data import input_pipeline
  from mre_jax.infer import edit, sampling
  from mre_jax.io import pretrained
  out, _ = quick_study
  editor = edit.load_editor(out / "reward_seed0")
  builder = input_pipeline.build_dataset("synthetic_edit", str(out / "tfds"), config="tiny")
  test = synthetic_eval.load_test_set(builder, "test", 7)
  sf = editor.scaling_factor
  truth = pretrained.vae_encode(editor.vae, editor.vae_params, test.truths.astype(np.float32) / 127.5 - 1.0)[0] * sf
  null = jnp.asarray(edit.encode_texts(editor, [""] * len(test))[0])
  alphas = sampling.spec_from_scheduler_config(editor.scheduler_config, "ddim", 1).make_schedule().alphas_cumprod
  v_prediction = editor.scheduler_config.get("prediction_type", "epsilon") == "v_prediction"

  class StandIn:
    reward = editor.unet.reward

    def apply(self, variables, sample, t, context, *rest):
      c = truth.shape[-1]
      noisy, source = sample[..., :c], sample[..., c:] * sf
      w = jnp.where(jnp.all(context == null), 0.2, 0.8)
      x0 = source + w * (truth - source)
      a = alphas[t[0]]
      if v_prediction:
        return (jnp.sqrt(a) * noisy - x0) / jnp.sqrt(1.0 - a)
      return (noisy - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)

  effect = synthetic_eval.text_effect(dataclasses.replace(editor, unet=StandIn()), test, batch_size=len(test))
  assert list(effect["shares"])[0] == "overall" and len(effect["shares"]) > 2
  for row in effect["shares"].values():
    np.testing.assert_allclose(row["instruction"], 0.8, atol=2e-3)
    np.testing.assert_allclose(row["empty"], 0.2, atol=2e-3)


def test_the_vae_ceiling_of_an_image_conditioned_decoder_decodes_each_truth_with_its_input(quick_study):
  """`synthetic_eval.through_vae` with an image-conditioned decoder (models/vae.py): each truth is
  decoded from its latents with its own example's input image, as the sampler decodes an edit."""
  import dataclasses

  from mre_jax.data import input_pipeline
  from mre_jax.infer import edit
  from mre_jax.io import pretrained
  from mre_jax.train import vae_train
  out, _ = quick_study
  editor = edit.load_editor(out / "reward_seed0")
  vae, params = vae_train.add_image_condition(editor.vae, editor.vae_params, 8)
  proj = params["decoder"]["cond_proj_out"]
  params = {**params, "decoder": {**params["decoder"], "cond_proj_out": {**proj, "kernel": proj["kernel"] + 1.0}}}
  conditioned = dataclasses.replace(editor, vae=vae, vae_params=params)
  builder = input_pipeline.build_dataset("synthetic_edit", str(out / "tfds"), config="tiny")
  test = synthetic_eval.load_test_set(builder, "test", 7)
  pixels = lambda x: x.astype(np.float32) / 127.5 - 1.0
  mean, _ = pretrained.vae_encode(vae, params, pixels(test.truths))
  want = np.asarray(pretrained.vae_decode(vae, params, mean, pixels(test.originals)))
  want = np.clip(np.round((want + 1.0) * 127.5), 0, 255).astype(np.uint8)
  got = synthetic_eval.through_vae(conditioned, test.truths, test.originals, batch_size=3)
  assert np.abs(got.astype(int) - want).max() <= 1  # rounding at the edge of a level
  other = synthetic_eval.through_vae(conditioned, test.truths, test.truths, batch_size=3)
  assert np.abs(other.astype(int) - want).mean() > 1.0  # measured 2.5: the input image matters


def test_long_variant_trains_the_paired_long_models(tmp_path):
  """configs/study.py:long: each arm is configs/train.py:long with the flags of README's hand-run arm commands
  ("From a stage-1 editor"), so a seed's two models can be trained by hand and the study resumes them."""
  from configs import train as train_configs
  config = study_config.get_config("long")
  study_job.check_config(config)
  for arm in study.ARMS:
    expected = train_configs.get_config("long")
    expected.seed = 2
    expected.model.reward = arm == "reward"
    expected.data.data_dir = str(tmp_path / "tfds")
    expected.eval.count = 0
    expected.sample.every = 0
    assert study.train_config(config, tmp_path, arm, 2).to_dict() == expected.to_dict()


def test_edits_made_elsewhere_pool_without_their_models(quick_study, tmp_path, monkeypatch):
  """An OUT holding only another run's edits/ (no model workdirs) trains nothing and reports the same
  table: seeds trained and edited on different machines pool by copying their edits/ together."""
  import shutil
  out, _ = quick_study
  pooled = tmp_path / "pooled"
  shutil.copytree(out / "edits", pooled / "edits")
  monkeypatch.setattr(study_job.loop, "train_and_evaluate", lambda cfg, workdir: pytest.fail(f"trained {workdir}"))
  monkeypatch.setattr(study.edit, "load_editor", lambda workdir: pytest.fail(f"loaded {workdir}"))
  config = study_config.get_config("quick")
  config.train.data.data_dir = str(out / "tfds")  # the data folder is not part of what the edits depend on
  result = study_job.run_study(config, pooled)
  want = json.loads((out / "table.json").read_text())
  assert json.loads(json.dumps(result)) == want
  assert sorted(p.name for p in pooled.iterdir()) == ["bars.png", "edits", "examples.png", "knobs.png", "table.json",
                                                      "table.md"]


def test_edits_made_by_another_config_are_refused_by_name(quick_study, tmp_path):
  """Cached edits carry what they depend on: a study asking for other sampler settings or another
  recipe gets a ConfigError naming the file and the field, not those edits judged as its own."""
  import shutil

  from mre_jax.errors import ConfigError
  out, _ = quick_study
  shutil.copytree(out / "edits", tmp_path / "edits")
  config = study_config.get_config("quick")
  assert study.edits_done(config, tmp_path, "reward", 0) and study.edits_done(config, tmp_path, "baseline", 0)
  assert not study.edits_done(config, tmp_path, "baseline", 1)
  config.eval.batch_size = 3  # results do not depend on it
  assert study.edits_done(config, tmp_path, "baseline", 0)
  config.eval.steps = 4
  with pytest.raises(ConfigError, match=r"baseline_seed0\.npz was made by another config \(sampler\.steps: 3 there, "
                                        r"4 here\)"):
    study.edits_done(config, tmp_path, "baseline", 0)
  config = study_config.get_config("quick")
  config.train.optim.lr = 1e-3
  with pytest.raises(ConfigError, match=r"reward_seed0\.npz .*train\.optim\.lr: 0\.0003 there, 0\.001 here"):
    study.edits_done(config, tmp_path, "reward", 0)
  path = tmp_path / "edits" / "baseline_seed0.npz"
  with np.load(path) as f:
    edits = f["edits"]
  np.savez_compressed(path, edits=edits)  # a file from before edits carried their meta
  with pytest.raises(ConfigError, match=r"baseline_seed0\.npz has no meta record"):
    study.edits_done(study_config.get_config("quick"), tmp_path, "baseline", 0)


def test_committed_long_pair_edits_are_what_the_long_study_would_make():
  """docs/study_long/edits holds the long pairs' edit sets so that later seeds pool with them: every
  seed there has all its sets, each made by configs/study.py:long as it is now (a change to that
  config, its sampler or its examples makes them stale, and this says which file and field)."""
  out = ROOT / "docs" / "study_long"
  config = study_config.get_config("long")
  seeds = sorted({int(p.stem.split("_seed")[1].split("_")[0]) for p in (out / "edits").glob("*.npz")})
  assert seeds
  for seed in seeds:
    for arm in study.ARMS:
      assert study.edits_done(config, out, arm, seed), f"{arm} seed {seed}: an edit set is missing in {out}/edits"
  with np.load(out / "edits" / f"reward_seed{seeds[0]}.npz") as f:
    assert f["edits"].shape == (config.eval.count, 64, 64, 3) and f["edits"].dtype == np.uint8
