"""What the processes of a multi-host run must agree on, without a device collective.

Every process (one per host) runs the same program, so anything one process decides alone -- a
start-up check that fails on its host, a SIGTERM only it received -- must become the decision
of all of them before the next collective; otherwise the others wait in that collective until
the heartbeat timeout. Agreement goes through the coordination service of `jax.distributed`
(its key-value store and its preemption service), which involves no device and never makes the
host wait for a running step:

* `add_arguments` / `initialize`: the `--distributed` flags of the command lines and
  `jax.distributed.initialize` (explicit settings, or auto-detection on TPU VMs, SLURM, MPI);
* `all_gather(obj)`: every process's JSON-able value, in process order; `barrier()`;
* `agree(failure)`: one verdict on every process from each process's start-up checks;
* `StopSignal`: SIGTERM / SIGINT on any process stops every process after the same step.

With one process nothing goes through the coordination service (there is none).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal

import jax
from jax.experimental import multihost_utils

_rounds = itertools.count()  # every process makes the same sequence of calls: unique keys
_timeout_s = 300             # how long to wait for the other processes (--distributed_timeout)


def _env_int(name):
  value = os.environ.get(name)
  return int(value) if value not in (None, "") else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The multi-host flags every command line shares (train, restore)."""
  parser.add_argument("--distributed", action="store_true",
                      help="multi-host: call jax.distributed.initialize() first, on every process")
  parser.add_argument("--coordinator", default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
                      help="HOST:PORT of process 0's coordination service (env "
                           "JAX_COORDINATOR_ADDRESS); auto-detected on TPU VMs / SLURM / MPI")
  parser.add_argument("--num_processes", type=int, default=_env_int("JAX_NUM_PROCESSES"),
                      help="number of processes (env JAX_NUM_PROCESSES)")
  parser.add_argument("--process_id", type=int, default=_env_int("JAX_PROCESS_ID"),
                      help="this process's index, 0 .. num_processes-1 (env JAX_PROCESS_ID)")
  parser.add_argument("--distributed_timeout", type=int, default=300,
                      help="seconds to wait for the other processes at start-up, and before a "
                           "dead process is declared (the others then exit with an error)")


def initialize(args: argparse.Namespace, parser: argparse.ArgumentParser, *,
               preemption: bool = True) -> None:
  """`init_distributed` when `--distributed` is given (parsed by `add_arguments`' flags)."""
  if args.distributed:
    init_distributed(args.coordinator, args.num_processes, args.process_id,
                     args.distributed_timeout, preemption=preemption)
  elif any(v is not None for v in (args.num_processes, args.process_id)):
    parser.error("--num_processes / --process_id need --distributed")


def init_distributed(coordinator=None, num_processes=None, process_id=None, timeout_s=300, *,
                     preemption: bool = True):
  """`jax.distributed.initialize` with explicit settings where given, auto-detection otherwise.

  On CPU the collectives go through gloo (tests and CPU clusters). A process that dies is
  noticed by the others through the coordination service's heartbeat (`timeout_s`), so they
  exit with an error instead of hanging in a collective. `preemption`: JAX's preemption service
  takes SIGTERM over (`StopSignal` stops every process at one step through it); without it
  SIGTERM ends the process as usual.
  """
  global _timeout_s
  if jax.config.jax_platforms and "cpu" in jax.config.jax_platforms.split(","):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  explicit = [coordinator, num_processes, process_id]
  if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
    raise SystemExit("--distributed: give all of --coordinator, --num_processes and --process_id "
                     "(or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), or none of "
                     "them to let JAX detect the cluster (TPU VM, SLURM, Open MPI)")
  jax.config.update("jax_enable_preemption_service", preemption)
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id, initialization_timeout=timeout_s,
                             heartbeat_timeout_seconds=timeout_s)
  _timeout_s = timeout_s


def all_gather(obj) -> list:
  """Every process's JSON-able `obj`, in process order; a meeting point of all processes.

  Through the coordination service's key-value store: no device collective (which gloo gives
  30 s to form), so processes may arrive minutes apart (up to `--distributed_timeout`)."""
  if jax.process_count() == 1:
    return [obj]
  from jax._src import distributed  # the client of jax.distributed.initialize
  client = distributed.global_state.client
  key = f"cotir_jax/{next(_rounds)}"
  client.key_value_set(f"{key}/{jax.process_index()}", json.dumps(obj))
  return [json.loads(client.blocking_key_value_get(f"{key}/{p}", _timeout_s * 1000))
          for p in range(jax.process_count())]


def barrier() -> None:
  """Returns when every process has called it, however late: call it before a device collective
  that the processes reach at different times (after compiles of unequal length; gloo gives a
  new CPU collective 30 s to form)."""
  all_gather(None)


def agree(failure: str | None) -> str | None:
  """Every process's verdict in one message, the same on all (None: every process passed).

  `failure`: why this process cannot go on (None: it can). Identical failures are named once
  with their processes: "process 1 of 2: ...", "processes 0, 1 of 2: ..."; with one process
  the failure comes back as it is."""
  verdicts = all_gather(failure)
  if len(verdicts) == 1:
    return failure
  by_text: dict[str, list[int]] = {}
  for p, text in enumerate(verdicts):
    if text:
      by_text.setdefault(text, []).append(p)
  parts = [f"process{'es' if len(ps) > 1 else ''} {', '.join(map(str, ps))} of "
           f"{len(verdicts)}: {text}" for text, ps in by_text.items()]
  return "; ".join(parts) or None


class StopSignal:
  """SIGTERM / SIGINT on any process stop every process after the same step, which is then
  checkpointed (a save is collective: all must make it at the same step).

      with StopSignal() as stop:
        for ...:
          state = step(state, batch)
          if stop.check():   # once per step, on every process
            save(); break

  One process: the signal sets a flag that `check` reads. Several: JAX's preemption service
  catches SIGTERM on any process, tells the others through the coordination service and agrees
  in the background on the first step every process has still to finish; `check` only compares
  this process's step count with that agreed step, so the host never waits for a step to finish
  or for another process (no per-step collective). SIGINT is passed on to it as SIGTERM.
  """

  def __init__(self):
    self.signal = None
    self._steps = 0
    self._old = {}
    self._multi = False

  def __enter__(self):
    self._multi = jax.process_count() > 1
    # Several processes: SIGTERM belongs to the preemption service, which installs its handler
    # in jax.distributed.initialize; a Python handler would replace it.
    handled = (signal.SIGINT,) if self._multi else (signal.SIGTERM, signal.SIGINT)
    for s in handled:
      self._old[s] = signal.signal(s, self._handle)
    return self

  def _handle(self, signum, frame):
    self.signal = signum
    if self._multi:
      os.kill(os.getpid(), signal.SIGTERM)

  def check(self) -> bool:
    """Call once after each step, on every process: whether to save and stop after it (the
    same answer on all processes, at the same step)."""
    self._steps += 1
    if not self._multi:
      return self.signal is not None
    return multihost_utils.reached_preemption_sync_point(self._steps)

  @property
  def reason(self) -> str:
    if not self._multi:
      return f"received signal {signal.Signals(self.signal).name}"
    return "received signal SIGTERM on a process of this run"

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)
