"""Device mesh and sharding rules, declared in one place.

The mesh has two axes: `data` (pure data parallelism) and `fsdp` (data parallelism whose
replicas also split the parameters, EMA and optimiser state). A batch is split over both.
A parameter-like array is split along `fsdp` on its largest dimension that divides evenly,
when it is large enough to be worth it; everything else is replicated.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp) mesh over all devices; -1 on one axis takes the devices left over."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if data == -1 and fsdp > 0 and n % fsdp == 0:
    data = n // fsdp
  elif fsdp == -1 and data > 0 and n % data == 0:
    fsdp = n // data
  if data < 1 or fsdp < 1 or data * fsdp != n:
    raise ValueError(f"config.mesh: data={data} x fsdp={fsdp} does not use the {n} devices")
  grid = np.asarray(devices).reshape(data, fsdp)
  return Mesh(grid, BATCH_AXES)


def local_mesh() -> Mesh:
  """A (data, fsdp=1) mesh over this process's devices, for inference and precompute.

  Each process works through its own share of the examples on its own devices, so these jobs need
  no collective across processes; a batch split over `BATCH_AXES` is split over every local device.
  """
  return make_mesh(devices=jax.local_devices())


def pad_batch(tree: Any, multiple: int) -> tuple[Any, int]:
  """Pads every leaf's leading (batch) axis to a multiple of `multiple`; returns (tree, batch size B).

  The padding repeats the last example, so it is valid input; callers drop rows >= B of the outputs.
  All leaves share one batch size B >= 1 (host arrays; None leaves stay None).
  """
  sizes = {np.shape(x)[0] for x in jax.tree_util.tree_leaves(tree)}
  if len(sizes) != 1 or 0 in sizes:
    raise ValueError(f"pad_batch: the leaves need one batch size >= 1, got {sorted(sizes)}")
  batch = sizes.pop()
  extra = -batch % multiple

  def pad(x):
    x = np.asarray(x)
    return np.concatenate([x, np.repeat(x[-1:], extra, axis=0)]) if extra else x
  return jax.tree_util.tree_map(pad, tree), batch


def param_spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> P:
  """fsdp over the largest evenly divisible dimension of a large array; else replicated."""
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def tree_shardings(tree: Any, mesh: Mesh, min_size: int = 2**14) -> Any:
  """NamedShardings for a tree of arrays / ShapeDtypeStructs by the fsdp rule."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, param_spec(tuple(x.shape), fsdp, min_size)), tree)


def replicated(mesh: Mesh) -> NamedSharding:
  """The same full value on every device of `mesh`."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The leading (batch) axis split over every device of `mesh` (`BATCH_AXES`)."""
  return NamedSharding(mesh, P(BATCH_AXES))


def place(tree: Any, shardings: Any) -> Any:
  """Host arrays (the same full value on every process) -> global arrays with `shardings`."""
  def put(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree_util.tree_map(put, tree, shardings)


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's slice of the batch -> global arrays split over (data, fsdp)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
