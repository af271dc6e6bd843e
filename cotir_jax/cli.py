"""What every command line of cotir_jax shares: user errors as one line, `--help` without a
config, `--config FILE [--config.a.b=v ...]` beside the tool's own flags, and `--debug`.

    def main(argv=None) -> int:
      return cli.run(_main, argv)

    def _main(argv) -> int:
      parser = cli.ArgumentParser(prog="python -m cotir_jax.x", description=..., config=True)
      parser.add_argument(...)
      cfg, args = cli.parse(parser, argv)
      ...

A mistake the user can fix (a config value, an unknown field, a flag, a path, a missing file,
another model's checkpoint, a locked workdir) raises a `UserError` subclass where it is found;
`run` prints it as one `cotir_jax: error: ...` line on stderr and returns exit code 2, the
code argparse uses for usage errors. Anything else is a bug and keeps its traceback; so does a
user error under `--debug`. `run` returns the code instead of exiting, so tests call
`main(argv)` in-process.

This module imports nothing of cotir_jax at import time: every module may import it for
`UserError`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

EXIT_USER_ERROR = 2
PREFIX = "cotir_jax: error: "
DEBUG_FLAG = "--debug"


class UserError(Exception):
  """A mistake the user can fix; its message says what is wrong and what to do, in one line."""


class UsageError(UserError):
  """A flag that is unknown, missing or malformed (argparse's errors)."""


# Errors that are the user's to fix wherever they come from: a path that does not exist.
USER_ERRORS = (UserError, FileNotFoundError, NotADirectoryError)


class ArgumentParser(argparse.ArgumentParser):
  """argparse with one-line errors, a `--debug` flag and, with `config=True` (or "optional"),
  the `--config FILE` / `--config.a.b=v` flags documented in `--help` (`parse` reads them)."""

  def __init__(self, *args, config: bool | str = False, **kwargs):
    kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
    kwargs.setdefault("allow_abbrev", False)  # `--conf x` must not pass for `--config x`
    super().__init__(*args, **kwargs)
    self.config = config
    if config:
      self.add_argument("--config", metavar="FILE", required=False,
                        help=("the recipe (configs/tiny.py, configs/cotir_4b.py ...)"
                              + ("" if config is True else "; optional")
                              + "; --config.a.b=VALUE overrides any field of it"))
    self.add_argument(DEBUG_FLAG, action="store_true",
                      help="show the Python traceback of an error instead of one line")

  def error(self, message: str):
    raise UsageError(f"{message} (see {self.prog} --help)")


def parse(parser: ArgumentParser, argv: Sequence[str] | None = None):
  """(config or None, flags): `--config FILE` and its `--config.a.b=v` overrides are read by
  `config.load`, the other arguments by `parser` (first, so `--help` needs no config and a bad
  flag is reported before the config file runs)."""
  from cotir_jax import config
  argv = list(sys.argv[1:] if argv is None else argv)
  if not parser.config:
    return None, parser.parse_args(argv)
  path, overrides, rest = config.split_cli(argv)
  args = parser.parse_args(rest)
  if path is None:
    if parser.config is True:
      parser.error("missing --config path/to/config.py")
    if overrides:
      parser.error(f"--config.{overrides[0]} needs --config path/to/config.py")
    return None, args
  args.config = path
  return config.load(path, overrides), args


def report(error: BaseException | str) -> int:
  """Prints the `cotir_jax: error: ...` line; returns the exit code of a user error."""
  print(f"{PREFIX}{error}", file=sys.stderr, flush=True)
  return EXIT_USER_ERROR


def run(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
  """`main(argv)` with user errors reported as one line (exit code 2); returns the exit code."""
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    return int(main(argv) or 0)
  except SystemExit as e:  # --help (0), or `raise SystemExit("message")` somewhere below
    if e.code is None or isinstance(e.code, int):
      return e.code or 0
    if DEBUG_FLAG in argv:
      raise
    return report(e.code)
  except USER_ERRORS as e:
    if DEBUG_FLAG in argv:
      raise
    return report(e)
