"""A FLOP count of one train step by (component, kind): the result type the HLO walk
(`perf.hlo`) and the closed-form model (`perf.closed_form`) both return, and the counting
conventions they share.

Conventions: 2 FLOPs per multiply-add; matmuls (dots, cuBLAS GEMMs, attention kernels) and
convolutions only — elementwise work, reductions and transcendentals are left out, since
utilisation is about matmul throughput; a convolution counts only the kernel taps that hit real
input (`valid_taps`), as XLA's cost analysis does.

Components are the `jax.named_scope`s the train step runs under (`COMPONENTS`, "other" for the
rest). Kinds: "forward" (the forward pass), "backward" (the VJP of `jax.grad`: input and weight
gradients), "remat" (forward work the backward pass repeats: `jax.checkpoint` recomputation,
and the tiles a fused attention kernel's backward recomputes).
"""

from __future__ import annotations

import collections
import dataclasses
import re

COMPONENTS = ("vae", "text_encoder", "clip", "double_blocks", "single_blocks", "cot_adapter",
              "final_layer", "loss", "optimizer")
KINDS = ("forward", "backward", "remat")


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

  def without(self, kind: str) -> "FlopCount":
    """The count with one kind left out (`without("remat")`: the model FLOPs of a step)."""
    return dataclasses.replace(self, flops={k: v for k, v in self.flops.items() if k[1] != kind})

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
  """(component, kind) of an op from its metadata op_name: the innermost of `COMPONENTS` among
  the path's scopes ("other" if none); "remat" when the path holds `rematted_computation` (what
  `jax.checkpoint` recomputes), else "backward" when it holds `transpose(` (the VJP), else
  "forward"."""
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
