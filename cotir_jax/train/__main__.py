"""`python -m cotir_jax.train --config configs/<name>.py [--config.a.b=v ...] [--workdir DIR]`."""

import argparse
import logging
import sys

from cotir_jax import config


def main(argv=None) -> int:
  cfg, rest = config.parse_cli(argv)
  parser = argparse.ArgumentParser(prog="python -m cotir_jax.train")
  parser.add_argument("--workdir", default=None,
                      help="output and resume directory (default: runs/<project_name>)")
  parser.add_argument("--distributed", action="store_true",
                      help="call jax.distributed.initialize() first (multi-host TPU / GPU)")
  args = parser.parse_args(rest)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  import jax
  if args.distributed:
    jax.distributed.initialize()
  from cotir_jax.train.loop import train
  workdir = args.workdir or f"runs/{cfg.project_name}"
  summary = train(cfg, workdir)
  print(f"cotir_jax: {'stopped' if summary['stopped'] else 'finished'} at step {summary['steps']}; "
        f"outputs in {workdir}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
