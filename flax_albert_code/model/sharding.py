"""Device mesh (data, fsdp, tensor; -1 takes the remaining devices) from the config, and
shardings of state (logical axis names mapped by `config.logical_axis_rules`) and batches."""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"Only one mesh axis may be -1 (the rest of the devices); got {sizes} for "
                     f"{MESH_AXES}. Set config.mesh.data/fsdp/tensor.")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"Mesh {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} "
                       "devices; change config.mesh.")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"Mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but "
                     f"{num_devices} exist; set one axis to -1 or change config.mesh.")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh over all (or the given) devices with Auto axis types (not the new Explicit default)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if devices == list(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
  return Mesh(np.array(devices).reshape(shape), MESH_AXES, axis_types=auto)


def rules(config) -> tuple[tuple[str, Any], ...]:
  return tuple((name, tuple(ax) if isinstance(ax, list) else ax)
               for name, ax in config.logical_axis_rules)


def logical_shardings(boxed_tree, mesh: Mesh, axis_rules) -> Any:
  """NamedShardings for a tree of values boxed with logical names; a dimension keeps only the
  leading mesh axes that divide it (a vocabulary of 7861 over 4 devices: none)."""
  specs = nn.get_partition_spec(boxed_tree)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, axis_rules)
  boxed = lambda x: isinstance(x, nn.Partitioned)
  values = jax.tree.map(lambda x: x.unbox(apply_constraint=False) if boxed(x) else x,
                        boxed_tree, is_leaf=boxed)
  return jax.tree.map(lambda x, s: _divisible(s, x.shape), values, shardings)


def _divisible(s: NamedSharding, shape: tuple[int, ...]) -> NamedSharding:
  """`s` without the trailing mesh axes of each dimension that do not divide its size."""
  size = lambda names: math.prod(s.mesh.shape[a] for a in names)
  spec = list(s.spec) + [None] * (len(shape) - len(s.spec))
  names = [[ax] if isinstance(ax, str) else list(ax or ()) for ax in spec]
  if all(dim % size(n) == 0 for dim, n in zip(shape, names)):
    return s
  for i, dim in enumerate(shape):
    while dim % size(names[i]):
      names[i].pop()
      spec[i] = tuple(names[i]) or None
  return NamedSharding(s.mesh, P(*spec))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches: leading dim over (data, fsdp), the rest replicated."""
  return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]
