"""The one attention entry point (`attend`) and the kernels behind `model.attention`.

Softmax attention of q [B, Lq, H, D] over k, v [B, Lk, K, D] (K divides H: grouped queries),
optionally causal, with right-padded keys (`kv_lengths`) or an additive logit bias. The
backbone, the CoT adapter and the text encoders all call `attend`; `model.attention` picks the
kernel for all of them:

- "auto" (default): "splash" on TPU, "cudnn" on NVIDIA GPUs when the compute dtype is bf16 /
  fp16, "xla" elsewhere (CPU). Resolved from the platform of the devices a program is built
  for (`AttentionSpec.platform`), which is not this host's backend when `cotir_jax.plan`
  compiles for a TPU topology on a CPU.
- "xla": `jax.nn.dot_product_attention`'s XLA path; runs everywhere, materialises the
  [B, H, Lq, Lk] scores.
- "cudnn": the same call with cuDNN's fused flash-attention kernel (NVIDIA GPUs, bf16 / fp16,
  head dim a multiple of 8 up to 128); causal and padding masks are kernel modes.
- "splash": the TPU Pallas splash-attention kernel (`jax.experimental.pallas.ops.tpu`),
  tiled over `block_q` × `block_kv` with an online softmax, so no score tensor is stored;
  its custom VJP recomputes the tiles in the backward pass. Splash rather than the older
  Pallas `flash_attention`: it takes `Lq != Lk` and grouped queries, has a Pallas interpreter
  mode (the CPU parity tests run the real kernel code), and is the kernel JAX maintains.

Where the chosen kernel cannot serve a call it runs on "xla" instead (`select`): splash takes no
additive bias (T5's relative positions), cuDNN no float32. `kernels_by_part` states the kernel
of every part of a config once, for the start-up line and the planner.

Splash specifics handled here: the kernel wants [H, L, D] per example (vmapped over the
batch), has no scale argument (q is scaled in float32 first), and needs lengths divisible by
its blocks. Lengths are padded to a multiple of 128; each block is the largest multiple of
128 not above its configured size that divides the padded length (so padding stays below
128 tokens: 640 → blocks of 128, 2560 → 512). Keys carry segment ids: 1 for real keys, 0 for
keys past `kv_lengths` or added by the padding, and every query row is segment 1, so padded
keys get zero weight and every row (a padded text position too) attends to the real keys, as
transformers' masks do; causal masks are the kernel's `CausalMask`; padded query rows are dropped.

Sharding: XLA cannot partition a Mosaic kernel ("Mosaic kernels cannot be automatically
partitioned"), so under a mesh the kernel runs inside `jax.shard_map`, the batch over
`sharding.BATCH_AXES` and the heads over `tensor` (`kernel_partition`; an axis that does not
divide its dimension stays replicated). The mesh is the `mesh` argument or the ambient one:
trace under `jax.set_mesh(mesh)` (training, validation and restore all do). With neither, the
kernel is called directly, which only compiles for one device.

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

from cotir_jax.sharding import BATCH_AXES

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")  # the values `model.attention` takes
LANES = 128  # the TPU vector width: splash blocks and padded lengths are multiples of it
# `checkpoint_name` of the splash residuals (its output and log-sum-exp): a remat policy that
# saves this name keeps the backward pass from re-running the forward kernel.
RESIDUALS = "attention_residuals"
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_DIM = 128  # every GPU generation; Hopper takes 256, not known before compiling


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
  """`model.attention` and its kernel settings (hashable: it lives in `ModelSpec`).

  block_q / block_kv: upper bounds of the splash query / key tiles (multiples of 128).
  interpret: run the Pallas kernel in the Pallas interpreter (CPU tests, debugging).
  platform: of the devices the program runs on ("tpu", "cuda", "cpu"...), which "auto" and
  the kernels' availability depend on; None: the ambient mesh's devices when traced under
  `jax.set_mesh`, else this process's default devices.
  """
  implementation: str = "xla"
  block_q: int = 512
  block_kv: int = 512
  interpret: bool = False
  platform: str | None = None

  @classmethod
  def from_config(cls, m, platform: str | None = None) -> "AttentionSpec":
    return cls(m.attention, int(m.attention_block_q), int(m.attention_block_kv),
               platform=platform)


def platform_of(device) -> str:
  """"tpu", "cpu", "cuda" (NVIDIA) or "rocm" (AMD): what the kernels depend on; JAX names
  both GPU kinds "gpu"."""
  if device.platform != "gpu":
    return device.platform
  version = getattr(getattr(device, "client", None), "platform_version", "") or ""
  return "rocm" if "rocm" in version.lower() else "cuda"


def _ambient_platform() -> str:
  """The platform of the mesh being traced under (`jax.set_mesh`), else of the default devices."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  return device.platform if device is not None else platform_of(jax.devices()[0])


def resolve(implementation: str, *, platform: str, dtype) -> str:
  """The kernel a `model.attention` name means on `platform` for a compute `dtype`: "auto" →
  splash on TPU, cudnn on NVIDIA GPUs in bf16 / fp16, xla elsewhere; other names as given."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"model.attention={implementation!r} is not allowed; "
                     f"choose one of {list(IMPLEMENTATIONS)}")
  if implementation != "auto":
    return implementation
  if platform == "tpu":
    return "splash"
  if platform in ("cuda", "gpu") and jnp.dtype(dtype) in CUDNN_DTYPES:
    return "cudnn"
  return "xla"


def select(spec: AttentionSpec, *, dtype, head_dim: int, bias: str | None = None
           ) -> tuple[str, str]:
  """(kernel that runs, why it is xla instead of the kernel asked for, or "").

  `bias`: what the call's additive logit bias is (e.g. "T5 relative-position bias"), if any.
  """
  platform = spec.platform or _ambient_platform()
  kernel = resolve(spec.implementation, platform=platform, dtype=dtype)
  if kernel == "splash":
    if bias:
      return "xla", f"{bias}: no splash support"
    if platform != "tpu" and not spec.interpret:
      return "xla", f"splash needs a TPU, this is {platform}"
  if kernel == "cudnn":
    if platform not in ("cuda", "gpu"):
      return "xla", f"cudnn needs an NVIDIA GPU, this is {platform}"
    if jnp.dtype(dtype) not in CUDNN_DTYPES:
      return "xla", f"{jnp.dtype(dtype).name}: cudnn takes bf16 / fp16"
    if head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM:
      return "xla", f"head dim {head_dim}: cudnn takes multiples of 8 up to {CUDNN_MAX_HEAD_DIM}"
  return kernel, ""


def kernels_by_part(cfg, platform: str) -> dict[str, str]:
  """The kernel each part of a config runs on `platform`: backbone, cot_adapter, text_encoder
  (and clip for FLUX.1), e.g. "splash" or "xla (T5 relative-position bias: no splash support)"."""
  from cotir_jax.models.spec import COMPUTE_DTYPES  # spec imports this module
  m = cfg.model
  spec = AttentionSpec.from_config(m, platform)
  a = m.cot_adapter
  dtype = COMPUTE_DTYPES[m.mixed_precision]
  parts = {"backbone": (dtype, m.hidden_size // m.num_heads, None),
           "cot_adapter": (dtype, a.hidden_size // a.num_heads, None),
           "text_encoder": (m.encoder_dtype, *_text_attention(m.text_encoder))}
  if m.get("clip") is not None:
    parts["clip"] = (m.encoder_dtype, *_text_attention(m.clip))
  out = {}
  for part, (dtype, head_dim, bias) in parts.items():
    kernel, why = select(spec, dtype=dtype, head_dim=head_dim, bias=bias)
    out[part] = f"{kernel} ({why})" if why else kernel
  return out


def describe(kernels: dict[str, str]) -> str:
  """One line for the start-up message: "splash", or the kernel of every part when they differ."""
  if len(set(kernels.values())) == 1:
    return next(iter(kernels.values()))
  return ", ".join(f"{part} {kernel}" for part, kernel in kernels.items())


def _text_attention(enc) -> tuple[int, str | None]:
  """(head dim, logit bias) of a text encoder config (`model.text_encoder` / `model.clip`)."""
  if enc["model_type"] == "t5":
    return enc["d_kv"], "T5 relative-position bias"
  if enc["model_type"] == "qwen3":
    return enc["head_dim"], None
  return enc["hidden_size"] // enc["num_attention_heads"], None


def attend(q: jax.Array, k: jax.Array, v: jax.Array, spec: AttentionSpec | str = "xla", *,
           scale: float | None = None, causal: bool = False, kv_lengths: jax.Array | None = None,
           bias: jax.Array | None = None) -> jax.Array:
  """Softmax attention of q [B, Lq, H, D] over k, v [B, Lk, K, D] → [B, Lq, H, D] (q's dtype).

  `spec`: an `AttentionSpec`, or a bare `model.attention` name (default block sizes).
  `scale`: of the logits, default 1/sqrt(D). `causal`: query i sees keys ≤ i.
  `kv_lengths` [B] int: keys at or past it are right padding, seen by no query (every query
  row, padded or not, is computed). `bias`: added to the scaled logits, broadcastable to
  [B, H, Lq, Lk] (float32 on the xla path). Logits and softmax are float32; the probabilities
  are cast to the compute dtype before the value matmul, as transformers does.
  """
  spec = AttentionSpec(spec) if isinstance(spec, str) else spec
  d = q.shape[-1]
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  kernel, _ = select(spec, dtype=q.dtype, head_dim=d,
                     bias=None if bias is None else "an additive logit bias")
  if kv_lengths is not None:
    kv_lengths = kv_lengths.astype(jnp.int32)
  if kernel == "splash":
    return splash_attention(q, k, v, scale=scale, causal=causal, kv_lengths=kv_lengths,
                            block_q=spec.block_q, block_kv=spec.block_kv,
                            interpret=spec.interpret)
  if kernel == "cudnn" and bias is not None:
    bias = bias.astype(q.dtype)  # cuDNN adds the bias in the compute dtype
  return jax.nn.dot_product_attention(
      q, k, v, bias=bias, scale=scale, is_causal=causal, key_value_seq_lengths=kv_lengths,
      implementation=None if kernel == "xla" else "cudnn")


def fit_block(length: int, block: int) -> int:
  """The largest multiple of 128 that is <= `block` and divides `length` (a multiple of 128)."""
  for b in range(min(block, length) // LANES * LANES, 0, -LANES):
    if length % b == 0:
      return b
  raise ValueError(f"attention block {block} must be a multiple of {LANES}")


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None = None,
                     causal: bool = False, kv_lengths: jax.Array | None = None,
                     block_q: int = 512, block_kv: int = 512, interpret: bool = False,
                     mesh=None, batch_axes: Sequence[str] = BATCH_AXES,
                     head_axis: str | None = "tensor") -> jax.Array:
  """TPU splash attention of q [B, Lq, H, D] over k, v [B, Lk, K, D] → [B, Lq, H, D] (see
  `attend` for the arguments).

  `mesh` defaults to the ambient mesh (`jax.sharding.get_abstract_mesh()`); under one the
  kernel is shard_mapped with the batch over `batch_axes` and the heads over `head_axis`.
  """
  b, lk, kv_heads, d = k.shape
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  if scale != 1.0:  # in float32 before the cast: the kernel has no scale argument
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)
  body = lambda q, k, v, *n: _splash_local(q, k, v, n[0] if n else None, causal, block_q,
                                            block_kv, interpret)
  args = (q, k, v) if kv_lengths is None else (q, k, v, kv_lengths)
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if mesh.empty:
    return body(*args)
  # kv heads: an axis dividing them divides the query heads too, keeping each group together
  spec = kernel_partition(mesh, b, kv_heads, batch_axes, head_axis)
  return jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec, P(spec[0]))[:len(args)],
                       out_specs=spec, check_vma=False)(*args)


def kernel_partition(mesh, batch: int, heads: int, batch_axes: Sequence[str] = BATCH_AXES,
                     head_axis: str | None = "tensor") -> P:
  """The [B, L, H, D] PartitionSpec of the kernel's shard_map: the batch over `batch_axes` and
  the heads over `head_axis`, each where the mesh has those axes and they divide the size."""
  def over(axes, size):
    axes = tuple(a for a in axes if a in mesh.axis_names)
    return axes if axes and size % math.prod(mesh.shape[a] for a in axes) == 0 else None
  return P(over(batch_axes, batch), None, over((head_axis,) if head_axis else (), heads))


def _splash_local(q, k, v, kv_lengths, causal: bool, block_q: int, block_kv: int,
                  interpret: bool):
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
  shape = (lq_pad, lk_pad)
  mask = sm.MultiHeadMask([sm.CausalMask(shape) if causal else sm.FullMask(shape)] * h)
  kernel = sk.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                              residual_checkpoint_name=RESIDUALS, interpret=interpret)

  def heads_major(x, length):
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

  qh, kh, vh = heads_major(q, lq_pad), heads_major(k, lk_pad), heads_major(v, lk_pad)
  if kv_lengths is None and lk_pad == lk:
    out = jax.vmap(kernel)(qh, kh, vh)
  else:  # keys past the length or the padding: segment 0, never matched by a query (all 1)
    n = jnp.full((b,), lk, jnp.int32) if kv_lengths is None else kv_lengths
    ids = sk.SegmentIds(q=jnp.ones((b, lq_pad), jnp.int32),
                        kv=(jnp.arange(lk_pad)[None] < n[:, None]).astype(jnp.int32))
    out = jax.vmap(lambda q, k, v, ids: kernel(q, k, v, segment_ids=ids))(qh, kh, vh, ids)
  return out.transpose(0, 2, 1, 3)[:, :lq]
