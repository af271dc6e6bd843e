"""FLOPs of a compiled XLA program, read from its HLO text with every loop iteration counted.

Why not `compiled.cost_analysis()["flops"]`: XLA's cost analysis visits each computation once, so
the body of a `while` loop — every `lax.scan` over stacked blocks (backbone, adapter, text
encoder layers) — counts as ONE iteration. On the scanned CoTIR step it reports a fraction of
the work: 4B at 512², batch 1, compiled for one TPU v5p chip, 6.8 TFLOP where the walk below
finds 64.9 (`closed_form.analytic_flops`: 64.8); a utilisation built on it is wrong by ~10×.

`hlo_flops(compiled)` walks the optimized HLO module instead (`compiled.as_text()`):

- counted ops: `dot` as 2·prod(output dims)·prod(lhs contracting dims); `convolution` as
  2·prod(output batch, feature dims)·(valid kernel taps over the spatial dims)·(kernel input
  features per group) — "valid taps" leaves out the multiplications with padding or with the
  zeros of lhs dilation, exactly as XLA's cost analysis does (TPU lowers dots to
  `convolution`s without spatial dims); cuBLAS GEMM custom calls (GPU) like `dot`.
- attention kernels, counted from their operand shapes as dense attention: one "unit" is one
  [Lq, D] × [D, Lk] matmul per (batch, head), 2·B·H·Lq·Lk·D FLOPs. The forward kernel runs 2
  (QKᵀ, PV). TPU splash (`tpu_custom_call` named `splash_*_fwd|dq|dkv`): dq runs 3 (QKᵀ again,
  dP, dQ), dkv 4 (QKᵀ and dP again, dV, dK). cuDNN (`__cudnn$fmha*`): the backward runs 5 (QKᵀ
  again, dP, dQ, dK, dV). The backward's dP, dQ, dK, dV are kind "backward", the tiles it
  recomputes kind "remat" — the work the program executes beyond the model's maths.
- call graph: from ENTRY through fusions (`calls=`), `call` (`to_apply=`), `async-start`,
  `while` (body × trip count, condition × (trip count + 1)) and `conditional` (the most
  expensive branch: an upper bound). The trip count is read from `known_trip_count` in the
  while's backend_config (CPU, GPU) or, when absent (TPU), derived from the loop: the condition
  compares a tuple element to a constant, the init tuple sets it to a constant and the body adds
  a constant to it. Loops that fit neither are counted once and listed in `FlopCount.unresolved`,
  as are custom calls that may hide matmuls (other Pallas / Triton kernels).
- breakdown: each op's `metadata={op_name="..."}` names the `jax.named_scope`s it was traced
  under (`flop_count.classify`); ops without metadata take their caller's (the fusion, loop or
  call they sit in), else their nearest producer's.
- devices: on an SPMD-partitioned program the module is the per-device program, so the counts
  are what ONE device executes (`FlopCount.total`), including any replicated computation —
  that is real work on each chip. `global_total` = per device × devices (`num_partitions` ×
  `replica_count` of the module).

`walk(module, measure, wants)` is the same traversal for any per-op quantity (`perf.cost_model`
sums XLA's per-op cycle estimates with it).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from collections.abc import Callable

from cotir_jax.perf.flop_count import FlopCount, classify, valid_taps

@dataclasses.dataclass
class _Instr:
  name: str
  shape: str
  opcode: str
  operands: list  # operand names (without '%')
  literal: str    # text between the parentheses for `constant` / `parameter`
  attrs: str

  def attr(self, pattern: str):
    m = re.search(pattern, self.attrs)
    return m.group(1) if m else None

  @property
  def op_name(self) -> str | None:
    return self.attr(r'op_name="((?:[^"\\]|\\.)*)"')

  def called(self, key: str) -> list[str]:
    """Computations named by `key=%a` or `key={%a, %b}`."""
    m = re.search(rf"\b{key}=(\{{[^}}]*\}}|%?[\w.\-]+)", self.attrs)
    if not m:
      return []
    return [s.strip().lstrip("%") for s in m.group(1).strip("{}").split(",") if s.strip()]


@dataclasses.dataclass
class _Computation:
  name: str
  instrs: dict  # name → _Instr, in program order
  root: str


def _match(text: str, i: int, open_: str, close: str) -> int:
  """Index just past the bracket that closes the one at text[i]."""
  depth = 0
  for j in range(i, len(text)):
    c = text[j]
    if c == open_:
      depth += 1
    elif c == close:
      depth -= 1
      if depth == 0:
        return j + 1
  raise ValueError(f"unbalanced {open_}{close} in HLO line: {text[:200]}")


def _split_top(text: str) -> list[str]:
  """Splits on commas that are not inside brackets."""
  parts, depth, start = [], 0, 0
  for j, c in enumerate(text):
    if c in "([{":
      depth += 1
    elif c in ")]}":
      depth -= 1
    elif c == "," and depth == 0:
      parts.append(text[start:j])
      start = j + 1
  parts.append(text[start:])
  return [p.strip() for p in parts if p.strip()]


_LHS = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_OPCODE = re.compile(r"\s*([\w\-]+)\(")
_COMMENT = re.compile(r"/\*.*?\*/")  # operand annotations: /*index=5*/


def _parse_instr(line: str) -> tuple[_Instr, bool] | None:
  m = _LHS.match(line)
  if not m:
    return None
  i = m.end()
  if line[i] == "(":  # tuple shape
    j = _match(line, i, "(", ")")
  else:
    j = i
    while j < len(line) and not line[j].isspace() and line[j] != "{":
      j += 1
    if j < len(line) and line[j] == "{":  # layout
      j = _match(line, j, "{", "}")
  shape = line[i:j]
  m2 = _OPCODE.match(line, j)
  if not m2:
    return None
  opcode = m2.group(1)
  k = _match(line, m2.end() - 1, "(", ")")
  inner = line[m2.end():k - 1]
  literal, operands = "", []
  if opcode in ("constant", "parameter"):
    literal = inner
  else:
    operands = [_COMMENT.sub("", p).split()[-1].lstrip("%") for p in _split_top(inner)]
  return _Instr(m.group(2), shape, opcode, operands, literal, line[k:]), bool(m.group(1))


_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\)\s*->\s*.*)?\{\s*$")


@dataclasses.dataclass
class Module:
  """A parsed HLO module: its computations, the entry's name and the devices it runs on."""
  comps: dict  # name → _Computation
  entry: str
  devices: int


def _instruction_lines(lines):
  """Joins an instruction that spans lines (a kernel's `frontend_attributes` can hold
  newlines) into one line: it continues while its braces are unbalanced, up to the next
  instruction or the end of the computation."""
  pending = None
  for line in lines:
    if pending is not None and (_LHS.match(line) or line.strip() == "}"):
      yield pending
      pending = None
    if pending is not None:
      pending += line
    elif _LHS.match(line) and line.count("{") > line.count("}"):
      pending = line
    else:
      yield line
      continue
    if pending.count("{") <= pending.count("}"):
      yield pending
      pending = None
  if pending is not None:
    yield pending


def parse(text_or_compiled) -> Module:
  """Parses a `jax.stages.Compiled` (its optimized module) or HLO module text."""
  text = text_or_compiled
  if not isinstance(text, str):
    text = text_or_compiled.as_text()
  comps, entry, current, root = {}, None, None, None
  devices = 1
  for line in _instruction_lines(text.splitlines()):
    if line.startswith("HloModule"):
      for key in ("num_partitions", "replica_count"):
        m = re.search(rf"\b{key}=(\d+)", line)
        devices *= int(m.group(1)) if m else 1
      continue
    if current is None:
      m = _HEADER.match(line)
      if m and not line[0].isspace() and not line[0].isdigit():
        current, root = {}, None
        name = m.group(1)
        if line.startswith("ENTRY"):
          entry = name
      continue
    if line.strip() == "}":
      comps[name] = _Computation(name, current, root or (list(current)[-1] if current else ""))
      current = None
      continue
    parsed = _parse_instr(line)
    if parsed:
      ins, is_root = parsed
      current[ins.name] = ins
      if is_root:
        root = ins.name
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text: pass a compiled executable or the "
                     "text of `compiled.as_text()`")
  return Module(comps, entry, devices)


def _full_op_name(own: str | None, context: str) -> str:
  """An op's name path. Optimized modules name every op from the jitted function down
  ('jit(f)/...'); before optimization, ops of called computations (loop bodies, calls) are
  named relative to their call site, whose path is the context."""
  if not own:
    return context
  if own.startswith("jit(") or not context:
    return own
  return f"{context}/{own}"


def _producer_op_name(comp: _Computation, ins: _Instr, limit: int = 16) -> str:
  """The op_name of the nearest producer that has one: XLA drops the metadata of some ops it
  creates (e.g. the dots it makes of a convolution), whose inputs still carry it."""
  queue, seen = list(ins.operands), set()
  while queue and len(seen) < limit:
    name = queue.pop(0)
    if name in seen or name not in comp.instrs:
      continue
    seen.add(name)
    producer = comp.instrs[name]
    if producer.op_name:
      return producer.op_name
    queue.extend(producer.operands)
  return ""


def _dims(shape: str) -> list[int]:
  """Dimensions of an array shape 'bf16[8,<=64]{1,0}' (the first array of a tuple shape)."""
  m = re.search(r"\[([^\]]*)\]", shape)
  if not m:
    return []
  return [int(d.replace("<=", "")) for d in m.group(1).split(",") if d.strip()]


def _ints(text: str | None) -> list[int]:
  return [int(x) for x in re.findall(r"-?\d+", text or "")]


# --------------------------------------------------------------------------- FLOPs per op

def _dot_flops(ins: _Instr, comp: _Computation) -> float:
  lhs = _dims(comp.instrs[ins.operands[0]].shape)
  contracting = _ints(ins.attr(r"lhs_contracting_dims=\{([\d,\s]*)\}"))
  return 2.0 * math.prod(_dims(ins.shape)) * math.prod(lhs[d] for d in contracting)


def _gemm_flops(ins: _Instr, comp: _Computation) -> float:
  """cuBLAS GEMM custom call: the output is (result, workspace); dims in the backend config."""
  lhs = _dims(comp.instrs[ins.operands[0]].shape)
  contracting = _ints(ins.attr(r'\\?"lhs_contracting_dimensions\\?"\s*:\s*\[([^\]]*)\]'))
  return 2.0 * math.prod(_dims(ins.shape)) * math.prod(lhs[d] for d in contracting)


def _window(ins: _Instr, n: int) -> dict[str, list[list[int]]]:
  """`window={size=3x3 stride=2x2 pad=0_1x0_1 ...}` → {"size": [[3], [3]], "pad": [[0, 1], ...]}."""
  fields = {"size": [[1]] * n, "stride": [[1]] * n, "pad": [[0, 0]] * n,
            "lhs_dilate": [[1]] * n, "rhs_dilate": [[1]] * n}
  for item in (ins.attr(r"window=\{([^}]*)\}") or "").split():
    key, _, value = item.partition("=")
    fields[key] = [_ints(v.replace("_", " ")) for v in value.split("x")]
  return fields


def _conv_flops(ins: _Instr, comp: _Computation) -> float:
  labels = ins.attr(r"dim_labels=([0-9a-z]+_[0-9a-z]+->[0-9a-z]+)")
  lhs_labels, rhs_labels, out_labels = re.split(r"_|->", labels)
  lhs = _dims(comp.instrs[ins.operands[0]].shape)
  rhs = _dims(comp.instrs[ins.operands[1]].shape)
  out = _dims(ins.shape)
  spatial = sorted(c for c in out_labels if c.isdigit())
  w = _window(ins, len(spatial))
  taps = 1
  for s, d in enumerate(spatial):
    taps *= valid_taps(lhs[lhs_labels.index(d)], out[out_labels.index(d)], w["size"][s][0],
                       w["stride"][s][0], w["pad"][s][0], w["lhs_dilate"][s][0],
                       w["rhs_dilate"][s][0])
  non_spatial = math.prod(out[i] for i, c in enumerate(out_labels) if not c.isdigit())
  return 2.0 * non_spatial * taps * rhs[rhs_labels.index("i")]


_GEMM_TARGETS = ("__cublas$gemm", "__cublas$lt$matmul")
# custom calls that move or annotate data; anything else is reported as possibly uncounted
_HARMLESS_TARGETS = ("AllocateBuffer", "Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape",
                     "MoveToHost", "MoveToDevice", "LayoutConstraint", "PadToStatic",
                     "SliceToDynamic", "annotate_device_placement", "X64Combine",
                     "X64SplitLow", "X64SplitHigh", "cu_threefry2x32", "Pin", "Unpin",
                     "AssumeGatherIndicesInBound", "AsyncCollectiveStart",
                     "AsyncCollectiveDone", "ConcatBitcast")
# attention kernels: matmul units (see the module docstring) as (backward, remat) of a backward
# kernel; a forward kernel's 2 units take the kind of where it runs (forward or remat)
_SPLASH = re.compile(r"splash_m[hq]a_(fwd|dq|dkv)")
_SPLASH_BACKWARD = {"dq": (2, 1), "dkv": (2, 2)}
_CUDNN_BACKWARD = (4, 1)
_FLOAT = re.compile(r"^\(?(bf16|f16|f32|f64|f8\w*)\[")
_CUDNN_QK_DIMS = re.compile(r'(?:bmm1|bmm2_grad_gemm2)_dot_dimension_numbers\\?"\s*:\s*\{([^}]*)\}')


def _attention_unit(ins: _Instr, comp: _Computation) -> float:
  """2·B·H·Lq·Lk·D: one [Lq, D] × [D, Lk] matmul per (batch, head) of the kernel's q and k,
  its first two floating-point operands of rank ≥ 3 and ≥ 2 ([..., L, D] for splash; for cuDNN
  [B, L, H, D] or [B, H, L, D], the key length being the dim of k that the kernel's QKᵀ (or
  dO·Vᵀ) dot dimension numbers neither batch nor contract)."""
  arrays = [_dims(comp.instrs[o].shape) for o in ins.operands
            if o in comp.instrs and _FLOAT.match(comp.instrs[o].shape)]
  q = next(d for d in arrays if len(d) >= 3)
  k = arrays[arrays.index(q) + 1]
  dims = _CUDNN_QK_DIMS.search(ins.attrs)
  if dims:
    ints = lambda key: _ints(re.search(rf'{key}\\?"\s*:\s*\[([^\]]*)\]', dims.group(1)).group(1))
    skip = ints("rhs_batch_dimensions") + ints("rhs_contracting_dimensions")
    lk = math.prod(n for i, n in enumerate(k) if i not in skip)
  else:
    lk = k[-2]
  return 2.0 * math.prod(q) * lk


def _attention_flops(ins: _Instr, comp: _Computation, target: str, op_name: str):
  """{(component, kind): FLOPs} of an attention kernel, or None if `ins` is not one."""
  splash = _SPLASH.search(f"{ins.name} {op_name}") if target == "tpu_custom_call" else None
  if splash:
    phase = splash.group(1)
    split = None if phase == "fwd" else _SPLASH_BACKWARD[phase]
  elif target.startswith("__cudnn$fmha"):
    split = _CUDNN_BACKWARD if "Backward" in target else None
  else:
    return None
  unit = _attention_unit(ins, comp)
  component, kind = classify(op_name)
  if split is None:
    return {(component, kind): 2 * unit}
  backward, remat = split
  return {(component, "backward"): backward * unit, (component, "remat"): remat * unit}


def _op_flops(ins: _Instr, comp: _Computation, op_name: str) -> dict:
  """{(component, kind): FLOPs} of one instruction (calls and loops are the walk's)."""
  if ins.opcode == "dot":
    return {classify(op_name): _dot_flops(ins, comp)}
  if ins.opcode == "convolution":
    return {classify(op_name): _conv_flops(ins, comp)}
  if ins.opcode == "custom-call":
    target = ins.attr(r'custom_call_target="([^"]*)"') or "?"
    if target.startswith(_GEMM_TARGETS):
      return {classify(op_name): _gemm_flops(ins, comp)}
    kernel = _attention_flops(ins, comp, target, op_name)
    if kernel is not None:
      return kernel
    if target not in _HARMLESS_TARGETS and not target.startswith("xla.sdy."):
      raise _Unresolved(f"custom call {target}")
  return {}


class _Unresolved(Exception):
  """An op whose FLOPs cannot be counted; the walk lists it instead."""


_CALLS = ("fusion", "call", "async-start")
_TRIP = re.compile(r'\\?"known_trip_count\\?"\s*:\s*\{\s*\\?"n\\?"\s*:\s*\\?"(\d+)')
_PASS = ("copy", "bitcast", "convert", "reshape", "copy-done", "optimization-barrier")
_FLIP = {"LT": "GT", "GT": "LT", "LE": "GE", "GE": "LE", "EQ": "EQ", "NE": "NE"}

# measure(instruction, its computation, its op_name) → {key: value}; raises _Unresolved
Measure = Callable[["_Instr", "_Computation", str], dict]
_FLOP_OPS = ("dot", "convolution", "custom-call")


class _Walker:
  """Sums a per-op measure over the call graph of a parsed module, loops by their trip counts,
  memoised per computation."""

  def __init__(self, module: Module, measure: Measure, wants: Callable, into_fusions: bool):
    self.comps = module.comps
    self.measure, self.wants = measure, wants
    self.into_fusions = into_fusions
    self.memo = {}
    self.unresolved = collections.Counter()

  def count(self, comp_name: str, context: str) -> collections.Counter:
    key = (comp_name, context)
    if key in self.memo:
      return self.memo[key]
    comp = self.comps[comp_name]
    total = collections.Counter()
    for ins in comp.instrs.values():
      op = ins.opcode
      measured = self.wants(ins)
      if not measured and op not in ("while", "conditional", *_CALLS):
        continue
      op_name = _full_op_name(ins.op_name, context) or _producer_op_name(comp, ins)
      if measured:
        try:
          total.update(self.measure(ins, comp, op_name))
        except _Unresolved as e:
          self.unresolved[str(e)] += 1
      if op == "while":
        trip = self.trip_count(ins, comp)
        if trip is None:
          self.unresolved[f"while {ins.name} (trip count unknown, counted once)"] += 1
          trip = 1
        body = self.count(ins.called("body")[0], op_name)
        cond = self.count(ins.called("condition")[0], op_name)
        for k, v in body.items():
          total[k] += trip * v
        for k, v in cond.items():
          total[k] += (trip + 1) * v
      elif op == "conditional":
        branches = ins.called("branch_computations") or (ins.called("true_computation")
                                                         + ins.called("false_computation"))
        counts = [self.count(b, op_name) for b in branches]
        if counts:
          total.update(max(counts, key=lambda c: sum(c.values())))
      elif op in _CALLS and (op != "fusion" or self.into_fusions):
        for callee in ins.called("calls") or ins.called("to_apply"):
          total.update(self.count(callee, op_name))
    self.memo[key] = total
    return total

  # ------------------------------------------------------------------ trip counts

  def trip_count(self, ins: _Instr, comp: _Computation) -> int | None:
    known = _TRIP.search(ins.attrs)
    if known:
      return int(known.group(1))
    cond = self.comps[ins.called("condition")[0]]
    body = self.comps[ins.called("body")[0]]
    found = self._compare(cond, cond.root, None)
    if found is None:
      return None
    direction, a, b = found
    if a is None or b is None:
      return None
    if a[0] is None:
      a, b, direction = b, a, _FLIP[direction]
    index, offset = a
    if index is None or b[0] is not None:
      return None
    limit = b[1] - offset
    init_tuple = comp.instrs.get(ins.operands[0])
    if init_tuple is None or init_tuple.opcode != "tuple":
      return None
    start = self._linear(comp, init_tuple.operands[index], None)
    root = body.instrs[body.root]
    if start is None or start[0] is not None or root.opcode != "tuple":
      return None
    step = self._linear(body, root.operands[index], None)
    if step is None or step[0] != index or step[1] == 0:
      return None
    return _iterations(start[1], step[1], direction, limit)

  def _compare(self, comp, name, binds):
    ins = comp.instrs[name]
    if ins.opcode == "compare":
      direction = ins.attr(r"direction=(\w+)")
      return (direction, self._linear(comp, ins.operands[0], binds),
              self._linear(comp, ins.operands[1], binds))
    if ins.opcode in ("fusion", "call"):
      callee = self.comps[(ins.called("calls") or ins.called("to_apply"))[0]]
      return self._compare(callee, callee.root,
                           [self._linear(comp, o, binds) for o in ins.operands])
    if ins.opcode in _PASS:
      return self._compare(comp, ins.operands[0], binds)
    return None

  def _linear(self, comp, name, binds):
    """The value as (loop tuple index or None, constant offset): gte[index] + offset."""
    ins = comp.instrs.get(name)
    if ins is None:
      return None
    op = ins.opcode
    if op == "constant":
      v = _ints(ins.literal)
      return (None, v[0]) if len(v) == 1 and _dims(ins.shape) == [] else None
    if op in _PASS:
      return self._linear(comp, ins.operands[0], binds)
    if op == "parameter":
      return binds[_ints(ins.literal)[0]] if binds is not None else None
    if op == "get-tuple-element":
      src = comp.instrs.get(ins.operands[0])
      if binds is None and src is not None and src.opcode == "parameter":
        return (int(ins.attr(r"index=(\d+)")), 0)
      return None
    if op in ("fusion", "call"):
      callee = self.comps[(ins.called("calls") or ins.called("to_apply"))[0]]
      return self._linear(callee, callee.root,
                          [self._linear(comp, o, binds) for o in ins.operands])
    if op in ("add", "subtract"):
      a, b = (self._linear(comp, o, binds) for o in ins.operands)
      if a is None or b is None:
        return None
      if op == "subtract":
        return (a[0], a[1] - b[1]) if b[0] is None else None
      if a[0] is not None and b[0] is not None:
        return None
      return (a[0] if a[0] is not None else b[0], a[1] + b[1])
    return None


def _iterations(start: int, step: int, direction: str, limit: int) -> int | None:
  """Iterations of `for (i = start; i DIRECTION limit; i += step)`; None if it never ends."""
  ceil_div = lambda a, b: -(-a // b)
  if direction in ("LT", "LE") and step > 0:
    gap = limit - start + (direction == "LE")
    return max(0, ceil_div(gap, step))
  if direction in ("GT", "GE") and step < 0:
    gap = start - limit + (direction == "GE")
    return max(0, ceil_div(gap, -step))
  if direction == "NE" and (limit - start) % step == 0 and (limit - start) // step >= 0:
    return (limit - start) // step
  return None


def walk(module: Module, measure: Measure, wants: Callable[[_Instr], bool], *,
         into_fusions: bool = True) -> tuple[collections.Counter, tuple]:
  """(sum of `measure` over the executed ops for which `wants(op)`, what could not be
  measured): ops inside loops count once per iteration; `into_fusions=False` measures fusions
  as single ops (their insides are not visited)."""
  walker = _Walker(module, measure, wants, into_fusions)
  counts = walker.count(module.entry, "")
  unresolved = tuple(f"{what} ×{n}" for what, n in sorted(walker.unresolved.items()))
  return counts, unresolved


def hlo_flops(compiled_or_hlo_text) -> FlopCount:
  """Matmul + convolution FLOPs of one run of a compiled program, loops included.

  Takes a `jax.stages.Compiled` (`jitted.lower(...).compile()`) or HLO module text: optimized
  (`compiled.as_text()`: what each device runs), or before optimization and partitioning
  (`lowered.as_text(dialect="hlo", debug_info=True)`, no compile needed: the logical program
  of all devices, before XLA's DCE / CSE; without debug_info the breakdown is all "other").
  See the module docstring for the rules.
  """
  module = parse(compiled_or_hlo_text)
  counts, unresolved = walk(module, _op_flops, lambda ins: ins.opcode in _FLOP_OPS)
  return FlopCount(flops={k: v for k, v in counts.items() if v}, devices=module.devices,
                   unresolved=unresolved)
