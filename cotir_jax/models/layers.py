"""Building blocks shared by the FLUX.2 / FLUX.1 backbones, the CoT adapter and the encoders.

Conventions (relied on by the converter tables and the sharding rules):
- `Dense.kernel` is `[in, out]` (PyTorch's weight transposed), `Dense.bias` is `[out]`.
- Every parameter carries logical axis names (`out_sharding` metadata, see `sharding.py`):
  `embed` for the model width, `heads` for attention projections' head-ordered columns / rows,
  `mlp` for MLP widths, `layers` for the stacked-block axis added by `stack_blocks`; small
  vectors stay unnamed (replicated).
- Fused projections (q k v [+ MLP input] in one kernel) store their columns head-group-major
  (`FusedLayout`), so a contiguous split over `tensor` gives every shard whole heads.
- Matmuls run in the compute `dtype` with float32 accumulation; norms run in float32.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from cotir_jax.models import attention as kernels
from cotir_jax.sharding import constrain

Axes = tuple[str | None, ...]
# Logical names of activations (mapped to mesh axes by the rule table in sharding.py).
TOKENS = ("batch", "length", "act_embed")       # [B, L, width]
HEADS = ("batch", "length", "act_heads", None)  # [B, L, H, D]
HIDDEN = ("batch", "length", "act_mlp")         # [B, L, widened projection (MLP input)]
FUSED = ("batch", "length", "act_heads")        # [B, L, fused projection, grouped by head]
IMAGE = ("batch", None, None, None)             # [B, H, W, C] (VAE)


def param(value: jax.Array, axes: Axes, kind: type[nnx.Variable] = nnx.Param) -> nnx.Variable:
  """A variable with logical axis names; placement happens later through the rule table."""
  return kind(value, out_sharding=axes, eager_sharding=False)


def torch_uniform(key: jax.Array, shape: Sequence[int], fan_in: int, dtype) -> jax.Array:
  """PyTorch's default `nn.Linear` init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform a=sqrt(5))."""
  bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def matmul(x: jax.Array, w: jax.Array, dtype, precision=None) -> jax.Array:
  """x @ w in the compute dtype with float32 accumulation; result in float32."""
  return jnp.matmul(x.astype(dtype), w.astype(dtype), precision=precision,
                    preferred_element_type=jnp.float32)


# What checkpoints record (`fused_layout`) to say their fused projections follow `FusedLayout`;
# one without it was written when the parts lay side by side (the reference order).
FUSED_LAYOUT = "head_groups"


def fused_groups(num_heads: int, mlp_hidden: int) -> int:
  """Head groups of a block's fused projections: the most that split both the heads and the
  MLP width evenly (every head of FLUX.2-klein, FLUX.1 and the CoT adapter is its own group)."""
  return math.gcd(num_heads, mlp_hidden)


@dataclasses.dataclass(frozen=True)
class FusedLayout:
  """Column order of a fused projection whose reference (BFL / diffusers / upstream) layout is
  its parts side by side, e.g. single-block linear1 = [q | k | v | gate | up].

  Ours interleaves the parts by head group: [q_0 k_0 v_0 gate_0 up_0 | q_1 k_1 v_1 ...], each
  part cut into `groups` equal chunks (group g of q, k, v = the heads g·H/G … (g+1)·H/G − 1;
  of gate / up = the matching MLP columns). Why: tensor parallelism splits an axis into
  contiguous blocks; in this order any split into a divisor of `groups` gives each shard whole
  heads of q, k, v with their own gate / up columns, so attention and the MLP run shard-locally
  and the only collective is the row-parallel output projection's reduction (Megatron's), where
  the reference order would give one shard q and the other k and v, resharded in every block.
  The same holds for the rows of the output projection that takes [attention | MLP].
  The converters apply `from_parts` on import and `to_parts` on export.
  """
  sizes: tuple[int, ...]
  groups: int

  def __post_init__(self):
    if any(s % self.groups for s in self.sizes):
      raise ValueError(f"fused parts {self.sizes} do not split into {self.groups} head groups")

  def from_parts(self, x, axis: int = -1, xp=jnp):
    """Reference order (parts side by side along `axis`) → ours (interleaved by head group)."""
    x = xp.moveaxis(x, axis, -1)
    cuts = np.cumsum(self.sizes)[:-1]
    chunks = [p.reshape(*p.shape[:-1], self.groups, -1) for p in xp.split(x, cuts, axis=-1)]
    x = xp.concatenate(chunks, axis=-1)
    return xp.moveaxis(x.reshape(*x.shape[:-2], -1), -1, axis)

  def to_parts(self, x, axis: int = -1, xp=jnp):
    """Ours → reference order: the inverse of `from_parts`."""
    x = xp.moveaxis(x, axis, -1)
    x = x.reshape(*x.shape[:-1], self.groups, -1)
    cuts = np.cumsum([s // self.groups for s in self.sizes])[:-1]
    parts = [p.reshape(*p.shape[:-2], -1) for p in xp.split(x, cuts, axis=-1)]
    return xp.moveaxis(xp.concatenate(parts, axis=-1), -1, axis)

  def split(self, x: jax.Array) -> list[jax.Array]:
    """[..., sum(sizes)] → one [..., groups, size / groups] per part."""
    x = x.reshape(*x.shape[:-1], self.groups, -1)
    cuts = np.cumsum([s // self.groups for s in self.sizes])[:-1]
    return jnp.split(x, cuts, axis=-1)

  @staticmethod
  def join(parts: Sequence[jax.Array]) -> jax.Array:
    """The inverse of `split`: [..., groups, size_i / groups] parts → [..., sum(sizes)]."""
    x = jnp.concatenate(parts, axis=-1)
    return x.reshape(*x.shape[:-2], -1)

  def take(self, x: jax.Array, parts: Sequence[int]) -> jax.Array:
    """The columns (last axis) of `parts` only, still interleaved by group: what
    `Dense(cols=...)` computes, laid out as `subset(parts)`."""
    chunks = self.split(x)
    return self.join([chunks[i] for i in parts])

  def subset(self, parts: Sequence[int]) -> "FusedLayout":
    return FusedLayout(tuple(self.sizes[i] for i in parts), self.groups)


def to_heads(x: jax.Array, num_heads: int) -> jax.Array:
  """[..., groups, (heads per group)·D] (a part of `FusedLayout.split`) → [..., H, D]."""
  return x.reshape(*x.shape[:-2], num_heads, -1)


class LoRA(nnx.Module):
  """Low-rank update y += scale * (x A B + b), with upstream's bias b on B (`bias=False`: none).

  `init="zeros"` starts B and its bias at 0 (the model equals the base at step 0);
  `init="upstream"` uses PyTorch's default Linear init for A, B and B's bias, as
  upstream (the fine-tuned network then starts from a randomly perturbed base).
  """

  def __init__(self, in_features: int, out_features: int, rank: int, *, scale: float,
               init: str, out_axis: str | None, param_dtype, dtype, rngs: nnx.Rngs,
               bias: bool = True):
    r = min(rank, in_features, out_features)
    self.rank, self.scale, self.dtype = r, scale, dtype
    self.a = param(torch_uniform(rngs.params(), (in_features, r), in_features, param_dtype),
                   (None, None), nnx.LoRAParam)
    if init == "upstream":
      b = torch_uniform(rngs.params(), (r, out_features), r, param_dtype)
      b_bias = torch_uniform(rngs.params(), (out_features,), r, param_dtype)
    elif init == "zeros":
      b = jnp.zeros((r, out_features), param_dtype)
      b_bias = jnp.zeros((out_features,), param_dtype)
    else:
      raise ValueError(f"model.lora.init={init!r} is not allowed; choose 'zeros' or 'upstream'")
    self.b = param(b, (None, out_axis), nnx.LoRAParam)
    self.b_bias = param(b_bias, (out_axis,), nnx.LoRAParam) if bias else None

  def __call__(self, x: jax.Array, precision=None) -> jax.Array:
    """The float32 update scale·(x A B + b), added to the base output before its cast."""
    h = matmul(matmul(x, self.a[...], self.dtype, precision), self.b[...], self.dtype, precision)
    if self.b_bias is not None:
      h = h + self.b_bias[...].astype(jnp.float32)
    return self.scale * h


class Dense(nnx.Module):
  """Linear layer `y = x W (+ b)` with PyTorch's init, logical axes and an optional LoRA."""

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool, axes: Axes,
               dtype, param_dtype, rngs: nnx.Rngs, lora=None, lora_dtype=None, precision=None):
    self.in_features, self.out_features = in_features, out_features
    self.dtype, self.precision = dtype, precision
    self.kernel = param(torch_uniform(rngs.params(), (in_features, out_features), in_features,
                                      param_dtype), axes)
    self.bias = (param(torch_uniform(rngs.params(), (out_features,), in_features, param_dtype),
                       (axes[1],)) if use_bias else None)
    self.lora = (LoRA(in_features, out_features, lora.rank, scale=lora.scale, init=lora.init,
                      out_axis=axes[1], param_dtype=lora_dtype or param_dtype, dtype=dtype,
                      rngs=rngs, bias=lora.bias) if lora is not None else None)

  def __call__(self, x: jax.Array, cols: Callable[[jax.Array], jax.Array] | None = None
               ) -> jax.Array:
    """y = x W + b; `cols` computes only some outputs: it picks them from the last axis of the
    kernel and the bias (e.g. `FusedLayout.take`); no LoRA then."""
    kernel, bias = self.kernel[...], None if self.bias is None else self.bias[...]
    if cols is not None:
      assert self.lora is None, "column subsets of a LoRA layer are not supported"
      kernel, bias = cols(kernel), None if bias is None else cols(bias)
    y = matmul(x, kernel, self.dtype, self.precision)
    if bias is not None:
      y = y + bias.astype(jnp.float32)
    if self.lora is not None:
      y = y + self.lora(x, self.precision)
    return y.astype(self.dtype)


def merge_lora(model: nnx.Module, *, upstream: bool = False) -> nnx.Module:
  """Folds every LoRA into its base weights (W += s·A B, b += s·b_B) and drops it.

  The update is computed in float32 at full precision and added in float32, one rounding to
  the weights' dtype; `upstream=True` rounds the update to that dtype first and then adds it,
  as upstream's `_merge_lora_into_base` does (`W.add_(delta.to(W.dtype))`).
  Works on stacked (scanned) layers too: leading axes are batch axes of the product.
  Bias-free layers get a bias, as upstream's `_merge_lora_into_base` creates one (unless the
  LoRA has no bias either).
  """
  def add(w, delta):
    if upstream:
      delta = delta.astype(w.dtype)
    return (w.astype(jnp.float32) + delta.astype(jnp.float32)).astype(w.dtype)

  for _, module in nnx.iter_graph(model):
    if isinstance(module, Dense) and module.lora is not None:
      lora = module.lora
      a = lora.a[...].astype(jnp.float32)
      b = lora.b[...].astype(jnp.float32)
      delta = lora.scale * jnp.einsum("...ir,...ro->...io", a, b,
                                      precision=jax.lax.Precision.HIGHEST)
      kernel = module.kernel[...]
      module.kernel[...] = add(kernel, delta)
      if lora.b_bias is not None:
        b_bias = lora.scale * lora.b_bias[...].astype(jnp.float32)
        if module.bias is None:
          axes = module.kernel.get_metadata().get("out_sharding")
          module.bias = nnx.data(param(b_bias.astype(kernel.dtype),
                                       (axes[:-2] + axes[-1:]) if axes else None))
        else:
          module.bias[...] = add(module.bias[...], b_bias)
      module.lora = None
  return model


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """LayerNorm without affine parameters, in float32 (what autocast does); float32 out."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


class RMSNorm(nnx.Module):
  """FLUX QK-norm: x·rsqrt(mean(x²)+eps) in float32, cast back, times a learned scale."""

  def __init__(self, dim: int, *, param_dtype, eps: float = 1e-6):
    self.eps = eps
    self.scale = param(jnp.ones((dim,), param_dtype), (None,))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = (x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps))
    y = y.astype(x.dtype) * self.scale[...].astype(x.dtype)
    return y


class QKNorm(nnx.Module):
  def __init__(self, dim: int, *, param_dtype):
    self.query_norm = RMSNorm(dim, param_dtype=param_dtype)
    self.key_norm = RMSNorm(dim, param_dtype=param_dtype)

  def __call__(self, q, k, v):
    return self.query_norm(q).astype(v.dtype), self.key_norm(k).astype(v.dtype)


def timestep_embedding(t: jax.Array, dim: int = 256, *, max_period: float = 10000.0,
                       time_factor: float = 1000.0, upstream: bool = False) -> jax.Array:
  """Sinusoidal embedding of t·1000, cos first (BFL's `timestep_embedding`); float32 out.

  `upstream=True` reproduces upstream's bf16 inputs: t in bfloat16, the ×1000 in bfloat16, the
  embedding rounded to bfloat16.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  if upstream:
    s = (t.astype(jnp.bfloat16) * jnp.bfloat16(time_factor)).astype(jnp.float32)
  else:
    s = t.astype(jnp.float32) * time_factor
  args = s[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if upstream:
    emb = emb.astype(jnp.bfloat16).astype(jnp.float32)
  return emb


def rope_angles(ids: jax.Array, axes_dim: Sequence[int], theta: float, *,
                upstream: bool = False) -> jax.Array:
  """RoPE angles [B, L, head_dim/2] from positions [B, L, n_axes] (BFL's EmbedND).

  Each axis a contributes d_a/2 frequencies θ^(-2j/d_a), concatenated in axis order.
  `upstream=True` reproduces CoTIR's bfloat16 positions, frequency grid and angles.
  """
  parts = []
  for i, d in enumerate(axes_dim):
    pos = ids[..., i]
    if upstream:
      pos = pos.astype(jnp.bfloat16).astype(jnp.float32)
      scale = (jnp.arange(0, d, 2, dtype=jnp.float32) / d).astype(jnp.bfloat16).astype(jnp.float32)
      omega = (1.0 / theta ** scale).astype(jnp.bfloat16).astype(jnp.float32)
      angle = (pos[..., None] * omega).astype(jnp.bfloat16)
    else:
      omega = 1.0 / theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
      angle = pos.astype(jnp.float32)[..., None] * omega
    parts.append(angle)
  return jnp.concatenate(parts, axis=-1)


def rope_cos_sin(angles: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos/sin of the angles in float32; bfloat16 angles (upstream) round cos/sin to bfloat16."""
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  return cos.astype(jnp.float32), sin.astype(jnp.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates interleaved pairs (x[2j], x[2j+1]) of x [B, L, H, D] in float32, cast back."""
  xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  x0, x1 = xf[..., 0], xf[..., 1]
  c, s = cos[:, :, None, :], sin[:, :, None, :]
  out = jnp.stack([c * x0 - s * x1, s * x0 + c * x1], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, rope: tuple[jax.Array, jax.Array],
              implementation: kernels.AttentionSpec | str = "xla",
              q_rope: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
  """Full bidirectional attention with RoPE on q, k ([B, L, H, D]); returns [B, Lq, H·D].

  `implementation`: an `attention.AttentionSpec` or a `model.attention` name; scale 1/sqrt(D).

  `q_rope` gives the queries' own cos/sin when they are a subset of the keys' positions (the
  CoT adapter's text rows). q, k, v (after RoPE) and the output are named for remat policies
  and pinned batch-sharded / head-sharded.
  """
  cos, sin = rope
  qc, qs = q_rope or rope
  q, k, v = (checkpoint_name(constrain(x, HEADS), QKV)
             for x in (apply_rope(q, qc, qs), apply_rope(k, cos, sin), v))
  out = kernels.attend(q, k, v, implementation)
  return checkpoint_name(constrain(out.reshape(*out.shape[:2], -1), HIDDEN), ATTENTION_OUT)


def gelu_tanh(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=True)


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  return jax.nn.silu(gate) * up


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """(1 + scale)·LN(x) + shift with [B, H] modulation broadcast over tokens; float32 out."""
  return (1.0 + scale[:, None, :].astype(jnp.float32)) * layer_norm(x) + shift[:, None, :].astype(jnp.float32)


class Modulation(nnx.Module):
  """`lin(SiLU(vec))` chunked into 3 (single) or 6 (double) [B, H] vectors: (shift, scale, gate)…

  `lin`'s columns may be split over `tensor`; its small output is gathered whole (pinned
  unsharded) so that each chunk modulates the unsharded token stream without resharding it.
  """

  def __init__(self, dim: int, *, double: bool, use_bias: bool, dtype, param_dtype, rngs,
               lora=None, lora_dtype=None):
    self.parts = 6 if double else 3
    self.lin = Dense(dim, self.parts * dim, use_bias=use_bias, axes=("embed", "mlp"), dtype=dtype,
                     param_dtype=param_dtype, rngs=rngs, lora=lora, lora_dtype=lora_dtype)

  def __call__(self, vec: jax.Array) -> list[jax.Array]:
    return jnp.split(constrain(self.lin(jax.nn.silu(vec)), ("batch", None)), self.parts, axis=-1)


class MLPEmbedder(nnx.Module):
  """out_layer(SiLU(in_layer(x))): timestep, guidance and pooled-vector embedders."""

  def __init__(self, in_dim: int, hidden: int, *, use_bias: bool, dtype, param_dtype, rngs):
    self.in_layer = Dense(in_dim, hidden, use_bias=use_bias, axes=(None, "embed"), dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)
    self.out_layer = Dense(hidden, hidden, use_bias=use_bias, axes=("mlp", "embed"), dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x):
    return self.out_layer(jax.nn.silu(self.in_layer(x)))


class LastLayer(nnx.Module):
  """(shift, scale) = adaLN(SiLU(vec)) — shift first — then linear((1+scale)·LN(x)+shift)."""

  def __init__(self, hidden: int, out: int, *, use_bias: bool, dtype, param_dtype, rngs,
               lora=None, lora_dtype=None):
    self.adaLN_modulation = Dense(hidden, 2 * hidden, use_bias=use_bias, axes=("embed", "mlp"),
                                  dtype=dtype, param_dtype=param_dtype, rngs=rngs, lora=lora,
                                  lora_dtype=lora_dtype)
    self.linear = Dense(hidden, out, use_bias=use_bias, axes=("embed", "mlp"), dtype=dtype,
                        param_dtype=param_dtype, rngs=rngs, lora=lora, lora_dtype=lora_dtype)

  def __call__(self, x, vec):
    shift, scale = jnp.split(constrain(self.adaLN_modulation(jax.nn.silu(vec)), ("batch", None)),
                             2, axis=-1)
    return self.linear(modulate(x, shift, scale))


def stack_blocks(make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module:
  """Builds n identical blocks whose parameters are stacked on a leading `layers` axis.

  Why stacked: one traced block body is reused by `scan_blocks`, so compile time and the
  HLO size stay flat with depth (5–38 blocks here), remat applies per block, and the layer
  axis is a plain array axis for sharding rules and checkpoint conversion (layer i of the
  diffusers checkpoint is slice i).
  """
  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def build(r):
    return make(r)
  return build(rngs)


# Names of saveable intermediates (`jax.ad_checkpoint.checkpoint_name`) the policies refer to.
QKV, ATTENTION_OUT = "qkv", "attention_out"

_save = jax.checkpoint_policies.save_only_these_names


def _offload(*names):
  return jax.checkpoint_policies.save_and_offload_only_these_names(
      names_which_can_be_saved=[], names_which_can_be_offloaded=list(names),
      offload_src="device", offload_dst="pinned_host")


# What each block keeps for the backward pass (everything else is recomputed):
# full: only the block input; dots: every matmul output without batch dims; save_attention:
# the attention output (the costliest op to recompute; with the splash kernel also its
# residuals, so its forward kernel is not re-run); save_qkv_attention: also q, k, v after
# RoPE; offload_attention: the attention output moved to host memory (TPU / GPU only).
REMAT_POLICIES = {
    "none": None,
    "full": lambda: None,
    "dots": lambda: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention": lambda: _save(ATTENTION_OUT, kernels.RESIDUALS),
    "save_qkv_attention": lambda: _save(QKV, ATTENTION_OUT, kernels.RESIDUALS),
    "offload_attention": lambda: _offload(ATTENTION_OUT, kernels.RESIDUALS),
}


def scan_blocks(blocks: nnx.Module, carry, fn: Callable, *, remat: str = "none",
                scan: bool = True, axes=None):
  """Runs `carry = fn(block_i, carry)` over stacked blocks with `jax.lax.scan`.

  `remat` (a key of REMAT_POLICIES) rematerialises each block in the backward pass, so
  activation memory is one block's worth instead of depth × block. `scan=False` unrolls
  (same parameters, same result) for debugging and profiling. `axes`: logical activation names
  for the carry's leaves (a pytree prefix of it; None leaves a leaf alone) — the carry is pinned
  to them at every block boundary (`sharding.constrain`).
  """
  graphdef, state = nnx.split(blocks)
  pin = (lambda c: c) if axes is None else (lambda c: jax.tree.map(
      lambda names, x: x if names is None else constrain(x, names), axes, c,
      is_leaf=lambda n: n is None or (isinstance(n, tuple) and all(isinstance(a, (str, type(None)))
                                                                   for a in n))))

  def body(c, block_state):
    return pin(fn(nnx.merge(graphdef, block_state), c)), None

  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat policy {remat!r} is not one of {sorted(REMAT_POLICIES)}")
  if remat != "none":
    body = jax.checkpoint(body, policy=REMAT_POLICIES[remat](), prevent_cse=not scan)
  carry = pin(carry)
  if scan:
    carry, _ = jax.lax.scan(body, carry, state)
    return carry
  n = jax.tree.leaves(state)[0].shape[0]
  for i in range(n):
    carry, _ = body(carry, jax.tree.map(lambda x: x[i], state))
  return carry


def dtype_of(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]
