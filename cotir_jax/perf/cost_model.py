"""XLA's own step-time estimate for a TPU, without a TPU: its cost model, not a measurement.

When libtpu compiles a program for a TPU topology (ahead of time, on any CPU), its compiler
prices every op; `compiled.cost_analysis()["optimal_seconds"]` is the program's total. Two
things keep that number from being a train step's time as it stands:

- **Loops**: the analysis visits each computation once, so a scanned stack of 20 blocks costs
  one block. `unrolled(cfg)` is the same step with every loop unrolled (`model.scan_layers=False`:
  the backbone, adapter and text-encoder stacks, and the gradient-accumulation micro-batches),
  whose program holds every layer; its estimate is the scanned step's estimate with each loop
  body weighted by its trip count (`tests/test_flops.py` checks the two agree on a small
  config). Unrolling changes the program XLA schedules, not the maths.
- **Ops it cannot price**: it prices `ConcatBitcast` (a concatenation of weight slices that the
  TPU compiler inserts; memory movement only) at −1 s each. Those are added back, so their copy
  time is left out.

`estimate(compiled)` also splits the time by part: every op of the compiled program carries
XLA's cycle estimate (`estimated_cycles` in its backend config) and the scopes it was traced
under (`flop_count.classify`), so each part's share of the summed cycle estimates is its share
of the step — of the ops XLA prices in cycles (fusions, copies, convolutions), not a measurement
either.
"""

from __future__ import annotations

import dataclasses
import re

from cotir_jax.perf import hlo
from cotir_jax.perf.flop_count import classify

LABEL = "XLA's cost model, not a measurement"
# parts of the step → the named scopes (flop_count.COMPONENTS) whose ops they hold
PARTS = {
    "backbone": ("double_blocks", "single_blocks", "final_layer"),
    "adapter": ("cot_adapter",),
    "text encoders": ("text_encoder", "clip"),
    "vae": ("vae",),
    "optimizer": ("optimizer",),
    "loss": ("loss",),
    "other": ("other",),  # embedders and modulations, flow-matching inputs, the finite check
}
_UNPRICED = 'custom_call_target="ConcatBitcast"'
_CYCLES = re.compile(r'\\?"estimated_cycles\\?"\s*:\s*\\?"(\d+)')


@dataclasses.dataclass(frozen=True)
class Estimate:
  """XLA's TPU cost-model time of one step (None if it gave none) and each part's share."""
  step_s: float | None
  shares: dict
  note: str = ""


def unrolled(cfg):
  """A copy of the config whose step has no loops (its layer stacks and micro-batches unrolled)."""
  from cotir_jax import config
  c = cfg.copy_and_resolve_references()
  config.apply_override(c, "model.scan_layers=False")
  return config.validate(c)


def xla_seconds(compiled) -> float:
  """`optimal_seconds` of a program compiled for a TPU, the unpriced ops' −1 s added back."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  if "optimal_seconds" not in cost:
    raise ValueError("this compile has no cost-model time (optimal_seconds): compile for a TPU "
                     "topology (libtpu)")
  return float(cost["optimal_seconds"]) + compiled.as_text().count(_UNPRICED)


def _priced(ins) -> bool:
  return _CYCLES.search(ins.attrs) is not None


def _cycles(ins, comp, op_name) -> dict:
  return {classify(op_name)[0]: int(_CYCLES.search(ins.attrs).group(1))}


def estimate(compiled) -> Estimate:
  """XLA's estimate for a step compiled from `unrolled(cfg)` for a TPU topology."""
  seconds = xla_seconds(compiled)
  module = hlo.parse(compiled)
  notes = []
  loops = sum(i.opcode == "while" for c in module.comps.values() for i in c.instrs.values())
  if loops:
    notes.append(f"{loops} loop(s) left in the program, each body priced once")
  if seconds <= 0:
    notes.append(f"XLA's cost model gave no time ({seconds:.3g} s after adding back the "
                 "unpriced ops)")
    seconds = None
  cycles, _ = hlo.walk(module, _cycles, _priced, into_fusions=False)
  total = sum(cycles.values())
  shares = {part: sum(cycles.get(c, 0) for c in scopes) / total
            for part, scopes in PARTS.items()} if total else {}
  return Estimate(seconds, shares, "; ".join(notes))
