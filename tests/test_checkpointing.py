"""Project checkpoints: loading the parameters of a training checkpoint reads one item, quietly."""

import logging

import jax
import numpy as np
import orbax.checkpoint as ocp

from configs import convert as convert_config
from mre_jax.infer import edit
from mre_jax.io import checkpointing
from mre_jax.jobs import convert as convert_job


def _training_checkpoint(tiny_folder, workdir):
  """A converted checkpoint with a step 1 laid out as training saves it: items `params`, `ema_params`
  (the raw params + 1), `opt_state` and `data`. Returns (workdir, params, ema_params)."""
  config = convert_config.get_config()
  config.source = str(tiny_folder)
  convert_job.convert(config, str(workdir))
  params = jax.device_get(checkpointing.restore_params(workdir, step=0, use_ema=False)[1])
  ema = jax.tree_util.tree_map(lambda x: x + 1, params)
  manager = checkpointing.make_manager(workdir)
  manager.save(1, args=ocp.args.Composite(
      params=ocp.args.StandardSave(params), ema_params=ocp.args.StandardSave(ema),
      opt_state=ocp.args.StandardSave({"mu": params}), data=ocp.args.JsonSave({"next_index": 4})))
  manager.wait_until_finished()
  manager.close()
  return workdir, params, ema


def _assert_trees_equal(got, want):
  got, want = jax.device_get(got), jax.device_get(want)
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree_util.tree_leaves(want)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_loading_for_editing_restores_one_item_without_orbax_warnings(tiny_folder, tmp_path, caplog, capfd):
  workdir, params, ema = _training_checkpoint(tiny_folder, tmp_path / "ckpt")
  capfd.readouterr()
  with caplog.at_level(logging.WARNING):
    editor = edit.load_editor(workdir)
    step, raw = checkpointing.restore_params(workdir, use_ema=False)
  warnings = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.WARNING]
  assert not warnings, warnings  # Orbax (absl logger): 'Item "params" was found ... could not be restored'
  stderr = capfd.readouterr().err
  assert "could not be restored" not in stderr and "WARNING" not in stderr, stderr
  assert step == 1 and "step 1 (EMA params)" in editor.source
  _assert_trees_equal(editor.unet_params, ema)
  _assert_trees_equal(raw, params)
