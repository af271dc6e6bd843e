"""FLOPs of the train step, and MFU: from the compiled XLA program and in closed form.

Why not `compiled.cost_analysis()["flops"]`: XLA's cost analysis visits each computation once, so
the body of a `while` loop — every `lax.scan` over stacked blocks (backbone, adapter, text
encoder layers) — counts as ONE iteration. On the scanned CoTIR step it reports a fraction of
the work: 4B at 512², batch 1, compiled for one TPU v5p chip, 6.8 TFLOP where the walk below
finds 64.9 (`analytic_flops`: 64.8); an MFU built on it is wrong by ~10×.

`hlo_flops(compiled)` walks the optimized HLO module instead (`compiled.as_text()`):

- counted ops: `dot` as 2·prod(output dims)·prod(lhs contracting dims); `convolution` as
  2·prod(output batch, feature dims)·(valid kernel taps over the spatial dims)·(kernel input
  features per group) — "valid taps" leaves out the multiplications with padding or with the
  zeros of lhs dilation, exactly as XLA's cost analysis does (for an unpadded conv it is
  prod(output spatial)·prod(kernel spatial); TPU lowers dots to `convolution`s without spatial
  dims); cuBLAS GEMM custom calls (GPU) like `dot`. Elementwise work, reductions and
  transcendentals are not counted: MFU is about matmul throughput.
- call graph: from ENTRY through fusions (`calls=`), `call` (`to_apply=`), `async-start`,
  `while` (body × trip count, condition × (trip count + 1)) and `conditional` (the most
  expensive branch: an upper bound). The trip count is read from `known_trip_count` in the
  while's backend_config (CPU, GPU) or, when absent (TPU), derived from the loop: the condition
  compares a tuple element to a constant, the init tuple sets it to a constant and the body adds
  a constant to it. Loops that fit neither are counted once and listed in `FlopCount.unresolved`,
  as are custom calls that may hide matmuls (Pallas / Triton kernels, cuDNN attention).
- breakdown: each op's `metadata={op_name="..."}` names the `jax.named_scope`s it was traced
  under. The innermost of `COMPONENTS` among the path segments is its component ("other" when
  none). The kind is "remat" when the path holds `rematted_computation` (what `jax.checkpoint`
  recomputes in the backward pass), else "backward" when it holds `transpose(` (the transposed
  JVP, i.e. the VJP of `jax.grad`), else "forward". Ops without metadata take their caller's
  (the fusion, loop or call they sit in), else their nearest producer's.
- devices: on an SPMD-partitioned program the module is the per-device program, so the counts
  are what ONE device executes (`FlopCount.total`), including any replicated computation —
  that is real work on each chip and is what MFU needs. `global_total` = per device × devices
  (`num_partitions` × `replica_count` of the module): the work of all chips together, equal to
  the logical program's FLOPs only when nothing is computed redundantly.

`analytic_flops(cfg, patch_size, batch)` is the same count in closed form from a config — one
train step of the CoTIR recipe: VAE encode of HQ and LQ, the text encoder on 4·batch sequences
(prompt + three answers) of `data.max_length` tokens (plus CLIP on the prompt for FLUX.1), the
backbone over `max_length` text + 2·N image tokens, the CoT adapter on the text rows, backward
through what the trainable LoRA + adapter weights need, and the recomputation of
`model.remat_policy`; see its docstring for the accounting.

`device_peak_flops(device)` gives a chip's dense bf16 peak from `PEAK_TFLOPS`, and
`mfu(flops_per_step_per_device, step_time_s, peak)` the model FLOPs utilisation.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

COMPONENTS = ("vae", "text_encoder", "clip", "double_blocks", "single_blocks", "cot_adapter",
              "final_layer", "loss", "optimizer")
KINDS = ("forward", "backward", "remat")


# --------------------------------------------------------------------------- the result

@dataclasses.dataclass(frozen=True)
class FlopCount:
  """Matmul + convolution FLOPs of one execution, by (component, kind).

  `flops[(component, kind)]` is what one device executes (for `analytic_flops`, devices = 1:
  the whole step on one device). `unresolved` lists what could not be counted exactly.
  """
  flops: dict
  devices: int = 1
  unresolved: tuple = ()

  @property
  def total(self) -> float:
    """FLOPs one device executes."""
    return float(sum(self.flops.values()))

  @property
  def global_total(self) -> float:
    """FLOPs of all devices together (per device × devices)."""
    return self.total * self.devices

  def by_component(self) -> dict[str, float]:
    out = collections.defaultdict(float)
    for (component, _), v in self.flops.items():
      out[component] += v
    return dict(out)

  def by_kind(self) -> dict[str, float]:
    out = collections.defaultdict(float)
    for (_, kind), v in self.flops.items():
      out[kind] += v
    return dict(out)

  def get(self, component: str, kind: str | None = None) -> float:
    """FLOPs of one component (all kinds, or one kind)."""
    return float(sum(v for (c, k), v in self.flops.items()
                     if c == component and (kind is None or k == kind)))

  def scaled(self, factor: float) -> "FlopCount":
    """Every count times `factor` (e.g. 1 / batch for FLOPs per sample)."""
    return dataclasses.replace(self, flops={k: v * factor for k, v in self.flops.items()})

  def table(self, unit: float = 1e12, unit_name: str = "TFLOP") -> str:
    """A readable breakdown: one row per component, columns per kind, totals."""
    comps = [c for c in (*COMPONENTS, "other") if self.get(c)]
    head = f"{'component':<14}" + "".join(f"{k:>10}" for k in (*KINDS, "total"))
    rows = [head]
    for c in comps:
      rows.append(f"{c:<14}" + "".join(f"{self.get(c, k) / unit:>10.3f}" for k in KINDS)
                  + f"{self.get(c) / unit:>10.3f}")
    kinds = self.by_kind()
    rows.append(f"{'total':<14}" + "".join(f"{kinds.get(k, 0.0) / unit:>10.3f}" for k in KINDS)
                + f"{self.total / unit:>10.3f}")
    rows.append(f"({unit_name} per device; {self.devices} device(s))")
    if self.unresolved:
      rows.append("not counted exactly: " + "; ".join(self.unresolved))
    return "\n".join(rows)


def classify(op_name: str) -> tuple[str, str]:
  """(component, kind) of an op from its metadata op_name (see the module docstring)."""
  segments = op_name.split("/")
  component = "other"
  for seg in segments:
    name = _unwrap(seg)
    if name in COMPONENTS:
      component = name
  if "rematted_computation" in segments:
    kind = "remat"
  elif "transpose(" in op_name:
    kind = "backward"
  else:
    kind = "forward"
  return component, kind


_WRAPPER = re.compile(r"^(?:transpose|jvp|vmap|checkpoint|remat)\((.*)\)$")


def _unwrap(segment: str) -> str:
  """'transpose(jvp(vae))' → 'vae': scope names may appear inside autodiff wrappers."""
  while True:
    m = _WRAPPER.match(segment)
    if not m:
      return segment
    segment = m.group(1)


# --------------------------------------------------------------------------- HLO text parsing

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
    operands = [p.split()[-1].lstrip("%") for p in _split_top(inner)]
  return _Instr(m.group(2), shape, opcode, operands, literal, line[k:]), bool(m.group(1))


_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\)\s*->\s*.*)?\{\s*$")


def _parse_module(text: str) -> tuple[dict, str, int]:
  """({name: _Computation}, entry name, devices) from an HLO module's text."""
  comps, entry, current, root = {}, None, None, None
  devices = 1
  for line in text.splitlines():
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
  return comps, entry, devices


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


def valid_taps(in_size: int, out_size: int, kernel: int, stride: int = 1, pad_lo: int = 0,
               lhs_dilation: int = 1, rhs_dilation: int = 1) -> int:
  """Number of (output position, kernel tap) pairs of one spatial dim that hit real input
  (not padding, not a hole of lhs dilation): the multiplies XLA's cost analysis counts."""
  span = (in_size - 1) * lhs_dilation + 1
  count = 0
  for k in range(kernel):
    for o in range(out_size):
      q = o * stride + k * rhs_dilation - pad_lo
      if 0 <= q < span and q % lhs_dilation == 0:
        count += 1
  return count


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
                     "AsyncCollectiveDone")
# the ops that count FLOPs or call computations that may; everything else is skipped
_VISITED = ("dot", "convolution", "custom-call", "while", "conditional", "fusion", "call",
            "async-start")
_TRIP = re.compile(r'\\?"known_trip_count\\?"\s*:\s*\{\s*\\?"n\\?"\s*:\s*\\?"(\d+)')
_PASS = ("copy", "bitcast", "convert", "reshape", "copy-done", "optimization-barrier")
_FLIP = {"LT": "GT", "GT": "LT", "LE": "GE", "GE": "LE", "EQ": "EQ", "NE": "NE"}


class _Walker:
  """Counts FLOPs over the call graph of a parsed module, memoised per computation."""

  def __init__(self, comps: dict):
    self.comps = comps
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
      if op not in _VISITED:
        continue
      op_name = _full_op_name(ins.op_name, context) or _producer_op_name(comp, ins)
      if op == "dot":
        total[classify(op_name)] += _dot_flops(ins, comp)
      elif op == "convolution":
        total[classify(op_name)] += _conv_flops(ins, comp)
      elif op == "custom-call":
        target = ins.attr(r'custom_call_target="([^"]*)"') or "?"
        if target.startswith(_GEMM_TARGETS):
          total[classify(op_name)] += _gemm_flops(ins, comp)
        elif target not in _HARMLESS_TARGETS and not target.startswith("xla.sdy."):
          self.unresolved[f"custom call {target}"] += 1
      elif op == "while":
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
      elif op in ("fusion", "call", "async-start"):
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


def hlo_flops(compiled_or_hlo_text) -> FlopCount:
  """Matmul + convolution FLOPs of one run of a compiled program, loops included.

  Takes a `jax.stages.Compiled` (`jitted.lower(...).compile()`) or HLO module text: optimized
  (`compiled.as_text()`: what each device runs), or before optimization and partitioning
  (`lowered.as_text(dialect="hlo", debug_info=True)`, no compile needed: the logical program
  of all devices, before XLA's DCE / CSE; without debug_info the breakdown is all "other").
  See the module docstring for the rules.
  """
  text = compiled_or_hlo_text
  if not isinstance(text, str):
    text = compiled_or_hlo_text.as_text()
  comps, entry, devices = _parse_module(text)
  walker = _Walker(comps)
  counts = walker.count(entry, "")
  unresolved = tuple(f"{what} ×{n}" for what, n in sorted(walker.unresolved.items()))
  return FlopCount(flops={k: v for k, v in counts.items() if v}, devices=devices,
                   unresolved=unresolved)


# --------------------------------------------------------------------------- analytic count

@dataclasses.dataclass(frozen=True)
class _Op:
  """One matmul of a block, per sample: forward FLOPs, backward FLOPs, and what remat needs.

  needed: its output is read by the backward pass (a residual); deps: ops whose outputs it
  reads; batched: a dot with batch dims (attention), which the "dots" policy does not save;
  name "pv" is the attention output that the save_* / offload_* policies keep.
  """
  name: str
  fwd: float
  bwd: float = 0.0
  needed: bool = False
  deps: tuple = ()
  batched: bool = False


# what each remat policy saves (models/layers.py REMAT_POLICIES); the rest is recomputed
_SAVED = {
    "full": lambda op: False,
    "dots": lambda op: not op.batched,
    "save_attention": lambda op: op.name == "pv",
    "save_qkv_attention": lambda op: op.name == "pv",  # q/k/v are not matmul outputs
    "offload_attention": lambda op: op.name == "pv",
}


def _remat(ops: list[_Op], policy: str) -> float:
  """Forward FLOPs the backward pass recomputes under a remat policy: every op whose output is
  needed (by the backward or by another recomputed op) and not saved."""
  if policy == "none":
    return 0.0
  if policy not in _SAVED:
    raise ValueError(f"remat policy {policy!r} is unknown to flops.analytic_flops; "
                     f"known: {['none', *_SAVED]}")
  saved = _SAVED[policy]
  by_name = {op.name: op for op in ops}
  todo = [op.name for op in ops if op.needed and not saved(op)]
  redo = set()
  while todo:
    name = todo.pop()
    if name in redo:
      continue
    redo.add(name)
    todo.extend(d for d in by_name[name].deps if not saved(by_name[d]))
  return sum(by_name[n].fwd for n in redo)


def _dense(name, rows, fan_in, fan_out, *, weight_grad=False, input_grad=False, needed=False,
           deps=(), lora_rank=None):
  """A Dense layer on `rows` tokens (+ its LoRA x·A·B): forward, and backward for the weight
  gradient (trainable) and/or the input gradient (something upstream is trainable)."""
  f = 2.0 * rows * fan_in * fan_out
  ops = [_Op(name, f, f * (weight_grad + input_grad), needed, deps)]
  if lora_rank:
    r = min(lora_rank, fan_in, fan_out)
    fa, fb = 2.0 * rows * fan_in * r, 2.0 * rows * r * fan_out
    # backward: dB = uᵀ·dy and du = dy·Bᵀ (fb each), dA = xᵀ·du (fa), dx += du·Aᵀ (fa if needed)
    ops += [_Op(f"{name}.lora_a", fa, fa * (1 + input_grad), True, deps),
            _Op(f"{name}.lora_b", fb, 2 * fb, needed, (f"{name}.lora_a",))]
  return ops


def _attention(q_rows, k_rows, width, *, grad, deps):
  """Softmax attention (QKᵀ then PV, all heads: width = heads·head_dim); backward 2× each."""
  f = 2.0 * q_rows * k_rows * width
  g = 2 * f if grad else 0.0
  return [_Op("qk", f, g, grad, deps, batched=True), _Op("pv", f, g, grad, ("qk",) + deps,
                                                          batched=True)]


def _double_block(s, n_txt, n_img):
  """FLUX double-stream block: nothing in it or before it is trainable → forward only."""
  h, mh = s.hidden_size, s.mlp_hidden
  width = mh * (2 if s.family == "flux2" else 1)
  ops = []
  for stream, rows in (("txt", n_txt), ("img", n_img)):
    if s.family == "flux1":
      ops += _dense(f"{stream}_mod", 1, h, 6 * h)
    ops += (_dense(f"{stream}_qkv", rows, h, 3 * h) + _dense(f"{stream}_proj", rows, h, h)
            + _dense(f"{stream}_fc1", rows, h, width) + _dense(f"{stream}_fc2", rows, mh, h))
  return ops + _attention(n_txt + n_img, n_txt + n_img, h, grad=False, deps=())


def _single_block(s, rows):
  """FLUX single-stream block with LoRA on linear1 / linear2 (and FLUX.1's modulation).

  Base weights are frozen: input gradients only. linear1's output feeds nonlinearities and
  the attention (needed by the backward); linear2's output feeds the residual through the gate,
  which is frozen on FLUX.2 (not needed: "full" remat skips it) and comes from the LoRA'd
  modulation on FLUX.1 (needed for the gate's gradient); LoRA's x·A is needed for dB.
  """
  h, mh, r = s.hidden_size, s.mlp_hidden, s.lora.rank if s.lora else None
  width = mh * (2 if s.family == "flux2" else 1)
  ops = []
  if s.family == "flux1":
    ops += _dense("mod", 1, h, 3 * h, needed=True, lora_rank=r)
  ops += _dense("linear1", rows, h, 3 * h + width, input_grad=True, needed=True, lora_rank=r)
  ops += _attention(rows, rows, h, grad=True, deps=("linear1", "linear1.lora_b"))
  ops += _dense("linear2", rows, h + mh, h, input_grad=True, needed=s.family == "flux1",
                deps=("pv", "linear1"), lora_rank=r)
  return ops


def _adapter_block(s, n_txt, rows):
  """CoT adapter block: every weight trainable; queries, MLP and output on the text rows only,
  keys / values over [txt; img]. All outputs are needed (the gate g is trainable too)."""
  h, amh = s.hidden_size, int(s.hidden_size * s.adapter_mlp_ratio)
  train = dict(weight_grad=True, input_grad=True, needed=True)
  ops = (_dense("mod", 1, h, 3 * h, weight_grad=True, needed=True)
         + _dense("q", n_txt, h, h, **train) + _dense("kv", rows, h, 2 * h, **train)
         + _dense("m", n_txt, h, amh, **train)
         + _attention(n_txt, rows, h, grad=True, deps=("q", "kv"))
         + _dense("linear2", n_txt, h + amh, h, deps=("pv", "m"), **train))
  return ops


def _encoder_layer(rows, d, qkv_out, kv_out, mlp, mlp_in_layers, attn_width):
  """A frozen text-encoder layer (forward only): q/k/v/o projections, attention, MLP."""
  return (_dense("q", rows, d, qkv_out) + _dense("k", rows, d, kv_out)
          + _dense("v", rows, d, kv_out) + _dense("o", rows, qkv_out, d)
          + _attention(rows, rows, attn_width, grad=False, deps=())
          + [op for i in range(mlp_in_layers) for op in _dense(f"in{i}", rows, d, mlp)]
          + _dense("out", rows, mlp, d))


def _text_encoder(t, rows):
  """Forward FLOPs of one sequence of `rows` tokens through a frozen Qwen3 / T5 / CLIP."""
  if t.model_type == "qwen3":
    layer = _encoder_layer(rows, t.hidden_size, t.num_attention_heads * t.head_dim,
                           t.num_key_value_heads * t.head_dim, t.intermediate_size, 2,
                           t.num_attention_heads * t.head_dim)
    return t.num_layers_built * sum(op.fwd for op in layer)
  if t.model_type == "t5":
    inner = t.num_heads * t.d_kv
    layer = _encoder_layer(rows, t.d_model, inner, inner, t.d_ff, 2, inner)
    return t.num_layers * sum(op.fwd for op in layer)
  layer = _encoder_layer(rows, t.hidden_size, t.hidden_size, t.hidden_size,
                         t.intermediate_size, 1, t.hidden_size)
  return t.num_hidden_layers * sum(op.fwd for op in layer)


def _conv(size, cin, cout, k, stride=1, pad=None):
  """(FLOPs, output size) of a k×k conv on a size×size map, counting valid taps only."""
  lo, hi = pad if pad is not None else (k // 2, k // 2)
  out = (size + lo + hi - k) // stride + 1
  taps = valid_taps(size, out, k, stride, lo) ** 2
  return 2.0 * taps * cin * cout, out


def _vae_encode(vcfg, size):
  """Forward FLOPs of one image through the VAE encoder (+ quant_conv) at size × size."""
  ch, g = tuple(vcfg.block_out_channels), vcfg.layers_per_block
  total, _ = _conv(size, vcfg.in_channels, ch[0], 3)

  def resnet(cin, cout, size):
    f = _conv(size, cin, cout, 3)[0] + _conv(size, cout, cout, 3)[0]
    return f + (_conv(size, cin, cout, 1)[0] if cin != cout else 0.0)

  for i, cout in enumerate(ch):
    cin = ch[max(i - 1, 0)]
    for j in range(g):
      total += resnet(cin if j == 0 else cout, cout, size)
    if i < len(ch) - 1:
      f, size = _conv(size, cout, cout, 3, stride=2, pad=(0, 1))
      total += f
  c, tokens = ch[-1], size * size
  total += 2 * resnet(c, c, size)
  if vcfg.mid_block_add_attention:
    total += 4 * 2.0 * tokens * c * c + 4.0 * tokens * tokens * c
  total += _conv(size, c, 2 * vcfg.latent_channels, 3)[0]
  if vcfg.use_quant_conv:
    total += _conv(size, 2 * vcfg.latent_channels, 2 * vcfg.latent_channels, 1)[0]
  return total


def analytic_flops(cfg, patch_size: int, batch: int) -> FlopCount:
  """Matmul + convolution FLOPs of one train step (`batch` samples of patch_size²) by
  (component, kind), in closed form from the config. Counts as `hlo_flops` does (2 per
  multiply-add, convolution taps on padding left out) so the two can be compared.

  What runs (train/step.py): VAE encode of HQ and LQ; the text encoder on 4·batch sequences
  (prompt + three answers) of `data.max_length` tokens; CLIP on the prompt (FLUX.1); the
  backbone over T = max_length text + 2·N image tokens (target + conditioning, N = (P/16)²):
  embedders and FLUX.2's shared modulations ("other"), double blocks, the CoT adapter (queries,
  MLP and heads on the text rows, keys / values over all T), single blocks, final layer on the
  2·N image rows.

  Backward (the base is frozen; LoRA on single blocks + final layer and the adapter train):
  - nothing before the adapter depends on a trainable weight: encoders, embedders and double
    blocks run forward only;
  - frozen matmuls behind a trainable one (single blocks, final layer) need the input
    gradient only: backward = 1× forward; attention needs dQ, dK, dV: 2× forward;
  - trainable matmuls (adapter, LoRA factors) need weight and input gradients: 2× forward;
    matmuls on the pooled vector (modulations) need the weight gradient only (vec is frozen).
  Remat (`model.remat_policy`, per part `model.remat.<part>`): the backward pass recomputes
  each block's forward ops whose outputs it needs and the policy did not save — "full" skips
  FLUX.2's single-block linear2 (its output only feeds a residual with a frozen gate), "dots"
  recomputes only the attention matmuls, the save_* / offload_* policies everything but the
  attention output's PV. Double blocks have no backward and so no recomputation.

  This is what the scanned step executes, per (component, kind) to the FLOP (tested against
  compiled and lowered CPU steps). Unrolled (`model.scan_layers=False`) XLA shares part of the
  adapter's recomputation with the forward pass (~2% less in total). With `model.attention` =
  splash / cudnn the attention runs in kernels the HLO walk cannot see, but counts here. The
  VAE and encoders are taken from the config (`model.vae`, ...), which with `model.pretrained`
  describes the upstream architecture the checkpoint holds.
  """
  from cotir_jax.models.spec import ModelSpec
  from cotir_jax.models.text import text_config
  from cotir_jax.train.modules import CLIP_LENGTH
  s = ModelSpec.from_config(cfg.model)
  n_img = 2 * (patch_size // 16) ** 2
  n_txt = int(cfg.data.max_length)
  rows = n_txt + n_img
  h, r = s.hidden_size, s.lora.rank if s.lora else None
  flops = collections.Counter()

  def add(component, ops, times=1, remat_policy="none"):
    flops[(component, "forward")] += times * sum(op.fwd for op in ops)
    flops[(component, "backward")] += times * sum(op.bwd for op in ops)
    flops[(component, "remat")] += times * _remat(ops, remat_policy)

  m = cfg.model
  flops[("vae", "forward")] += 2 * _vae_encode(m.vae, patch_size)
  flops[("text_encoder", "forward")] += 4 * _text_encoder(text_config(m.text_encoder), n_txt)
  if "clip" in m:
    flops[("clip", "forward")] += _text_encoder(text_config(m.clip), CLIP_LENGTH)

  embed = (_dense("img_in", n_img, s.in_channels, h) + _dense("txt_in", n_txt, s.context_in_dim, h)
           + _dense("time_in", 1, 256, h) + _dense("time_out", 1, h, h))
  if s.guidance_embed:
    embed += _dense("guidance_in", 1, 256, h) + _dense("guidance_out", 1, h, h)
  if s.family == "flux1":
    embed += _dense("vector_in", 1, s.vec_in_dim, h) + _dense("vector_out", 1, h, h)
  else:
    embed += _dense("mod_img", 1, h, 6 * h) + _dense("mod_txt", 1, h, 6 * h)
    embed += _dense("mod_single", 1, h, 3 * h)
  add("other", embed)
  add("double_blocks", _double_block(s, n_txt, n_img), s.depth)

  add("cot_adapter", _adapter_block(s, n_txt, rows), s.adapter_depth,
      s.remat_for("cot_adapter"))
  out = s.adapter_out_channels
  train = dict(weight_grad=True, input_grad=True)
  heads = (_dense("degradation", n_txt, h, h, **train) + _dense("sharpness", n_txt, h, h, **train)
           + _dense("planning", n_txt, 2 * h, h, **train))
  for _ in range(3):
    heads += _dense("adaLN", 1, h, 2 * h, weight_grad=True) + _dense("linear", n_txt, h, out,
                                                                      **train)
  add("cot_adapter", heads)

  add("single_blocks", _single_block(s, rows), s.depth_single_blocks,
      s.remat_for("single_blocks"))
  add("final_layer", _dense("adaLN", 1, h, 2 * h, lora_rank=r)
      + _dense("linear", n_img, h, s.out_channels, input_grad=True, lora_rank=r))
  scaled = {k: batch * v for k, v in flops.items() if v}
  return FlopCount(flops=scaled, devices=1)


# --------------------------------------------------------------------------- peaks and MFU

# Dense (no sparsity) bf16 matmul peak per chip, TFLOP/s, from the vendors' spec sheets.
PEAK_TFLOPS = {
    # NVIDIA H100 Tensor Core GPU Architecture whitepaper: BF16 Tensor 989.4 (SXM5),
    # 756.5 (PCIe) TFLOPS dense; the datasheets' 1,979 / 1,513 are "with sparsity".
    "H100 SXM": 989.4,
    "H100 PCIe": 756.5,
    # NVIDIA H200 datasheet: BF16 Tensor Core 1,979 TFLOPS with sparsity (same GH100 cores).
    "H200": 989.4,
    # NVIDIA A100 datasheet: BF16 Tensor Core 312 TFLOPS (624 with sparsity), SXM and PCIe.
    "A100": 312.0,
    # Google Cloud TPU system architecture pages, "peak compute per chip (bf16)".
    "TPU v4": 275.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v6e": 918.0,
}

# jax `device_kind` → PEAK_TFLOPS key, for the TPU names JAX reports
_TPU_KINDS = {"tpu v4": "TPU v4", "tpu v5 lite": "TPU v5e", "tpu v5e": "TPU v5e",
              "tpu v5": "TPU v5p", "tpu v5p": "TPU v5p", "tpu v6 lite": "TPU v6e",
              "tpu v6e": "TPU v6e"}


def peak_key(device_kind: str) -> str | None:
  """The PEAK_TFLOPS entry of a jax `device_kind` ("TPU v5 lite", "NVIDIA H100 80GB HBM3",
  "NVIDIA A100-SXM4-40GB", ...), or None for a device not in the table (CPUs)."""
  kind = " ".join(device_kind.lower().split())
  if kind in _TPU_KINDS:
    return _TPU_KINDS[kind]
  if "h100" in kind:
    return "H100 PCIe" if "pcie" in kind else None if "nvl" in kind else "H100 SXM"
  if "h200" in kind:
    return "H200"
  if "a100" in kind:
    return "A100"
  return None


def device_peak_flops(device, override: float | None = None) -> float | None:
  """Dense bf16 peak FLOP/s of one chip: `override` (TFLOP/s, e.g. `training.peak_tflops`)
  when given, else the PEAK_TFLOPS entry of the device (a jax Device or its device_kind), else
  None. On TPU v4 / v5p slices JAX shows one device per chip (megacore: both TensorCores),
  so per device = per chip everywhere in the table."""
  if override is not None:
    if override <= 0:
      raise ValueError(f"peak TFLOP/s override must be positive, got {override!r}")
    return float(override) * 1e12
  kind = device if isinstance(device, str) else device.device_kind
  key = peak_key(kind)
  return None if key is None else PEAK_TFLOPS[key] * 1e12


def mfu(flops_per_step_per_device: float, step_time_s: float, peak: float | None) -> float | None:
  """Model FLOPs utilisation: achieved FLOP/s of one device over its peak FLOP/s (None when
  the peak is unknown)."""
  if step_time_s <= 0:
    raise ValueError(f"step time must be positive, got {step_time_s!r} s")
  if peak is None:
    return None
  return flops_per_step_per_device / step_time_s / peak


def measured_peak_flops(device=None, n: int = 1024, repeats: int = 8) -> float:
  """FLOP/s of a dense n×n float32 matmul chain on `device`: the stand-in peak for devices not
  in PEAK_TFLOPS (CPUs), so `mfu` still says how close the step comes to the chip's own best."""
  import time

  import jax
  import jax.numpy as jnp
  device = device or jax.devices()[0]
  x = jax.device_put(jnp.ones((n, n), jnp.float32) / n, device)
  chain = jax.jit(lambda a: jax.lax.fori_loop(0, repeats, lambda _, b: b @ a, a))
  chain(x).block_until_ready()
  best = float("inf")
  for _ in range(3):
    t0 = time.perf_counter()
    chain(x).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 * repeats / best
