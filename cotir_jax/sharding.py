"""The device mesh ('data', 'fsdp', 'tensor') and the logical-axis → mesh-axis partition rules.

Parameters carry logical axis names in their variable metadata (`out_sharding`, e.g.
('layers', 'embed', 'mlp'), see `models/layers.py`); activations are pinned at block
boundaries with `constrain(x, ('batch', 'length', 'act_embed'))`. One rule table maps every
logical name to a mesh axis, a tuple of mesh axes, or None (replicated). The batch, and so
every activation, is sharded over ('data', 'fsdp'): under FSDP each chip computes its share of
the batch and gathers weights layer by layer, instead of XLA choosing to split activations by
hidden width and computing attention for the whole global batch on every chip. The same code
runs on 1 CPU, 8 simulated devices, a GPU and a TPU pod.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Mapping, Sequence

import jax
from jax.experimental import mesh_utils
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cotir_jax.cli import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

Rule = str | tuple[str, ...] | None


class MeshError(UserError, ValueError):
  """The mesh does not fit the devices or the stages' batches; the message says what would."""

# logical name → mesh axis / axes (None = replicated). Overridable per config (`mesh.rules`).
DEFAULT_RULES: dict[str, Rule] = {
    # parameters
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",  # columns / rows grouped by head (fused q, k, v [+ MLP]): whole heads
    "layers": None,
    "vocab": "tensor",
    # activations
    "batch": BATCH_AXES,
    "length": None,
    "act_embed": None,
    "act_heads": "tensor",  # [.., heads, ..] and fused projections' outputs grouped by head
    "act_mlp": "tensor",
}


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  """Resolves the (data, fsdp, tensor) sizes; at most one −1, which takes the remaining devices."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise MeshError(f"mesh: only one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  fixed = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes):
    raise MeshError(f"mesh axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
  if free:
    if num_devices % fixed:
      raise MeshError(f"mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not a "
                      f"multiple of the fixed axes' product {fixed}")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise MeshError(f"mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices but "
                    f"{num_devices} are available; set mesh.data/fsdp/tensor so that the "
                    f"product matches, or use -1 for one axis")
  return tuple(sizes)


def fit_batches(shape: Sequence[int], free_axis: str | None, batches: Sequence[int],
                num_heads: int | None = None) -> tuple[tuple[int, int, int], str | None]:
  """Makes every global batch divisible by data × fsdp, moving a factor to `tensor` if needed.

  `free_axis` is the axis the config left at -1 ("all remaining devices"). When a stage's
  global batch does not divide data × fsdp, that axis shrinks to its largest divisor that fits
  every batch and the rest of its devices go to tensor parallelism (heads / MLP columns), so
  every stage still uses every chip; e.g. 16 chips with batches (48, 32, 16, 8) → fsdp 8,
  tensor 2. Returns (shape, note for the start-up line or None). Raises MeshError naming a
  working mesh when no such move is possible (fixed axes, or heads not divisible).
  """
  data, fsdp, tensor = (int(x) for x in shape)
  bad = [b for b in batches if b % (data * fsdp)]
  if not bad:
    return (data, fsdp, tensor), None
  n = data * fsdp * tensor
  if free_axis in ("data", "fsdp") and tensor == 1:
    size = data if free_axis == "data" else fsdp
    other = fsdp if free_axis == "data" else data
    for keep in sorted((d for d in range(1, size + 1) if size % d == 0), reverse=True):
      move = size // keep
      if all(b % (keep * other) == 0 for b in batches) and (num_heads is None or num_heads % move == 0):
        new = (keep, fsdp, move) if free_axis == "data" else (data, keep, move)
        return new, (f"global batches {tuple(batches)} do not divide {data * fsdp} chips: "
                     f"mesh.{free_axis}={keep}, mesh.tensor={move} (tensor parallelism for the rest)")
  hint = suggest_mesh(n, batches, num_heads)
  raise MeshError(
      f"mesh data={data} × fsdp={fsdp} = {data * fsdp} does not divide the global batch "
      f"{bad[0]} (training.batch_sizes={tuple(batches)}); the batch is sharded over data × fsdp. "
      + (f"A mesh that works on {n} devices: --config.mesh.data={hint[0]} "
         f"--config.mesh.fsdp={hint[1]} --config.mesh.tensor={hint[2]}" if hint else
         f"No (data, fsdp, tensor) split of {n} devices divides every batch: change "
         "training.batch_sizes"))


def suggest_mesh(n: int, batches: Sequence[int], num_heads: int | None = None):
  """(data, fsdp, tensor) on n devices with the most batch sharding, the rest as tensor; or None."""
  for fsdp in sorted((d for d in range(1, n + 1) if n % d == 0), reverse=True):
    tensor = n // fsdp
    if all(b % fsdp == 0 for b in batches) and (num_heads is None or num_heads % tensor == 0):
      return (1, fsdp, tensor)
  return None


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The ('data', 'fsdp', 'tensor') mesh from `cfg.mesh` (or a {axis: size} dict) over all
  (or the given) devices."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  try:
    arr = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # non-TPU topologies / simulated CPU devices: plain row-major order
    arr = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(arr, MESH_AXES)


def rules_from_config(mesh_cfg=None) -> dict[str, Rule]:
  """DEFAULT_RULES updated by an optional `mesh.rules` mapping in the config."""
  rules = dict(DEFAULT_RULES)
  extra = None if mesh_cfg is None else mesh_cfg.get("rules", None)
  if extra:
    rules.update(dict(extra))
  return rules


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules: Mapping[str, Rule] | None = None) -> P:
  """PartitionSpec for one array from its logical axis names.

  A name may map to several mesh axes (the batch: ('data', 'fsdp')); of those, the ones that
  divide the dimension are kept in order. A dimension stays replicated (on an axis) when its
  name has no rule, maps to None, maps to a mesh axis already used by an earlier dimension, or
  is not divisible by that axis' size (e.g. a tiny model's 96-wide kernel on a 64-way axis, a
  rank-8 LoRA factor, or a validation batch of 2 on 8 chips): correctness first, the array is
  copied on that axis instead of failing to shard.
  """
  rules = DEFAULT_RULES if rules is None else rules
  if not names:
    return P()
  if len(names) != len(shape):
    raise ValueError(f"logical axes {tuple(names)} do not match shape {tuple(shape)}")
  used, spec = set(), []
  for name, dim in zip(names, shape):
    rule = rules.get(name) if name is not None else None
    axes, size = [], 1
    for axis in (rule,) if isinstance(rule, str) else (rule or ()):
      if axis not in used and dim % (size * mesh.shape[axis]) == 0:
        axes.append(axis)
        size *= mesh.shape[axis]
    used.update(axes)
    spec.append(None if not axes else axes[0] if isinstance(rule, str) else tuple(axes))
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def tree_shardings(tree, mesh: Mesh, rules: Mapping[str, Rule] | None = None):
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


def batch_sharding(mesh: Mesh, shape: Sequence[int],
                   rules: Mapping[str, Rule] | None = None) -> NamedSharding:
  """Leading (batch) axis over the 'batch' rule's axes that divide it; other axes replicated."""
  names = ("batch",) + (None,) * (len(shape) - 1) if len(shape) else ()
  return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_array(value, sharding: NamedSharding) -> jax.Array:
  """A host value that every process holds in full → one global jax.Array with `sharding`.

  Works when the sharding spans devices of other processes (multi-host), where
  `jax.device_put` would refuse: each process fills only its addressable shards.
  """
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def abstract_with_shardings(tree, shardings):
  """ShapeDtypeStructs carrying the target shardings: what Orbax restores into."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                      tree, shardings)


# --------------------------------------------------------------------------- activations

_ACTIVATIONS: contextvars.ContextVar = contextvars.ContextVar("cotir_activation_sharding",
                                                               default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Mapping[str, Rule] | None = None):
  """While tracing inside this context, `constrain` pins activations on `mesh` by `rules`."""
  token = _ACTIVATIONS.set((mesh, dict(DEFAULT_RULES if rules is None else rules)))
  try:
    yield
  finally:
    _ACTIVATIONS.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` of an activation by logical names; identity outside
  `activation_sharding` (plain module calls, tests, one device)."""
  ctx = _ACTIVATIONS.get()
  if ctx is None:
    return x
  mesh, rules = ctx
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, x.shape,
                                                                                 mesh, rules)))
