"""XLA's own step-time estimate for a TPU, without a TPU: its cost model, not a measurement.

When libtpu compiles a program for a TPU topology (ahead of time, on any CPU), its compiler
prices every op; `compiled.cost_analysis()["optimal_seconds"]` is the program's total. What
keeps that number from being a train step's time as it stands:

- **Loops**: the scanned layer stacks are `while` loops, and what the cost model makes of a loop
  is not documented. Measured: a forward-only loop is priced as one iteration whatever its trip
  count, and for loops with a backward pass, unrolling a loop 2-fold can *lower* the price. So
  `estimate` prices the step with every loop unrolled (`model.scan_layers=False`: the layer
  stacks and the gradient-accumulation micro-batches), a program without loops that does the
  same maths (the same FLOPs).
- **Memory**: unrolled, the deep stacks with a backward pass (single blocks, adapter blocks) can
  need several times the memory of the scanned step (CoTIR-4B on v5e:4x4: 26.4 GiB of
  temporaries instead of 5.4), and a program that does not fit is not compiled. They are
  compiled 1 and 2 blocks deep instead, and each block past the first adds the difference (the
  forward-only stacks, text encoders and double blocks, stay at full depth): three compiles.
  `tests/test_flops.py` checks on a small config that this equals the full-depth unrolled compile.
- **Ops it cannot price**: it prices `ConcatBitcast` (a concatenation of weight slices that the
  TPU compiler inserts; memory movement only) at -1 s each. Those are added back, so their copy
  time is left out.

The scanned step that trains may run slower or faster than its unrolled twin; on the small
backbone of the test, the scanned program's price with its loop body weighted by its trip count
is within 10% of the unrolled one, on wider test configs up to 1.4× above it.

Each part's share of the step: every op of a compiled program carries XLA's cycle estimate
(`estimated_cycles` in its backend config) and the scopes it was traced under
(`flop_count.classify`); the shares of the cycle estimates (extrapolated in depth like the
time) are the parts' shares — of the ops XLA prices in cycles (fusions, copies, convolutions).
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Callable

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
# the deep stacks with a backward pass, compiled 1 and 2 blocks deep and extrapolated
DEPTHS = ("depth_single_blocks", "cot_adapter.depth")
_UNPRICED = 'custom_call_target="ConcatBitcast"'
_CYCLES = re.compile(r'\\?"estimated_cycles\\?"\s*:\s*\\?"(\d+)')
_NO_CYCLES = 2 ** 63 - 1  # what an op XLA cannot estimate in cycles carries (XLA attention's
#                           softmax over [B, H, L, L] scores at full size)


@dataclasses.dataclass(frozen=True)
class Estimate:
  """XLA's TPU cost-model time of one step (None if it gave none), and each part's share."""
  step_s: float | None
  shares: dict
  note: str = ""


def unrolled(cfg, **depths):
  """A copy of the config whose step has no loops (its layer stacks and micro-batches unrolled),
  with `depths` ({"cot_adapter.depth": 2, ...}) set under `model`."""
  c = cfg.copy_and_resolve_references()
  c.model.scan_layers = False
  for path, value in depths.items():
    *parents, leaf = path.split(".")
    node = c.model
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def xla_seconds(compiled) -> float:
  """`optimal_seconds` of a program compiled for a TPU, the unpriced ops' -1 s added back."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  if "optimal_seconds" not in cost:
    raise ValueError("this compile has no cost-model time (optimal_seconds): compile for a TPU "
                     "topology (libtpu)")
  return float(cost["optimal_seconds"]) + compiled.as_text().count(_UNPRICED)


def _priced(ins) -> bool:
  return _CYCLES.search(ins.attrs) is not None


def _cycles(ins, comp, op_name) -> dict:
  cycles = int(_CYCLES.search(ins.attrs).group(1))
  return {"no estimate" if cycles == _NO_CYCLES else classify(op_name)[0]: 1 if cycles ==
          _NO_CYCLES else cycles}


def cycles(compiled) -> collections.Counter:
  """XLA's per-op cycle estimates of a compiled program summed by component (loops by their
  trip counts); "no estimate": the number of ops without one."""
  counts, _ = hlo.walk(hlo.parse(compiled), _cycles, _priced, into_fusions=False)
  return counts


def _depth(cfg, path: str) -> int:
  node = cfg.model
  for p in path.split("."):
    node = node[p]
  return int(node)


def estimate(compile_step: Callable, cfg) -> Estimate:
  """XLA's cost-model time of the train step of `cfg`, its loops unrolled (see the module
  docstring); `compile_step(config)` traces and compiles a config's step for a TPU topology."""
  full = {path: _depth(cfg, path) for path in DEPTHS}
  shallow = {path: min(1, n) for path, n in full.items()}
  base = compile_step(unrolled(cfg, **shallow))
  base_s, base_cycles = xla_seconds(base), cycles(base)
  seconds, by_part = base_s, collections.Counter(base_cycles)
  for path, n in full.items():
    if n > 1:  # each block past the first adds what the second adds
      deeper = compile_step(unrolled(cfg, **{**shallow, path: 2}))
      seconds += (n - 1) * (xla_seconds(deeper) - base_s)
      deeper_cycles = cycles(deeper)
      for component in set(deeper_cycles) | set(base_cycles):
        by_part[component] += (n - 1) * (deeper_cycles[component] - base_cycles[component])
  unestimated = by_part.pop("no estimate", 0)
  total = sum(by_part.values())
  shares = {part: sum(by_part[c] for c in scopes) / total for part, scopes in PARTS.items()}
  notes = [f"{unestimated:.0f} op(s) without a cycle estimate left out of the shares"
           ] if unestimated else []
  if seconds <= 0:
    notes.append(f"XLA's cost model gave no time ({seconds:.3g} s after adding back the "
                 "unpriced ops)")
    seconds = None
  return Estimate(seconds, shares, "; ".join(notes))
