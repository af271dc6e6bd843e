"""`python -m cotir_jax.train --config configs/<name>.py [--config.a.b=v ...] [--workdir DIR]`.

Multi-host: add `--distributed` on every process. On TPU VMs, SLURM and Open MPI, JAX finds the
coordinator, process count and process index itself; elsewhere pass them (or set the matching
environment variables): every process gets the same `--coordinator` and `--num_processes` and
its own `--process_id`.
"""

import logging
import os
import sys

from cotir_jax import cli


def _env_int(name):
  value = os.environ.get(name)
  return int(value) if value not in (None, "") else None


def init_distributed(coordinator=None, num_processes=None, process_id=None, timeout_s=300):
  """`jax.distributed.initialize` with explicit settings where given, auto-detection otherwise.

  On CPU the collectives go through gloo (tests and CPU clusters). A process that dies is
  noticed by the others through the coordination service's heartbeat (`timeout_s`), so they
  exit with an error instead of hanging in a collective.
  """
  import jax
  if jax.config.jax_platforms and "cpu" in jax.config.jax_platforms.split(","):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  explicit = [coordinator, num_processes, process_id]
  if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
    raise SystemExit("--distributed: give all of --coordinator, --num_processes and --process_id "
                     "(or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), or none of "
                     "them to let JAX detect the cluster (TPU VM, SLURM, Open MPI)")
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id, initialization_timeout=timeout_s,
                             heartbeat_timeout_seconds=timeout_s)


def _parser() -> cli.ArgumentParser:
  parser = cli.ArgumentParser(prog="python -m cotir_jax.train", description=__doc__, config=True)
  parser.add_argument("--workdir", default=None,
                      help="output and resume directory (default: runs/<project_name>)")
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
  parser.add_argument("--take-over-lock", action="store_true",
                      help="take the workdir's lock even though another host holds it (that "
                           "run must be gone, e.g. its slice was deleted or preempted)")
  return parser


def main(argv=None) -> int:
  return cli.run(_main, argv)


def _main(argv) -> int:
  parser = _parser()
  cfg, args = cli.parse(parser, argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  import jax
  if args.distributed:
    init_distributed(args.coordinator, args.num_processes, args.process_id,
                     args.distributed_timeout)
  elif any(v is not None for v in (args.num_processes, args.process_id)):
    parser.error("--num_processes / --process_id need --distributed")
  from cotir_jax.train.loop import train
  workdir = args.workdir or f"runs/{cfg.project_name}"
  try:
    summary = train(cfg, workdir, take_over_lock=args.take_over_lock)
  except jax.errors.JaxRuntimeError as e:
    if not (args.distributed and jax.process_count() > 1):
      raise
    # A collective failed: another process died. Say so in one line and leave at once (JAX's
    # shutdown barrier would wait for the dead process, then abort with a stack trace).
    print(f"cotir_jax: error: process {jax.process_index()} lost contact with another process "
          f"of this run ({str(e).splitlines()[0][:300]}); nothing was saved after the last "
          f"finished checkpoint in {workdir}/checkpoints; restart every process to resume",
          file=sys.stderr, flush=True)
    os._exit(3)
  print(f"cotir_jax: {'stopped' if summary['stopped'] else 'finished'} at step {summary['steps']}; "
        f"outputs in {workdir}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
