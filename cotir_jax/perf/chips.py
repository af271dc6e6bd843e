"""Peak matmul FLOP/s of a chip: the vendors' dense bf16 figures, or a measured stand-in.

The denominator of `perf.utilization`'s mfu and hfu. Devices without a published peak (CPUs)
get `measured_peak_flops`, their own best float32 matmul rate, so the utilisations still say how
close the step comes to what that device can do.
"""

from __future__ import annotations

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
