"""The training workdir: one run at a time, and start-up checks that fail in one line.

`lock(workdir, is_lead)` holds `<workdir>/train.lock` (JSON: host, pid, start time, boot id,
the process's start tick, a nonce) for the whole run, so a relaunch while the old job still
runs exits at once naming the holder instead of interleaving checkpoints with it.

* Taken by exclusive create (O_CREAT | O_EXCL), then read back. Exclusive create is atomic on
  local disks and NFS (v3 and v4 have an exclusive create mode). flock() would be simpler and
  vanish with its process, but it is not shared between gcsfuse mounts (a GCS bucket mounted on
  each TPU VM) and depends on lock daemons over NFS. gcsfuse makes a new file visible to other
  mounts only when it is closed, and the first close wins: reading the file back after closing
  it detects a run on another host that raced us. (Use a bucket mounted without metadata
  caching for the workdir, or another mount may not see the lock for a cache TTL.)
* A lock whose process is certainly gone is taken over with a warning: same host and the
  process no longer runs, the host has rebooted since (boot id), or the pid now belongs to
  another process (start tick). Taking over renames the stale file aside and compares it with
  what was judged stale, so of two runs taking over at once only one proceeds.
* A lock held on another host counts as live: its process cannot be probed from here, and
  expiring it by age would let a stalled (not dead) job and its relaunch write the same
  checkpoints — the failure the lock prevents. When the holder's host is known to be gone (a
  pod slice deleted or preempted and recreated under new host names), re-run with
  `take_over=True` (`python -m cotir_jax.train --take-over-lock`).
* Multi-host: all processes share the workdir; only process 0 takes the lock and every other
  process learns its outcome (one broadcast), so all exit with the same line.
* Released when the `with` block ends: normal end, an exception, and the loop's SIGTERM /
  SIGINT path (which saves, then returns). A process killed outright leaves a stale lock that
  the next run on the same host takes over.

`check(workdir, checkpoint_nbytes)` runs before training: the workdir must take a file, and have
at least two checkpoints' worth of free space (a new checkpoint is written in full before the
oldest is deleted).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import secrets
import shutil
import socket
import tempfile
import time

import jax
import numpy as np

from cotir_jax.cli import UserError

LOCK_NAME = "train.lock"
# An unreadable lock file this old was left by a process killed between creating and writing it.
_UNREADABLE_STALE_S = 10.0

log = logging.getLogger("cotir_jax.train")


class WorkdirError(UserError, RuntimeError):
  """The workdir cannot be used as asked; the message is one line meant for the user."""


def _read_text(path: str) -> str | None:
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except (FileNotFoundError, NotADirectoryError):
    return None


def _boot_id() -> str | None:
  text = _read_text("/proc/sys/kernel/random/boot_id")
  return text.strip() if text else None


def _process_start(pid: int) -> int | None:
  """Start time of `pid` in clock ticks since boot (Linux), which tells a reused pid apart."""
  text = _read_text(f"/proc/{pid}/stat")
  try:
    return int(text.rsplit(")", 1)[1].split()[19]) if text else None
  except (IndexError, ValueError):
    return None


def _identity() -> dict:
  started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
  return {"host": socket.gethostname(), "pid": os.getpid(), "started": started,
          "boot_id": _boot_id(), "pid_start": _process_start(os.getpid()),
          "nonce": secrets.token_hex(8)}  # tells two locks of one process apart


def _holder_gone(holder: dict) -> bool:
  """True only when the holder's process certainly no longer runs (it must be on this host)."""
  if holder.get("host") != socket.gethostname():
    return False
  if holder.get("boot_id") and _boot_id() and holder["boot_id"] != _boot_id():
    return True
  pid = holder.get("pid")
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except PermissionError:
    pass  # it runs, as another user
  start = _process_start(pid)
  return holder.get("pid_start") is not None and start is not None and start != holder["pid_start"]


def _describe(holder: dict) -> str:
  return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
          f"started {holder.get('started', '?')}")


def _held(workdir: str, holder: dict) -> WorkdirError:
  if holder.get("host") == socket.gethostname():
    hint = "wait for it to finish or stop it"
  else:
    hint = ("wait for it to finish or stop it; if its host is gone (deleted or preempted), "
            "re-run with --take-over-lock")
  return WorkdirError(f"workdir {workdir} is in use by another training run "
                      f"({_describe(holder)}); {hint}")


def _not_writable(workdir: str, e: OSError) -> WorkdirError:
  return WorkdirError(f"workdir {workdir} is not writable ({e.strerror or e}); "
                      "point --workdir at a writable directory or fix its permissions")


def _create(path: str, text: str) -> None:
  """Creates `path` holding `text`; FileExistsError when it exists."""
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
  try:
    try:
      os.write(fd, text.encode())
      os.fsync(fd)
    finally:
      os.close(fd)
  except OSError as e:
    if e.errno != errno.ESTALE:  # ESTALE (gcsfuse): another mount's lock won; the file is theirs
      os.unlink(path)  # never leave an empty lock behind (full disk, quota)
    raise


def _parse(text: str | None) -> dict | None:
  try:
    holder = json.loads(text) if text else None
  except ValueError:
    return None
  return holder if isinstance(holder, dict) else None


def _remove_stale(workdir: str, path: str, stale: str) -> None:
  """Removes the lock file if it still holds `stale`; raises if a live run replaced it."""
  aside = f"{path}.{socket.gethostname()}.{os.getpid()}.stale"
  try:
    os.rename(path, aside)  # atomic: of several runs taking over, each moves a different file
  except FileNotFoundError:
    return
  moved = _read_text(aside) or ""
  try:
    if moved != stale:  # another run took the lock after we read it: give it back
      with contextlib.suppress(FileExistsError):
        _create(path, moved)
      raise _held(workdir, _parse(moved) or {})
  finally:
    os.unlink(aside)


def _acquire(workdir: str, path: str, take_over: bool) -> str:
  """Takes the lock; returns the text written (to recognise our own lock when releasing)."""
  mine = json.dumps(_identity())
  for _ in range(5):  # a lock can vanish or change between our steps; a few rounds settle it
    try:
      _create(path, mine)
    except FileExistsError:
      pass
    except OSError as e:
      if e.errno != errno.ESTALE:
        raise _not_writable(workdir, e) from None
    if (text := _read_text(path)) == mine:
      return mine
    for _ in range(10):  # a lock being written right now: give its writer a moment
      if text is None or _parse(text) is not None:
        break
      time.sleep(0.1)
      text = _read_text(path)
    if text is None:
      continue
    holder = _parse(text)
    try:
      age = time.time() - os.path.getmtime(path)
    except FileNotFoundError:
      continue
    if holder is None and (age >= _UNREADABLE_STALE_S or take_over):
      reason = "an unreadable lock file, left by a process killed while writing it"
    elif holder is None:
      raise WorkdirError(f"workdir {workdir} is being locked by another training run right now "
                         f"({path} is not written yet)")
    elif _holder_gone(holder):
      reason = f"{_describe(holder)}, whose process is gone"
    elif take_over:
      reason = f"{_describe(holder)}, as --take-over-lock asks"
    else:
      raise _held(workdir, holder)
    log.warning("taking over the lock of workdir %s from %s", workdir, reason)
    try:
      _remove_stale(workdir, path, text)
    except OSError as e:
      raise _not_writable(workdir, e) from None
  raise WorkdirError(f"could not take the lock {path}: other runs keep replacing it")


def _release(workdir: str, path: str, mine: str) -> None:
  """Deletes the lock if it is still ours; never raises (it runs while errors propagate)."""
  try:
    current = _read_text(path)
    if current == mine:
      os.unlink(path)
    elif current is not None:
      log.warning("the lock of workdir %s now belongs to %s; leaving it", workdir,
                  _describe(_parse(current) or {}))
  except OSError as e:
    log.warning("could not release the lock %s: %s", path, e)


def _lead_outcome(error: str | None) -> str | None:
  """Every process gets process 0's lock outcome (None: taken), so no process runs alone."""
  if jax.process_count() == 1:
    return error
  from jax.experimental import multihost_utils
  buf = np.zeros(4096, np.uint8)
  data = (error or "").encode()[:buf.size]
  buf[:len(data)] = np.frombuffer(data, np.uint8)
  buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
  return bytes(buf).rstrip(b"\0").decode(errors="replace") or None


@contextlib.contextmanager
def lock(workdir: str | os.PathLike, is_lead: bool = True, *, take_over: bool = False):
  """Holds `<workdir>/train.lock` for the `with` block (see the module docstring).

  Creates the workdir if needed. Raises WorkdirError (one line) when another run holds the lock
  or the workdir is not writable. `take_over=True` takes a lock that still looks live.
  """
  workdir = os.fspath(workdir)
  path = os.path.join(workdir, LOCK_NAME)
  mine, error = None, None
  if is_lead:
    try:
      try:
        os.makedirs(workdir, exist_ok=True)
      except OSError as e:
        raise _not_writable(workdir, e) from None
      mine = _acquire(workdir, path, take_over)
    except WorkdirError as e:
      error = str(e)
  error = _lead_outcome(error)
  if error:
    raise WorkdirError(error)
  try:
    yield
  finally:
    if mine is not None:
      _release(workdir, path, mine)


def _size(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(n) < 1024:
      return f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.1f} TiB"


def check(workdir: str | os.PathLike, checkpoint_nbytes: int) -> int:
  """Fails with one line unless `workdir` takes a file and has ≥ 2 × `checkpoint_nbytes` free.

  `checkpoint_nbytes`: the size of one checkpoint (global bytes of the trainable state and the
  optimizer state, `checkpoint.estimate_nbytes(state)`). Returns the free bytes.
  """
  workdir = os.fspath(workdir)
  try:
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write-check-") as f:
      f.write(b"cotir_jax")
      f.flush()
  except OSError as e:
    raise _not_writable(workdir, e) from None
  free = shutil.disk_usage(workdir).free
  if free < 2 * checkpoint_nbytes:
    raise WorkdirError(
        f"workdir {workdir} has {_size(free)} free but one checkpoint takes about "
        f"{_size(checkpoint_nbytes)} and the run needs room for two "
        f"({_size(2 * checkpoint_nbytes)}: a new checkpoint is written before the oldest is "
        "deleted); free space or choose another --workdir")
  return free
