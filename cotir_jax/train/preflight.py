"""Start-up checks that every process of a run agrees on before the first collective.

Whatever can differ between the hosts of a slice -- the workdir (mounted? writable? room for
two checkpoints?), the checkpoint on it and the config against it, the data layout, the
tokenizer, base-model and init_from paths, whether the global batches split over this run's processes --
is checked on every process before any of them enters a collective (an Orbax barrier, a jitted
initialiser spanning hosts) or takes the workdir's lock. A process collects its failures instead
of raising at the first (the quick checks first; the slow ones and the workdir's creation only
when those passed); then all processes agree (`multihost.agree`) and, if any failed, every one
of them stops with the same message naming the failing processes, instead of the healthy ones
waiting in a collective for a process that has exited until the heartbeat timeout.

    start = preflight.run(cfg, workdir)   # raises StartupError on every process, or returns
    start.prog, start.tokenizers, start.source, start.bank, start.meta, start.data_state
"""

from __future__ import annotations

import dataclasses
import os

import jax

from cotir_jax import multihost
from cotir_jax.data import pipeline
from cotir_jax.data.decode import SkipFractionError
from cotir_jax.data.prompts import PromptError
from cotir_jax.data.sources import DataLayoutError
from cotir_jax.train import checkpoint
from cotir_jax.train import workdir as wd
from cotir_jax.modules import build_tokenizers
from cotir_jax.compiler import configure_compiler
from cotir_jax.train.program import Program

# What a user's setup raises (a missing path, a bad value, an unwritable disk); anything else is
# a bug, which the failing process also shows as a traceback.
_SETUP_ERRORS = (wd.WorkdirError, ValueError, OSError, DataLayoutError, SkipFractionError,
                 PromptError)


class StartupError(wd.WorkdirError):
  """A start-up check failed on some process; the message, the same on every process, names them."""


@dataclasses.dataclass
class Startup:
  """What the checks built or read, for the run to go on with."""
  prog: Program
  tokenizers: dict
  source: object              # the data source and prompt bank (`pipeline.make_source` / `_bank`)
  bank: object
  meta: dict | None           # the newest checkpoint's meta (`checkpoint.latest_meta`); None: none
  data_state: dict | None     # its data state (`pipeline.load_state`)
  config_changes: list        # allowed config changes since the checkpoint
  disk_free: int              # bytes free in the workdir


def run(cfg, workdir: str) -> Startup:
  """Every start-up check on this process, agreed with the others (see the module docstring)."""
  failures, bugs = [], []

  def attempt(check, *args):
    try:
      return check(*args)
    except _SETUP_ERRORS as e:
      failures.append(str(e))
    except Exception as e:  # noqa: BLE001 -- the others are told; this process re-raises below
      failures.append(f"{type(e).__name__}: {e} (a bug: see this process's traceback)")
      bugs.append(e)
    return None

  meta = attempt(checkpoint.latest_meta, workdir)  # reading only, the quick checks first
  _same_checkpoint(workdir, meta, failures)
  changes = attempt(checkpoint.check_config, meta, cfg)
  attempt(_check_resume, cfg, meta)
  saved = meta and meta.get("data_state")
  data_state = attempt(pipeline.load_state, saved) if saved else None
  source = bank = None
  if attempt(pipeline.source_dir, cfg) is not None:
    source = attempt(pipeline.make_source, cfg)  # scanned once: every stage reads it
  if source is not None:
    bank = attempt(pipeline.make_prompt_bank, cfg, source)
  attempt(_check_batch_split, cfg, meta, data_state)
  attempt(_check_init_from, cfg, meta)
  prog = tokenizers = free = None
  if not failures:  # what takes seconds, and what creates the workdir: for a run that can start
    configure_compiler(cfg, workdir)
    tokenizers = attempt(build_tokenizers, cfg)
    prog = attempt(Program.build, cfg)
    if prog is not None:
      free = attempt(wd.check, workdir, checkpoint.estimate_nbytes(prog.state))
  verdict = multihost.agree("; ".join(dict.fromkeys(failures)) or None)  # each failure once
  if bugs:
    raise bugs[0]
  if verdict:
    raise StartupError(verdict)
  return Startup(prog=prog, tokenizers=tokenizers, source=source, bank=bank, meta=meta,
                 data_state=data_state, config_changes=changes, disk_free=free)


def _same_checkpoint(workdir, meta, failures) -> None:
  """Every process must resume the same step: a workdir that is not one shared directory shows
  each host another checkpoint (or none)."""
  steps = multihost.all_gather(None if meta is None else meta["step"])
  if len(set(steps)) > 1:
    seen = ", ".join(f"process {p}: {'none' if s is None else f'step {s}'}"
                     for p, s in enumerate(steps))
    failures.append(f"the processes see different checkpoints in {workdir} ({seen}); the "
                    "workdir must be one directory that every host shares")


def _check_resume(cfg, meta) -> None:
  if cfg.resume == "never" and meta is not None:
    raise wd.WorkdirError(f"resume='never', but {meta['directory']} holds the checkpoint of step "
                          f"{meta['step']}; train in a new --workdir, or resume='latest' to "
                          "continue from it")


def _check_init_from(cfg, meta) -> None:
  """A new run's `training.init_from` paths (one, or two joined by a comma) must exist here."""
  if meta is None and cfg.training.init_from:
    for path in (p.strip() for p in cfg.training.init_from.split(",")):
      if not os.path.exists(path):
        raise FileNotFoundError(f"training.init_from: {path!r} does not exist")


def _check_batch_split(cfg, meta, data_state) -> None:
  """Each process reads whole rows of every global batch still to come: the process count must
  divide them (a resume may run on another number of hosts than the run it continues)."""
  count = jax.process_count()
  step = int(meta["step"]) if meta else 0
  remaining = tuple(cfg.training.batch_sizes[pipeline.stage_of_step(cfg, step):])
  bad = [b for b in remaining if int(b) % count]
  if not bad:
    return
  saved = (f"; the checkpoint at step {step} was written by {data_state['process_count']} "
           "process(es)" if data_state else "")
  raise ValueError(
      f"the global batch {bad[0]} (training.batch_sizes) cannot be split over {count} processes "
      f"(each reads an equal share of every global batch){saved}; run on a number of processes "
      f"that divides every remaining global batch {remaining}, or change training.batch_sizes")
