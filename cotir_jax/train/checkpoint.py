"""Training checkpoints (design decision 7): Orbax `CheckpointManager` in `<workdir>/checkpoints/`.

One step holds
* `state`: any pytree of arrays — the train loop passes {trainable params, optimizer state
  (primal and dual, λ included), step, RNG key}; typed PRNG keys are stored as key data;
* `meta` (JSON): the data-iterator state (a JSON-able dict, or bytes stored base64), the config
  as JSON, and what is needed to rebuild typed keys.
Base weights are never copied here (the config points at the converted base checkpoint).

Atomicity: Orbax writes each step into `<step>.orbax-checkpoint-tmp-*` and renames it to
`<step>` only once every file is written, so a process killed mid-save leaves at most an
unfinished temporary directory, which `latest_step()` / `restore()` ignore; the last finished
checkpoint stays intact. Saves are asynchronous (arrays are copied to host first, then written
in the background while training continues); call `wait()` before reading the directory and
`close()` before exiting (it waits too).

The state is stored as a nested dict keyed by the pytree's path names, so restoring needs only
a target with the same structure: abstract `jax.ShapeDtypeStruct`s carrying the target
shardings (or concrete arrays, whose shardings are used); arrays land directly in them.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _path_names(path) -> tuple[str, ...]:
  return tuple(_key_name(k) for k in path)


def _is_key(x) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _nest(flat: dict[tuple[str, ...], Any]) -> dict:
  out: dict = {}
  for names, value in flat.items():
    node = out
    for n in names[:-1]:
      node = node.setdefault(n, {})
    if names[-1] in node:
      raise ValueError(f"checkpoint: two leaves share the path {'/'.join(names)}")
    node[names[-1]] = value
  return out


def _get(nested: dict, names: tuple[str, ...]):
  for n in names:
    nested = nested[n]
  return nested


def _flat(tree) -> tuple[list[tuple[str, ...]], list[Any], Any]:
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  names = [_path_names(p) or ("_root",) for p, _ in leaves]
  return names, [x for _, x in leaves], treedef


def _abstract(x):
  """ShapeDtypeStruct with the sharding the restored array should land in."""
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  sharding = getattr(x, "sharding", None)
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)


class Checkpointer:
  """Save / restore / retention of training state in `<workdir>/checkpoints/`."""

  def __init__(self, workdir: str | os.PathLike, *, max_to_keep: int | None = 2,
               async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(os.fspath(workdir)), "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))

  # ------------------------------------------------------------------ save
  def save(self, step: int, state, *, data_state: dict | bytes | None = None,
           config: Any = None, extra: dict | None = None) -> bool:
    """Starts saving `state` at `step` (returns at once when async); False if `step` exists.

    `config`: an ml_collections ConfigDict (stored via its `to_json`), a dict or a JSON string.
    """
    if step in self.all_steps():
      return False
    names, leaves, _ = _flat(state)
    keys = {}
    arrays = {}
    for n, x in zip(names, leaves):
      if _is_key(x):
        keys["/".join(n)] = str(jax.random.key_impl(x))
        x = jax.random.key_data(x)
      arrays[n] = x
    meta = {"step": int(step), "rng_impls": keys, "data_state": None, "config": None,
            "extra": extra or {}}
    if isinstance(data_state, (bytes, bytearray)):
      meta["data_state"] = {"__bytes_b64__": base64.b64encode(bytes(data_state)).decode()}
    else:
      meta["data_state"] = data_state
    if config is not None:
      if hasattr(config, "to_json"):
        meta["config"] = json.loads(config.to_json())
      elif isinstance(config, str):
        meta["config"] = json.loads(config)
      else:
        meta["config"] = config
    args = ocp.args.Composite(state=ocp.args.StandardSave(_nest(arrays)),
                              meta=ocp.args.JsonSave(meta))
    return self._manager.save(step, args=args, force=True)

  # ------------------------------------------------------------------ query
  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest *finished* checkpoint (unfinished temporary directories are ignored)."""
    return self._manager.latest_step()

  # ------------------------------------------------------------------ restore
  def restore(self, target, step: int | None = None) -> dict | None:
    """Restores `step` (default: latest) into the structure, dtypes and shardings of `target`.

    Returns {"step", "state", "data_state", "config", "extra"} or None when there is no
    checkpoint. `data_state` comes back as saved (bytes or dict).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    names, leaves, treedef = _flat(target)
    abstract = {}
    for n, x in zip(names, leaves):
      a = _abstract(x)
      if _is_key(a):
        a = jax.eval_shape(jax.random.key_data, a)
        a = jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(x, "sharding", None))
      abstract[n] = a
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_nest(abstract)), meta=ocp.args.JsonRestore()))
    meta = out["meta"]
    restored = []
    for n, x in zip(names, leaves):
      value = _get(out["state"], n)
      if _is_key(x):
        impl = meta["rng_impls"].get("/".join(n), "threefry2x32")
        value = jax.random.wrap_key_data(value, impl=impl)
      restored.append(value)
    data_state = meta.get("data_state")
    if isinstance(data_state, dict) and "__bytes_b64__" in data_state:
      data_state = base64.b64decode(data_state["__bytes_b64__"])
    return {"step": int(step), "state": jax.tree_util.tree_unflatten(treedef, restored),
            "data_state": data_state, "config": meta.get("config"), "extra": meta.get("extra", {})}

  # ------------------------------------------------------------------ lifecycle
  def wait(self) -> None:
    """Blocks until an in-flight async save is finalised (renamed into place)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager; call before the process exits."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
