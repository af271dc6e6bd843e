"""`python -m cotir_jax.train --config configs/<name>.py [--config.a.b=v ...] [--workdir DIR]`.

Multi-host: add `--distributed` on every process. On TPU VMs, SLURM and Open MPI, JAX finds the
coordinator, process count and process index itself; elsewhere pass them (or set the matching
environment variables): every process gets the same `--coordinator` and `--num_processes` and
its own `--process_id`.
"""

import logging
import os
import sys

from cotir_jax import cli, multihost


def _parser() -> cli.ArgumentParser:
  parser = cli.ArgumentParser(prog="python -m cotir_jax.train", description=__doc__, config=True)
  parser.add_argument("--workdir", default=None,
                      help="output and resume directory (default: runs/<project_name>)")
  multihost.add_arguments(parser)
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
  multihost.initialize(args, parser)
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
