"""The device mesh ('data', 'fsdp', 'tensor') and the logical-axis → mesh-axis partition rules.

Parameters carry logical axis names in their variable metadata (`out_sharding`, e.g.
('layers', 'embed', 'mlp'), see `models/layers.py`); a rule table maps each logical name to a
mesh axis (or None = replicated). The batch is sharded over ('data', 'fsdp'). The same code
runs on 1 CPU, 8 simulated devices, a GPU and a TPU pod (design decision 4).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
from jax.experimental import mesh_utils
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name → mesh axis (None = replicated). Overridable per config (`mesh.rules`).
DEFAULT_RULES: dict[str, str | None] = {
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "layers": None,
    "vocab": "tensor",
}


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  """Resolves the (data, fsdp, tensor) sizes; at most one −1, which takes the remaining devices."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise ValueError(f"mesh: only one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  fixed = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
  if free:
    if num_devices % fixed:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not a "
                       f"multiple of the fixed axes' product {fixed}")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices but "
                     f"{num_devices} are available; set mesh.data/fsdp/tensor so that the "
                     f"product matches, or use -1 for one axis")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The ('data', 'fsdp', 'tensor') mesh from `cfg.mesh` over all (or the given) devices."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  try:
    arr = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # non-TPU topologies / simulated CPU devices: plain row-major order
    arr = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(arr, MESH_AXES)


def rules_from_config(mesh_cfg=None) -> dict[str, str | None]:
  """DEFAULT_RULES updated by an optional `mesh.rules` mapping in the config."""
  rules = dict(DEFAULT_RULES)
  extra = None if mesh_cfg is None else mesh_cfg.get("rules", None)
  if extra:
    rules.update(dict(extra))
  return rules


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules: Mapping[str, str | None] | None = None) -> P:
  """PartitionSpec for one array from its logical axis names.

  A dimension stays replicated when its name has no rule, maps to None, maps to a mesh axis
  already used by an earlier dimension, or is not divisible by that mesh axis' size (e.g. a
  tiny model's 96-wide kernel on a 64-way axis, or a rank-8 LoRA factor): correctness first,
  the array is simply copied on that axis instead of failing to shard.
  """
  rules = DEFAULT_RULES if rules is None else rules
  if not names:
    return P()
  if len(names) != len(shape):
    raise ValueError(f"logical axes {tuple(names)} do not match shape {tuple(shape)}")
  used, spec = set(), []
  for name, dim in zip(names, shape):
    axis = rules.get(name) if name is not None else None
    if axis is None or axis in used or dim % mesh.shape[axis]:
      spec.append(None)
    else:
      spec.append(axis)
      used.add(axis)
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def tree_shardings(tree, mesh: Mesh, rules: Mapping[str, str | None] | None = None):
  """NamedShardings for a pytree that may contain nnx Variables (an nnx.State, an optimizer
  state whose moments mirror it, a dict with λ and counters).

  Variables use their `out_sharding` logical names; every other leaf is replicated. The result
  has the same structure (Variables keep their place, holding a NamedSharding), so it can be
  passed as `in_shardings` / `out_shardings` of `jax.jit` or to `place`. Works on concrete and
  abstract (`jax.eval_shape` / `nnx.eval_shape`) trees.
  """
  def one(x):
    if _is_var(x):
      names = x.get_metadata().get("out_sharding")
      spec = logical_to_spec(names, x.get_value().shape, mesh, rules)
      return x.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, P())
  return jax.tree.map(one, tree, is_leaf=_is_var)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) axis over ('data', 'fsdp'); other axes replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def batch_shardings(tree, mesh: Mesh):
  """`batch_sharding` for every array leaf of a batch pytree (scalars replicated)."""
  return jax.tree.map(lambda x: batch_sharding(mesh, np.ndim(x)) if np.ndim(x) else
                      NamedSharding(mesh, P()), tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def place(tree, shardings):
  """Puts a pytree onto the devices with the given (matching) shardings."""
  return jax.device_put(tree, shardings)


def abstract_with_shardings(tree, shardings):
  """ShapeDtypeStructs carrying the target shardings: what Orbax restores into."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                      tree, shardings)


def init_sharded(init_fn, mesh: Mesh, rules: Mapping[str, str | None] | None = None):
  """Runs `init_fn()` (returning a pytree, e.g. an nnx.State) under jit with its outputs placed
  by `tree_shardings`, so large states are created directly sharded, never whole on one device."""
  abstract = jax.eval_shape(init_fn)
  return jax.jit(init_fn, out_shardings=tree_shardings(abstract, mesh, rules))()
