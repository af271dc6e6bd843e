"""Pieces shared by the frozen text encoders (Qwen3, T5, CLIP).

Same conventions as `models/layers.py`: matmuls in the compute dtype with float32
accumulation, norms and softmax in float32, parameters with logical axis names
(`vocab`, `embed`, `heads` (query heads × head_dim), `kv` (key/value heads × head_dim),
`mlp`, and `layers` added by `stack_blocks`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cotir_jax.models.layers import gelu_tanh, param


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


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu_new": gelu_tanh,            # transformers' names of the tanh approximation
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


def key_lengths(mask: jax.Array | None) -> jax.Array | None:
  """[B, S] 0/1 attention mask of right-padded tokens → [B] lengths, what the attention kernels
  take (`attention.attend`'s `kv_lengths`); None stays None."""
  return None if mask is None else jnp.sum(mask != 0, axis=-1, dtype=jnp.int32)
