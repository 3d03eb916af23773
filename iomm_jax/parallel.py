"""The device mesh, logical-axis sharding rules, and global batches from per-process data.

One mesh with axes ('data', 'fsdp', 'tensor') built with AxisType.Auto (GSPMD-style propagation; JAX 0.10's
`jax.make_mesh` defaults to Explicit axes). Parameters carry logical axis names in their `axes` metadata
(models/layers.py); `config.mesh.rules` maps those to mesh axes. Batches are sharded over ('data', 'fsdp').
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from iomm_jax import tree_paths
from iomm_jax.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  """Resolve (data, fsdp, tensor) sizes, filling one −1 from the device count."""
  sizes = [int(mesh_cfg.data), int(mesh_cfg.fsdp), int(mesh_cfg.tensor)]
  if sizes.count(-1) > 1:
    raise ConfigError(f"config.mesh: at most one of data/fsdp/tensor may be -1, got {sizes}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(
          f"config.mesh {sizes}: the fixed sizes (product {known}) do not divide the "
          f"{num_devices} devices; change config.mesh.*"
      )
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(
        f"config.mesh {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} devices but "
        f"{num_devices} are available; set one axis to -1 or make the product match"
    )
  return tuple(sizes)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The ('data', 'fsdp', 'tensor') mesh over `devices` (default: all devices of all processes)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_spec(
    axes: Sequence[str | None] | None, shape: Sequence[int], rules: Mapping[str, Any] | Sequence, mesh: Mesh
) -> P:
  """PartitionSpec for one array from its logical axis names.

  A dimension stays replicated when its rule maps to None, when the mesh axis has size 1, when the dimension is
  not divisible by the mesh axis size (small biases, odd vocab sizes), or when an earlier dimension already uses
  that mesh axis.
  """
  rules = dict(rules)
  if not axes:
    return P()
  used, spec = set(), []
  for name, dim in zip(axes, shape):
    axis = rules.get(name) if name is not None else None
    if axis is None or axis in used or mesh.shape[axis] == 1 or dim % mesh.shape[axis]:
      spec.append(None)
    else:
      used.add(axis)
      spec.append(axis)
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def param_shardings(abstract_state: nnx.State, mesh: Mesh, rules) -> dict:
  """Pure-dict tree of NamedShardings for an nnx.State whose Params carry `axes` metadata."""
  flat = {}
  for path, var in nnx.to_flat_state(abstract_state):
    meta = var.get_metadata() if hasattr(var, "get_metadata") else {}
    value = var.get_value() if hasattr(var, "get_value") else var
    flat[path] = NamedSharding(mesh, logical_spec(meta.get("axes"), value.shape, rules, mesh))
  return tree_paths.nest(flat)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) dimension over ('data', 'fsdp'); the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def batch_size_per_process(global_batch: int, mesh: Mesh) -> int:
  """This process's share of the global batch; errors when it does not divide evenly."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_batch % shards:
    raise ConfigError(f"config.train.global_batch={global_batch} is not divisible by data×fsdp={shards}")
  if global_batch % jax.process_count():
    raise ConfigError(
        f"config.train.global_batch={global_batch} is not divisible by the {jax.process_count()} processes"
    )
  return global_batch // jax.process_count()


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assemble each process's slice into global arrays sharded over ('data', 'fsdp')."""
  return {
      k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
      for k, v in local.items()
  }
