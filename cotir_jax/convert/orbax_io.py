"""Orbax PyTree checkpoints of host (numpy) weights, and the trainable-weights checkpoint.

Why a custom handler: Orbax's default numpy handler deep-copies every host array before
writing and compresses chunk by chunk, which doubles peak memory while saving a converted
model. Here arrays are written in place (`deepcopy_host_arrays=False`, no compression): peak
memory during a save is the tree itself.

Trees are nested dicts with string keys, one level per component of our dotted parameter
paths (`backbone.single_blocks.linear1.lora.a` → tree["backbone"]["single_blocks"]["linear1"]
["lora"]["a"]); that is `nnx.State.to_pure_dict()` with every key a string.

Trainable-weights checkpoint (what `convert/cotir_to_orbax.py` writes, training can start
from, and `convert/orbax_to_cotir.py` reads):

    <dir>/params/      Orbax PyTree: the nested dict of nnx.state(model, models.TRAINABLE)
                       (LoRA a [.., in, r], b [.., r, out], b_bias; the whole `cot_adapter`)
    <dir>/cotir.json   {"format", "family", "fused_layout", "dtype", "sources", "config"}

`load_trainable(path)` also reads training checkpoints: a step directory holding an Orbax item
`params` (that tree) or an item `state` whose tree has a `params` key (only that subtree is
read), the `checkpoints/` directory or a workdir containing it (newest finished step). The
`params` tree may be a pure dict or an `nnx.State` saved as is (each Variable adds a trailing
`value` key, which is dropped). `load_trainable(path, item="ema")` reads the moving average of
the weights that a run with `training.ema_decay` > 0 keeps beside them (`state/ema`, the same
paths in float32); only training checkpoints can hold one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import type_handlers

from cotir_jax.convert.core import ConversionError

TRAINABLE_FORMAT = "cotir_jax.trainable/1"
PARAMS_ITEM = "params"
EMA_ITEM = "ema"  # the EMA of the trainable weights in a training state (training.ema_decay)
META_FILE = "cotir.json"


# ----------------------------------------------------------------------------- trees

def nest(flat: Mapping[str, object]) -> dict:
  """{'a.b.c': x} → {'a': {'b': {'c': x}}}."""
  out: dict = {}
  for path, value in flat.items():
    node = out
    *parents, leaf = path.split(".")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def flatten(tree: Mapping) -> dict[str, object]:
  """Inverse of `nest`; accepts int keys too (as `to_pure_dict` gives for lists)."""
  out = {}

  def walk(node, prefix):
    for k, v in node.items():
      path = f"{prefix}{k}"
      if isinstance(v, Mapping):
        walk(v, path + ".")
      else:
        out[path] = v
  walk(tree, "")
  return out


# ----------------------------------------------------------------------------- Orbax

def _checkpointer() -> ocp.Checkpointer:
  registry = type_handlers.create_type_handler_registry(
      (np.ndarray, type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
      (np.number, type_handlers.ScalarHandler()),
      (int, type_handlers.ScalarHandler()), (float, type_handlers.ScalarHandler()),
      (jax.Array, type_handlers.ArrayHandler()))
  handler = ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry)
  return ocp.Checkpointer(handler)


def save_tree(path: str, tree: Mapping) -> None:
  """Writes a nested dict of numpy arrays as one Orbax PyTree checkpoint at `path`."""
  tree = jax.tree.map(np.asarray, dict(tree))
  _checkpointer().save(os.path.abspath(path), args=ocp.args.PyTreeSave(tree))


def is_tree_checkpoint(path: str) -> bool:
  return os.path.isdir(path) and (os.path.exists(os.path.join(path, "_METADATA"))
                                  or os.path.exists(os.path.join(path, "_CHECKPOINT_METADATA")))


def tree_metadata(path: str) -> dict:
  """Nested dict of Orbax array metadata (shape, dtype) of a PyTree checkpoint."""
  if not is_tree_checkpoint(path):
    raise ConversionError(f"{path}: not an Orbax PyTree checkpoint (no _METADATA)")
  md = _checkpointer().metadata(os.path.abspath(path))
  md = getattr(md, "item_metadata", md)
  return dict(getattr(md, "tree", md))


def restore_tree(path: str, keys: tuple[str, ...] | None = None, targets: Mapping | None = None
                 ) -> dict:
  """Restores a PyTree checkpoint (or only its top-level `keys`) as numpy arrays.

  `targets`: optional nested dict (top-level keys as in the checkpoint) of
  `jax.ShapeDtypeStruct`s with shardings: those subtrees land directly as sharded jax arrays
  in the target dtype, without a host copy of the whole tree.
  """
  meta = tree_metadata(path)
  if keys is not None:
    missing = [k for k in keys if k not in meta]
    if missing:
      raise ConversionError(f"{path}: checkpoint has no {missing} (it has {sorted(meta)})")
    meta = {k: meta[k] for k in keys}
  item, args = {}, {}
  for name, sub in meta.items():
    if targets is not None and name in targets:
      item[name] = targets[name]
      args[name] = ocp.checkpoint_utils.construct_restore_args(targets[name])
    else:
      item[name] = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), sub)
      args[name] = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), sub)
  partial = keys is not None
  return _checkpointer().restore(os.path.abspath(path), args=ocp.args.PyTreeRestore(
      item=item, restore_args=args, partial_restore=partial))


# ----------------------------------------------------------------------------- trainable

def save_trainable(out: str, params: Mapping[str, object], meta: dict, *,
                   overwrite: bool = False) -> str:
  """Writes a trainable-weights checkpoint (layout in the module docstring), atomically."""
  with atomic_dir(out, overwrite=overwrite) as tmp:
    save_tree(os.path.join(tmp, PARAMS_ITEM), nest({k: np.asarray(v) for k, v in params.items()}))
    with open(os.path.join(tmp, META_FILE), "w") as f:
      json.dump({"format": TRAINABLE_FORMAT, **meta}, f, indent=2, default=str)
  return out


def _latest_step_dir(path: str) -> str | None:
  steps = [d for d in os.listdir(path) if re.fullmatch(r"\d+", d)
           and os.path.isdir(os.path.join(path, d))]
  return os.path.join(path, max(steps, key=int)) if steps else None


def resolve_trainable(path: str, item: str = PARAMS_ITEM) -> tuple[str, tuple[str, ...]]:
  """(Orbax PyTree dir, keys inside it) holding the trainable params (`item="ema"`: their
  moving average) for any accepted path."""
  if not os.path.isdir(path):
    raise ConversionError(f"{path}: no such checkpoint directory")
  for candidate in (path, os.path.join(path, "checkpoints")):
    if not os.path.isdir(candidate):
      continue
    if is_tree_checkpoint(os.path.join(candidate, PARAMS_ITEM)):
      if item != PARAMS_ITEM:
        raise ConversionError(f"{path}: a trainable-weights checkpoint holds no {item!r} weights; "
                              "only a training checkpoint of a run with training.ema_decay > 0 "
                              "does")
      return os.path.join(candidate, PARAMS_ITEM), ()
    state = os.path.join(candidate, "state")
    if is_tree_checkpoint(state):
      if item not in tree_metadata(state):
        hint = " (the run had training.ema_decay=0)" if item == EMA_ITEM else ""
        raise ConversionError(f"{state}: training state has no '{item}' entry{hint}")
      return state, (item,)
    step = _latest_step_dir(candidate)
    if step is not None:
      return resolve_trainable(step, item)
  raise ConversionError(f"{path}: found no trainable weights (expected <dir>/{PARAMS_ITEM}/, "
                        f"<step>/state/ with '{PARAMS_ITEM}', a checkpoints/ dir of steps, or a "
                        "workdir containing checkpoints/)")


def load_trainable(path: str, item: str = PARAMS_ITEM) -> tuple[dict[str, np.ndarray], dict]:
  """(flat dotted-path → numpy params, meta dict) from any directory `resolve_trainable` accepts;
  `item="ema"`: the moving average of a training checkpoint instead of its weights. The meta is
  `cotir.json`'s, or a training step's (`config`, `step`, ...)."""
  tree_dir, keys = resolve_trainable(path, item)
  tree = restore_tree(tree_dir, keys=keys or None)
  for k in keys:
    tree = tree[k]
  meta = {}
  step_meta = os.path.join(os.path.dirname(tree_dir), "meta", "metadata")  # a training step's
  for f in ([step_meta] if keys else []) + [os.path.join(c, META_FILE)
                                            for c in (os.path.dirname(tree_dir), path)]:
    if os.path.isfile(f):
      with open(f) as fh:
        meta = json.load(fh)
      break
  # an nnx.State saved as is (what the train loop does) carries each Variable's `value` leaf
  flat = {(k[:-len(".value")] if k.endswith(".value") else k): v for k, v in flatten(tree).items()}
  return flat, meta


# ----------------------------------------------------------------------------- atomic output

class atomic_dir:
  """`with atomic_dir(out) as tmp:` write into `tmp` (a sibling of `out`); renamed to `out` on
  success, removed on failure, so a crash leaves nothing half-made at `out`."""

  def __init__(self, out: str, *, overwrite: bool = False):
    self.out = os.path.abspath(out)
    self.overwrite = overwrite
    parent, base = os.path.split(self.out)
    self.tmp = os.path.join(parent, f".{base}.tmp-{os.getpid()}")

  def __enter__(self) -> str:
    if os.path.exists(self.out) and not self.overwrite:
      raise ConversionError(f"{self.out}: already exists (choose another --out or overwrite)")
    os.makedirs(os.path.dirname(self.out), exist_ok=True)
    shutil.rmtree(self.tmp, ignore_errors=True)
    os.makedirs(self.tmp)
    return self.tmp

  def __exit__(self, exc_type, exc, tb):
    if exc_type is not None:
      shutil.rmtree(self.tmp, ignore_errors=True)
      return False
    if os.path.exists(self.out):
      old = self.out + f".old-{os.getpid()}"
      os.replace(self.out, old)
      os.replace(self.tmp, self.out)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(self.tmp, self.out)
    return False
