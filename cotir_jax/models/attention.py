"""The attention kernels behind `model.attention`: unmasked softmax attention, scale 1/sqrt(D).

- "xla": `jax.nn.dot_product_attention`'s XLA path; runs everywhere, materialises the
  [B, H, Lq, Lk] scores.
- "cudnn": the same call with cuDNN's fused flash-attention kernel (NVIDIA GPUs, bf16 / fp16).
- "splash": the TPU Pallas splash-attention kernel (`jax.experimental.pallas.ops.tpu`),
  tiled over `block_q` × `block_kv` with an online softmax, so no score tensor is stored;
  its custom VJP recomputes the tiles in the backward pass. Splash rather than the older
  Pallas `flash_attention`: it takes `Lq != Lk`, has a Pallas interpreter mode (the CPU
  parity tests run the real kernel code), and is the kernel JAX maintains.

Splash specifics handled here: the kernel wants [H, L, D] per example (vmapped over the
batch), has no scale argument (q is scaled in float32 first), and needs lengths divisible by
its blocks. Lengths are padded to a multiple of 128; each block is the largest multiple of
128 not above its configured size that divides the padded length (so padding stays below
128 tokens: 640 → blocks of 128, 2560 → 512). Padded keys get segment id 0 and real tokens
1, so they have zero weight; padded query rows are dropped.

Sharding: XLA cannot partition a Mosaic kernel ("Mosaic kernels cannot be automatically
partitioned"), so under a mesh the kernel runs inside `jax.shard_map`, the batch over
`sharding.BATCH_AXES` and the heads over `tensor` (`kernel_partition`; an axis that does not
divide its dimension stays replicated). The mesh is the `mesh` argument or the ambient one:
trace the step under `jax.set_mesh(mesh)`. With neither, the kernel is called directly, which
only compiles for one device.

Precision: with bf16 inputs the kernel's matmuls must run at the default precision; Mosaic
rejects `jax_default_matmul_precision="highest"` (fp32 contraction) for bf16 operands.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from cotir_jax.config import ATTENTION_IMPLS
from cotir_jax.sharding import BATCH_AXES

LANES = 128  # the TPU vector width: splash blocks and padded lengths are multiples of it
# `checkpoint_name` of the splash residuals (its output and log-sum-exp): a remat policy that
# saves this name keeps the backward pass from re-running the forward kernel.
RESIDUALS = "attention_residuals"


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
  """`model.attention` and its kernel settings (hashable: it lives in `ModelSpec`).

  block_q / block_kv: upper bounds of the splash query / key tiles (multiples of 128).
  interpret: run the Pallas kernel in the Pallas interpreter (CPU tests, debugging).
  """
  implementation: str = "xla"
  block_q: int = 512
  block_kv: int = 512
  interpret: bool = False

  @classmethod
  def from_config(cls, m) -> "AttentionSpec":
    return cls(m.attention, int(m.attention_block_q), int(m.attention_block_kv))


def attend(q: jax.Array, k: jax.Array, v: jax.Array, spec: AttentionSpec | str) -> jax.Array:
  """Unmasked attention of q [B, Lq, H, D] over k, v [B, Lk, H, D] → [B, Lq, H, D].

  `spec`: an `AttentionSpec`, or a bare `model.attention` name (default block sizes).
  """
  spec = AttentionSpec(spec) if isinstance(spec, str) else spec
  if spec.implementation == "splash":
    return splash_attention(q, k, v, block_q=spec.block_q, block_kv=spec.block_kv,
                            interpret=spec.interpret)
  if spec.implementation in ("xla", "cudnn"):
    return jax.nn.dot_product_attention(
        q, k, v, implementation=None if spec.implementation == "xla" else "cudnn")
  raise ValueError(f"model.attention={spec.implementation!r} is not allowed; "
                   f"choose one of {list(ATTENTION_IMPLS)}")


def fit_block(length: int, block: int) -> int:
  """The largest multiple of 128 that is <= `block` and divides `length` (a multiple of 128)."""
  for b in range(min(block, length) // LANES * LANES, 0, -LANES):
    if length % b == 0:
      return b
  raise ValueError(f"attention block {block} must be a multiple of {LANES}")


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, block_q: int = 512,
                     block_kv: int = 512, interpret: bool = False, mesh=None,
                     batch_axes: Sequence[str] = BATCH_AXES,
                     head_axis: str | None = "tensor") -> jax.Array:
  """TPU splash attention of q [B, Lq, H, D] over k, v [B, Lk, H, D] → [B, Lq, H, D].

  `mesh` defaults to the ambient mesh (`jax.sharding.get_abstract_mesh()`); under one the
  kernel is shard_mapped with the batch over `batch_axes` and the heads over `head_axis`.
  """
  b, _, h, d = q.shape
  # Scale in float32 before the cast: the kernel has no scale argument.
  q = (q.astype(jnp.float32) * (1.0 / math.sqrt(d))).astype(q.dtype)
  body = lambda q, k, v: _splash_local(q, k, v, block_q, block_kv, interpret)
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if mesh.empty:
    return body(q, k, v)
  spec = kernel_partition(mesh, b, h, batch_axes, head_axis)
  return jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)(q, k, v)


def kernel_partition(mesh, batch: int, heads: int, batch_axes: Sequence[str] = BATCH_AXES,
                     head_axis: str | None = "tensor") -> P:
  """The [B, L, H, D] PartitionSpec of the kernel's shard_map: the batch over `batch_axes` and
  the heads over `head_axis`, each where the mesh has those axes and they divide the size."""
  def over(axes, size):
    axes = tuple(a for a in axes if a in mesh.axis_names)
    return axes if axes and size % math.prod(mesh.shape[a] for a in axes) == 0 else None
  return P(over(batch_axes, batch), None, over((head_axis,) if head_axis else (), heads))


def _splash_local(q, k, v, block_q: int, block_kv: int, interpret: bool):
  """The kernel on one shard: pad, [B, L, H, D] → [B, H, L, D], vmap over B, slice back."""
  # Imported here: Pallas adds ~0.4 s to every start-up that does not use it.
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  b, lq, h, _ = q.shape
  lk = k.shape[1]
  lq_pad, lk_pad = -(-lq // LANES) * LANES, -(-lk // LANES) * LANES
  bq, bkv = fit_block(lq_pad, block_q), fit_block(lk_pad, block_kv)
  blocks = sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                         block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                         block_q_dq=bq, block_kv_dq=bkv)
  mask = sm.MultiHeadMask([sm.FullMask((lq_pad, lk_pad))] * h)
  kernel = sk.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                              residual_checkpoint_name=RESIDUALS, interpret=interpret)
  def heads_major(x, length):
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

  qh, kh, vh = heads_major(q, lq_pad), heads_major(k, lk_pad), heads_major(v, lk_pad)
  if lk_pad == lk:
    out = jax.vmap(kernel)(qh, kh, vh)
  else:  # padded keys: segment 0, never matched by a query (all segment 1)
    ids = sk.SegmentIds(q=jnp.ones((lq_pad,), jnp.int32),
                        kv=(jnp.arange(lk_pad) < lk).astype(jnp.int32))
    out = jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(qh, kh, vh)
  return out.transpose(0, 2, 1, 3)[:, :lq]
