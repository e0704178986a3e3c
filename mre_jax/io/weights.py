"""PyTorch <-> Flax weight layout: names and array layouts, in pure numpy.

A PyTorch state dict is flat (`down_blocks.0.resnets.1.conv1.weight`, arrays in PyTorch
layout); a Flax param tree is nested (`down_blocks_0/resnets_1/conv1/kernel`). Two naming
flavours exist in the libraries we build on:

- "diffusers": a list index joins the name before it (`down_blocks.0` -> `down_blocks_0`);
- "transformers": a list index is a level of its own (`layers.0` -> `layers/0`).

Layouts: Linear `[out, in]` <-> Dense `[in, out]`; Conv2d `[out, in, kh, kw]` <-> Conv
`[kh, kw, in, out]`; norm `weight` <-> `scale`; Embedding `weight` <-> `embedding`.

Conversion is checked against the Flax model's own parameter shapes, so a missing, unexpected
or mis-shaped tensor is an error that names it.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from flax import traverse_util

_WEIGHT_LEAVES = ("kernel", "scale", "embedding")
# diffusers' torch.nn.ModuleList attributes: only these take a `.N` index, so that a Flax
# `down_blocks_0` maps back to `down_blocks.0` while `linear_1` stays `linear_1`.
_DIFFUSERS_LISTS = frozenset(
    {"down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
     "transformer_blocks", "to_out", "net"})


class WeightMismatchError(ValueError):
  """Raised when a state dict does not fit the model it is loaded into."""


def _flax_module_path(torch_module: str, flavour: str, aliases: Mapping[str, str]) -> tuple[str, ...]:
  parts: list[str] = []
  for part in torch_module.split(".") if torch_module else []:
    if part.isdigit() and flavour == "diffusers" and parts:
      parts[-1] = f"{parts[-1]}_{part}"
    else:
      parts.append(part)
  joined = "/".join(parts)
  for old, new in aliases.items():
    joined = "/".join(new if p == old else p for p in joined.split("/"))
  return tuple(joined.split("/")) if joined else ()


def _to_flax_array(array: np.ndarray, leaf: str, flax_shape: tuple[int, ...]) -> np.ndarray:
  if leaf == "kernel":
    if array.ndim == 4 and len(flax_shape) == 2:  # legacy 1x1-conv attention in old VAEs
      array = array[:, :, 0, 0]
    if array.ndim == 4:
      return np.ascontiguousarray(array.transpose(2, 3, 1, 0))
    if array.ndim == 2:
      return np.ascontiguousarray(array.T)
  return array


def _to_torch_array(array: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == "kernel" and array.ndim == 4:
    return np.ascontiguousarray(array.transpose(3, 2, 0, 1))
  if leaf == "kernel" and array.ndim == 2:
    return np.ascontiguousarray(array.T)
  return array


def torch_to_flax(
    state_dict: Mapping[str, np.ndarray],
    target_shapes: Any,
    *,
    flavour: str = "diffusers",
    aliases: Mapping[str, str] | None = None,
    ignore_prefixes: tuple[str, ...] = (),
    source: str = "state dict",
) -> dict:
  """Converts a PyTorch state dict to a nested Flax param dict shaped like `target_shapes`.

  Args:
    state_dict: flat name -> numpy array, PyTorch layout.
    target_shapes: the Flax param tree (arrays or `jax.ShapeDtypeStruct`s) to fill.
    flavour: "diffusers" or "transformers" (see module docstring).
    aliases: Flax module-name renames, torch name -> Flax name (e.g. `to_q` -> `query`).
    ignore_prefixes: torch keys to drop silently (buffers such as `position_ids`).
    source: what the state dict is, for error messages.

  Returns:
    A nested dict of numpy arrays with exactly the target's keys and shapes.
  """
  aliases = dict(aliases or {})
  target = traverse_util.flatten_dict(_unfreeze(target_shapes))
  out: dict[tuple[str, ...], np.ndarray] = {}
  unexpected, bad_shapes = [], []
  for key, array in state_dict.items():
    if any(key.startswith(p) for p in ignore_prefixes):
      continue
    flax_key = _flax_key(key, flavour, aliases, target)
    if flax_key not in target:
      unexpected.append(key)
      continue
    want = tuple(target[flax_key].shape)
    converted = _to_flax_array(np.asarray(array), flax_key[-1], want)
    if converted.shape != want:
      bad_shapes.append(f"{key}: {tuple(np.shape(array))} does not fit {'/'.join(flax_key)} {want}")
      continue
    out[flax_key] = converted
  missing = ["/".join(k) for k in target if k not in out]
  _raise_on_mismatch(source, bad_shapes, unexpected, missing)
  return traverse_util.unflatten_dict(out)


def _flax_key(torch_key: str, flavour: str, aliases: Mapping[str, str],
              target: Mapping[tuple[str, ...], Any]) -> tuple[str, ...]:
  """The flat Flax key of a torch key; a torch `weight` becomes the kernel, scale or embedding
  that `target` has (kernel when it has none)."""
  module, _, leaf = torch_key.rpartition(".")
  path = _flax_module_path(module, flavour, aliases)
  if leaf == "weight":
    found = [l for l in _WEIGHT_LEAVES if path + (l,) in target]
    leaf = found[0] if found else "kernel"
  return path + (leaf,)


def _raise_on_mismatch(source: str, bad_shapes: list[str], unexpected: list[str], missing: list[str]) -> None:
  """WeightMismatchError naming (up to 10 of) each kind of problem, if there is any."""
  problems = []
  if bad_shapes:
    problems.append("shape mismatch: " + "; ".join(bad_shapes[:10]))
  if unexpected:
    problems.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(sorted(unexpected)[:10]))
  if missing:
    problems.append(f"missing keys ({len(missing)}): " + ", ".join(sorted(missing)[:10]))
  if problems:
    raise WeightMismatchError(f"{source}: " + " | ".join(problems))


def flax_to_torch(
    params: Any, *, flavour: str = "diffusers", aliases: Mapping[str, str] | None = None
) -> dict[str, np.ndarray]:
  """Inverse of `torch_to_flax`: nested Flax params -> flat PyTorch state dict (numpy)."""
  inverse = {new: old for old, new in (aliases or {}).items()}
  out = {}
  for path, array in traverse_util.flatten_dict(_unfreeze(params)).items():
    *modules, leaf = path
    names = []
    for m in modules:
      m = inverse.get(m, m)
      if flavour == "diffusers":
        base, _, index = m.rpartition("_")
        if base in _DIFFUSERS_LISTS and index.isdigit():
          m = f"{base}.{index}"
      names.append(m)
    torch_leaf = "weight" if leaf in _WEIGHT_LEAVES else leaf
    out[".".join(names + [torch_leaf])] = _to_torch_array(np.asarray(array), leaf)
  return out


def init_like_torch(shapes: Any, seed: int) -> dict:
  """Random float32 params for a Flax shape tree, drawn as PyTorch's default init draws them.

  Dense/Conv kernels and their biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (what `nn.Linear` and
  `nn.Conv2d` do), norm scales 1 and biases 0, embeddings ~ N(0, 1). In numpy: a random U-Net
  costs milliseconds instead of compiling an RNG program, and the release's randomly
  initialised reward modules start from the distribution it used.
  """
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(_unfreeze(shapes))
  out = {}
  for path, leaf in flat.items():
    shape, parent, name = tuple(leaf.shape), path[:-1], path[-1]
    if name == "embedding":
      out[path] = rng.standard_normal(shape, dtype=np.float32)
    elif name == "scale" or (name == "bias" and parent + ("scale",) in flat):
      out[path] = np.ones(shape, np.float32) if name == "scale" else np.zeros(shape, np.float32)
    else:
      kernel = flat.get(parent + ("kernel",), leaf)
      fan_in = int(np.prod(kernel.shape[:-1]))
      bound = np.float32(1.0 / np.sqrt(max(fan_in, 1)))
      out[path] = (rng.random(shape, dtype=np.float32) * 2 - 1) * bound  # float32 draws: SD-size in seconds
  return traverse_util.unflatten_dict(out)


def _unfreeze(tree: Any) -> dict:
  if hasattr(tree, "unfreeze"):
    return tree.unfreeze()
  return dict(tree)
