"""Pieces shared by the frozen text encoders (Qwen3, T5, CLIP).

Same conventions as `models/layers.py`: matmuls in the compute dtype with float32
accumulation, norms and softmax in float32, parameters with logical axis names
(`vocab`, `embed`, `heads` (query heads × head_dim), `kv` (key/value heads × head_dim),
`mlp`, and `layers` added by `stack_blocks`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from cotir_jax.models.layers import param

_NEG = float(jnp.finfo(jnp.float32).min)


class Embed(nnx.Module):
  """Token (or position) table `[num, dim]`; lookups come out in the compute dtype."""

  def __init__(self, num: int, dim: int, *, axes, dtype, param_dtype, rngs: nnx.Rngs,
               std: float = 0.02):
    self.dtype = dtype
    self.embedding = param((std * jax.random.normal(rngs.params(), (num, dim), jnp.float32))
                           .astype(param_dtype), axes)

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


class LayerNorm(nnx.Module):
  """Affine LayerNorm (CLIP) computed in float32, cast to the compute dtype."""

  def __init__(self, dim: int, *, eps: float, dtype, param_dtype):
    self.eps, self.dtype = eps, dtype
    self.scale = param(jnp.ones((dim,), param_dtype), (None,))
    self.bias = param(jnp.zeros((dim,), param_dtype), (None,))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


def gelu_tanh(x):  # transformers' gelu_new / gelu_pytorch_tanh
  return jax.nn.gelu(x, approximate=True)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
}


def activation(name: str):
  """The transformers `ACT2FN` entry of that name; unknown names are a config error."""
  if name not in ACTIVATIONS:
    raise ValueError(f"unsupported activation {name!r}; known: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, dtype,
           bias: jax.Array | None = None, mask: jax.Array | None = None,
           implementation: str = "xla") -> jax.Array:
  """Softmax attention over q [B, L, H, D], k/v [B, S, K, D] (K divides H: grouped queries).

  `bias` [1|B, H, L, S] is added to the scaled logits (T5's relative positions); `mask`
  [B|1, 1, L, S] (bool, True = attend) removes keys. Logits and softmax are float32, the
  probabilities are cast to the compute dtype before the value matmul (as transformers does).
  `implementation`: "xla" is the einsum path here; anything else goes to
  `jax.nn.dot_product_attention` (None: its XLA path, "cudnn": the fused GPU kernel).
  Returns [B, L, H·D] in `dtype`.
  """
  b, l, h, d = q.shape
  kv = k.shape[2]
  if implementation != "xla":
    out = jax.nn.dot_product_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype),
                                       bias=bias, mask=mask, scale=scale,
                                       implementation=implementation)
    return out.reshape(b, l, h * d).astype(dtype)
  qg = q.astype(dtype).reshape(b, l, kv, h // kv, d)
  logits = jnp.einsum("blkgd,bskd->bkgls", qg, k.astype(dtype),
                      preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + bias.astype(jnp.float32).reshape(bias.shape[0], kv, h // kv, l, -1)
  if mask is not None:
    logits = jnp.where(mask[:, :, None], logits, _NEG)
  probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
  out = jnp.einsum("bkgls,bskd->blkgd", probs, v.astype(dtype), preferred_element_type=jnp.float32)
  return out.reshape(b, l, h * d).astype(dtype)


def causal_mask(length: int) -> jax.Array:
  """[1, 1, L, L] lower-triangular boolean mask (query i sees keys ≤ i)."""
  return jnp.tril(jnp.ones((length, length), jnp.bool_))[None, None]


def padding_mask(mask: jax.Array | None) -> jax.Array | None:
  """[B, S] 0/1 attention mask → [B, 1, 1, S] boolean key mask (None stays None)."""
  if mask is None:
    return None
  return (mask != 0)[:, None, None, :]


def combine_masks(*masks):
  out = None
  for m in masks:
    if m is not None:
      out = m if out is None else jnp.logical_and(out, m)
  return out


def inv_sqrt(d: int) -> float:
  return 1.0 / math.sqrt(d)
