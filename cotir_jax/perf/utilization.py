"""mfu and hfu, the two utilisations cotir_jax reports (metrics.jsonl, summary.json, the planner,
the step benchmark), defined here once.

- **mfu** (model FLOPs utilisation) = model FLOPs per device per step / (step time × chip peak).
  Model FLOPs are the step's maths done once: the frozen forwards (VAE, text encoders,
  backbone), the backward pass through the activations and the trainable weights' gradients,
  from the config in closed form (`closed_form.analytic_flops` without its "remat" kind). No
  rematerialisation counts; attention counts from its shapes whatever kernel runs. The step's
  model FLOPs are shared evenly by its devices.
- **hfu** (hardware FLOPs utilisation) = FLOPs the compiled program executes per device per
  step / (step time × chip peak), from the HLO walk of the compiled step (`hlo.hlo_flops`):
  remat recomputation included, attention kernels (splash, cuDNN) counted from their shapes
  with the tiles their backward recomputes, and work a device repeats because it is
  replicated.

Both count matmuls and convolutions (2 FLOPs per multiply-add), not elementwise work. Under remat
"none" with `model.attention="xla"` the compiled step executes exactly the model FLOPs (hfu =
mfu); remat and fused-attention backward passes make hfu > mfu. mfu is the one to compare across
kernels, remat policies and frameworks; hfu says how busy the chip's matrix units are.
The peak is the chip's dense bf16 figure (`chips`), `training.peak_tflops` when set.
"""

from __future__ import annotations

import dataclasses

from cotir_jax.perf import closed_form, hlo
from cotir_jax.perf.flop_count import FlopCount


def model_flops(cfg, patch_size: int, batch: int) -> FlopCount:
  """Model FLOPs of one step of `batch` samples at patch_size² (all devices together)."""
  return closed_form.analytic_flops(cfg, patch_size, batch).without("remat")


def utilization(flops_per_device: float, step_time_s: float, peak: float | None) -> float | None:
  """Achieved FLOP/s of one device over its peak FLOP/s (None when the peak is unknown)."""
  if step_time_s <= 0:
    raise ValueError(f"step time must be positive, got {step_time_s!r} s")
  if peak is None:
    return None
  return flops_per_device / step_time_s / peak


@dataclasses.dataclass(frozen=True)
class StepFlops:
  """The two FLOP counts of one compiled train step: `model` for the whole step (closed form),
  `executed` per device (the compiled program; `executed.devices` devices)."""
  model: FlopCount
  executed: FlopCount
  batch: int

  @classmethod
  def of(cls, cfg, stage: int, compiled) -> "StepFlops":
    """Counts for `compiled`, the step of `stage` (its patch and global batch from the config)."""
    patch, batch = int(cfg.training.patch_sizes[stage]), int(cfg.training.batch_sizes[stage])
    return cls(model_flops(cfg, patch, batch), hlo.hlo_flops(compiled), batch)

  @property
  def devices(self) -> int:
    return self.executed.devices

  @property
  def model_per_device(self) -> float:
    return self.model.total / self.devices

  @property
  def executed_per_device(self) -> float:
    return self.executed.total

  def utilizations(self, step_time_s: float, peak: float | None) -> dict:
    """{"mfu", "hfu"} at this step time."""
    return {"mfu": utilization(self.model_per_device, step_time_s, peak),
            "hfu": utilization(self.executed_per_device, step_time_s, peak)}

  def summary(self) -> dict:
    """JSON-able counts: per device per step and per sample, executed by component."""
    return {"model_per_device_per_step": self.model_per_device,
            "executed_per_device_per_step": self.executed_per_device,
            "model_per_sample": self.model.total / self.batch,
            "executed_per_sample": self.executed.global_total / self.batch,
            "executed_by_component": self.executed.by_component(),
            "not_counted_exactly": list(self.executed.unresolved)}
