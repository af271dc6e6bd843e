"""Training checkpoints: Orbax `CheckpointManager` in `<workdir>/checkpoints/`.

One step holds
* `state`: any pytree of arrays — the train loop passes {trainable params, optimizer state
  (primal and dual, λ included), step, RNG key, and the params' EMA when the run keeps one};
  typed PRNG keys are stored as key data;
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

Fused projections: the meta records `fused_layout` (their columns grouped by head,
`models.layers.FusedLayout`); a checkpoint written before, whose parts lay side by side, is
converted as it is restored (parameters and the optimizer moments that mirror them), so a run
started then resumes.

Resuming with another config: `check_config(latest_meta(workdir), cfg)` reads the config stored
with the newest checkpoint (the meta item alone: no state target, no Orbax manager) and, before
Orbax sees a state, fails with every changed field that defines the checkpoint
(`CHECKPOINT_FIELDS`, and `SWITCH_FIELDS` turned on or off), as `field: checkpoint value →
config value`; the other changes are returned for the start-up summary.

Write failures (disk full, read-only or unwritable directory, quota) surface from Orbax, often
in its background thread, i.e. at the next `save`, at `wait` or `close`. They become one
`CheckpointWriteError` line naming the step that failed and the last complete checkpoint, which
a failed save never touches (retention deletes old steps only after a new one is finalised).
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import json
import os
import pathlib
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from cotir_jax.models.layers import FUSED_LAYOUT
from cotir_jax.train.workdir import WorkdirError

# Config fields that define what a checkpoint holds: compat and every model field (architecture,
# LoRA, CoT adapter, frozen encoders, dtypes), except those in MAY_CHANGE, which only choose how
# the same model is computed or where files live. fnmatch patterns over dotted field paths.
# Resuming with any other field changed (learning rate, schedule, iterations, logging, data,
# mesh, paths) is allowed; so is a field that only one of the two configs has (a config schema
# that gained a field since the checkpoint was written).
CHECKPOINT_FIELDS = ("compat", "model.*")
MAY_CHANGE = ("model.pretrained", "model.tokenizer", "model.tokenizer_2", "model.attention*",
              "model.scan_layers", "model.remat_policy", "model.mixed_precision",
              "model.lora.merge_for_inference")

# Fields that define the checkpoint only as far as they switch a part of the state on or off:
# its value may change on resume (another EMA decay), its being zero may not (the state would
# gain or lose its `ema` entry).
SWITCH_FIELDS = ("training.ema_decay",)

# How a failed write looks when it comes out of Orbax: an OSError, or tensorstore's ValueError
# carrying an absl status and the OS error (e.g. "RESOURCE_EXHAUSTED: Error writing local file").
_WRITE_FAILURE = re.compile(r"RESOURCE_EXHAUSTED|PERMISSION_DENIED|os_error_code|Error writing|"
                            r"No space left|Read-only file system|Permission denied|Disk quota")


class CheckpointWriteError(WorkdirError):
  """A checkpoint could not be written; the last complete one is intact and named."""


class IncompatibleConfigError(WorkdirError):
  """The config differs from the checkpoint's in fields that define the checkpoint."""


class ConfigChange(NamedTuple):
  field: str
  stored: Any     # the checkpoint's value
  current: Any    # the config's value

  def __str__(self):
    show = lambda v: v if v is _ABSENT else json.dumps(v, ensure_ascii=False)
    return f"{self.field}: {show(self.stored)} → {show(self.current)}"


_ABSENT = "(absent)"  # the value shown for a field that one of the two configs lacks


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


def _config_json(config) -> dict:
  """A ConfigDict (via its `to_json`), a dict or a JSON string, as plain JSON values."""
  if hasattr(config, "to_json"):
    return json.loads(config.to_json())
  if isinstance(config, str):
    return json.loads(config)
  return json.loads(json.dumps(config))


def _flat_fields(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) and v:
      out.update(_flat_fields(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def defines_checkpoint(field: str) -> bool:
  """Whether changing `field` (a dotted config path) makes a checkpoint unusable."""
  match = lambda patterns: any(fnmatch.fnmatchcase(field, p) for p in patterns)
  return match(CHECKPOINT_FIELDS) and not match(MAY_CHANGE)


def config_changes(stored, config) -> tuple[list[ConfigChange], list[ConfigChange]]:
  """(changes that break the checkpoint, allowed changes) from the `stored` config to `config`."""
  old, new = _flat_fields(_config_json(stored)), _flat_fields(_config_json(config))
  breaking, allowed = [], []
  for field in sorted(old.keys() | new.keys()):
    change = ConfigChange(field, old.get(field, _ABSENT), new.get(field, _ABSENT))
    if change.stored == change.current:
      continue
    both = field in old and field in new
    switched = field in SWITCH_FIELDS and bool(old.get(field)) != bool(new.get(field))
    (breaking if (both and defines_checkpoint(field)) or switched else allowed).append(change)
  return breaking, allowed


def latest_meta(workdir: str | os.PathLike) -> dict | None:
  """The newest finished checkpoint's meta item (its step, config and data-iterator state as
  saved), or None without one. Read from its files alone: an Orbax manager waits for every
  process when it is built, and this runs before the processes agree to go on."""
  directory = os.path.join(os.path.abspath(os.fspath(workdir)), "checkpoints")
  steps = ocp.path.step.checkpoint_steps(directory) if os.path.isdir(directory) else []
  if not steps:
    return None
  step = max(steps)
  meta = ocp.JsonCheckpointHandler().restore(pathlib.Path(directory, str(step), "meta"))
  return {**meta, "step": step, "directory": directory}


def check_config(meta: dict | None, config) -> list[ConfigChange]:
  """Before restoring: raises IncompatibleConfigError listing every field that defines the
  checkpoint of `meta` (`latest_meta`) and differs (`field: checkpoint value → config value`);
  returns the allowed changes (empty without a checkpoint or a stored config)."""
  if meta is None or meta.get("config") is None:
    return []
  breaking, allowed = config_changes(meta["config"], config)
  if breaking:
    raise IncompatibleConfigError(
        f"the config changes fields that define the checkpoint at step {meta['step']} in "
        f"{meta['directory']}; resume with the checkpoint's values or start a new --workdir:\n  "
        + "\n  ".join(map(str, breaking)))
  return allowed


def estimate_nbytes(state) -> int:
  """Bytes one checkpoint of `state` takes: global array sizes (PRNG keys as their key data).

  `state`: arrays or their `jax.ShapeDtypeStruct`s (what `restore` takes as its target).
  """
  total = 0
  for x in jax.tree.leaves(state):
    if _is_key(x):
      x = jax.eval_shape(jax.random.key_data, x)
    total += int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
  return total


def _write_failure_reason(e: BaseException) -> str | None:
  """The OS error behind a failed checkpoint write (None: `e` is not a write failure)."""
  text = str(e)
  if not (isinstance(e, OSError) or _WRITE_FAILURE.search(text)):
    return None
  code = re.search(r"os_error_code='?(\d+)", text)
  if code:
    return os.strerror(int(code.group(1)))
  if isinstance(e, OSError) and e.errno:
    return os.strerror(e.errno)
  return text.splitlines()[0][:300] if text else type(e).__name__


def _abstract(x):
  """ShapeDtypeStruct with the sharding the restored array should land in."""
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  sharding = getattr(x, "sharding", None)
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)


def _regroup_side_by_side(names, leaves, source: str) -> list:
  """The restored leaves of a checkpoint written before the fused projections were grouped by
  head, in our layout (`convert.cotir.regroup_side_by_side`), in their shardings."""
  from cotir_jax.convert import cotir
  paths = [".".join(n) for n in names]
  params = {p[len("params."):]: x for p, x in zip(paths, leaves) if p.startswith("params.")}
  params = {(p[:-len(".value")] if p.endswith(".value") else p): x for p, x in params.items()}
  if "cot_adapter.decoder.linear1.kernel" not in params:
    return leaves  # not a CoTIR training state
  spec = cotir.spec_of_trainable(params, source)
  arrays = {p: x for p, x in zip(paths, leaves) if not _is_key(x)}
  # donated: the arrays left as they are alias their inputs, the others replace them
  arrays = jax.jit(lambda a: cotir.regroup_side_by_side(a, spec, jnp), donate_argnums=0,
                   out_shardings={p: x.sharding for p, x in arrays.items()})(arrays)
  if jax.process_index() == 0:
    print(f"cotir_jax: {source} was written before the fused projections were grouped by head; "
          "converted as restored", flush=True)
  return [arrays.get(p, x) for p, x in zip(paths, leaves)]


class Checkpointer:
  """Save / restore / retention of training state in `<workdir>/checkpoints/`."""

  def __init__(self, workdir: str | os.PathLike, *, max_to_keep: int | None = 2,
               async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(os.fspath(workdir)), "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))
    self._in_flight: int | None = None  # the step of an async save not yet waited for

  @contextlib.contextmanager
  def _write_errors(self, step: int | None):
    """Turns a failed write of `step` into one CheckpointWriteError line."""
    try:
      yield
    except Exception as e:
      reason = _write_failure_reason(e)
      if reason is None:
        raise
      self._manager.reload()
      last = self._manager.latest_step()
      last = f"step {last}" if last is not None else "none"
      raise CheckpointWriteError(
          f"checkpoint of step {step} could not be written to {self.directory} ({reason}); the "
          f"last complete checkpoint is {last}; free space or fix the directory's permissions, "
          "then re-run the same command to resume from it") from e

  # ------------------------------------------------------------------ save
  def save(self, step: int, state, *, data_state: dict | bytes | None = None,
           config: Any = None, extra: dict | None = None) -> bool:
    """Starts saving `state` at `step` (returns at once when async); False if `step` exists.

    `config`: an ml_collections ConfigDict (stored via its `to_json`), a dict or a JSON string.
    Raises CheckpointWriteError for this save or an earlier async one that failed.
    """
    self.wait()
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
            "extra": extra or {}, "fused_layout": FUSED_LAYOUT}
    if isinstance(data_state, (bytes, bytearray)):
      meta["data_state"] = {"__bytes_b64__": base64.b64encode(bytes(data_state)).decode()}
    else:
      meta["data_state"] = data_state
    if config is not None:
      meta["config"] = _config_json(config)
    args = ocp.args.Composite(state=ocp.args.StandardSave(_nest(arrays)),
                              meta=ocp.args.JsonSave(meta))
    with self._write_errors(step):
      saved = self._manager.save(step, args=args, force=True)
    self._in_flight = step
    return saved

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
    if meta.get("fused_layout") != FUSED_LAYOUT:
      restored = _regroup_side_by_side(names, restored, f"{self.directory}/{step}")
    data_state = meta.get("data_state")
    if isinstance(data_state, dict) and "__bytes_b64__" in data_state:
      data_state = base64.b64decode(data_state["__bytes_b64__"])
    return {"step": int(step), "state": jax.tree_util.tree_unflatten(treedef, restored),
            "data_state": data_state, "config": meta.get("config"), "extra": meta.get("extra", {})}

  # ------------------------------------------------------------------ lifecycle
  def wait(self) -> None:
    """Blocks until an in-flight async save is finalised (renamed into place)."""
    step, self._in_flight = self._in_flight, None
    with self._write_errors(step):
      self._manager.wait_until_finished()

  def check_for_errors(self) -> None:
    """Raises CheckpointWriteError if the last async save has failed already; never blocks
    (the loop calls it at logging steps, to learn of a full disk before the next save)."""
    if self._in_flight is not None and not self._manager.is_saving_in_progress():
      self.wait()

  def close(self) -> None:
    """Waits for pending saves and releases the manager; call before the process exits."""
    try:
      self.wait()
    finally:
      self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
