"""T5 v1.1 encoder (FLUX.1-Kontext's text_encoder_2): transformers' `T5EncoderModel`.

Pre-norm blocks with T5's RMS layer norm (no mean, no bias, float32 statistics), unscaled
dot-product attention plus a bidirectional relative-position bias that layer 0 owns and
every layer reuses, gated-GELU (tanh) feed-forward, final norm. Upstream calls it without an
attention mask (padding is attended), so `mask=None` is the default.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cotir_jax.models import attention
from cotir_jax.models.layers import TOKENS, Dense, RMSNorm, param, scan_blocks, stack_blocks
from cotir_jax.models.text.common import Embed, activation, key_lengths


@dataclasses.dataclass(frozen=True)
class T5Config:
  vocab_size: int = 32128
  d_model: int = 4096
  d_kv: int = 64
  num_heads: int = 64
  d_ff: int = 10240
  num_layers: int = 24
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  dense_act_fn: str = "gelu_new"
  model_type: str = "t5"

  @property
  def feature_dim(self) -> int:
    return self.d_model

  @classmethod
  def from_hf(cls, cfg: dict) -> "T5Config":
    """From a transformers `config.json` dict; only gated feed-forwards (T5 v1.1) are supported."""
    proj = cfg.get("feed_forward_proj", "relu")
    parts = proj.split("-")
    if len(parts) != 2 or parts[0] != "gated":
      raise ValueError(f"t5 feed_forward_proj {proj!r} is not supported (only gated, T5 v1.1)")
    act = "gelu_new" if parts[1] == "gelu" else parts[1]
    return cls(vocab_size=cfg["vocab_size"], d_model=cfg["d_model"], d_kv=cfg["d_kv"],
               num_heads=cfg["num_heads"], d_ff=cfg["d_ff"], num_layers=cfg["num_layers"],
               relative_attention_num_buckets=cfg.get("relative_attention_num_buckets", 32),
               relative_attention_max_distance=cfg.get("relative_attention_max_distance", 128),
               layer_norm_epsilon=cfg.get("layer_norm_epsilon", 1e-6), dense_act_fn=act)


def t5_config(size: str = "xxl") -> T5Config:
  """Architectures: "xxl" (google/t5-v1_1-xxl encoder, FLUX.1), "tiny" (tests/demo)."""
  if size == "xxl":
    return T5Config()
  if size == "tiny":
    return T5Config(vocab_size=1024, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2)
  raise ValueError(f"unknown t5 size {size!r}; choose 'xxl' or 'tiny'")


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int,
                              max_distance: int) -> np.ndarray:
  """transformers' bidirectional `_relative_position_bucket` for (memory − context), [L, S].

  Computed on the host in numpy (shapes are static), with float32 logs as torch does.
  """
  rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
  nb = num_buckets // 2
  buckets = (rel > 0).astype(np.int64) * nb
  rel = np.abs(rel)
  max_exact = nb // 2
  is_small = rel < max_exact
  with np.errstate(divide="ignore"):
    large = max_exact + (np.log(rel.astype(np.float32) / np.float32(max_exact))
                         / np.float32(math.log(max_distance / max_exact))
                         * np.float32(nb - max_exact))
  large = np.where(is_small, 0, large).astype(np.int64)
  large = np.minimum(large, nb - 1)
  return (buckets + np.where(is_small, rel, large)).astype(np.int32)


class T5Attention(nnx.Module):
  def __init__(self, cfg: T5Config, *, dtype, param_dtype, rngs, implementation):
    inner = cfg.num_heads * cfg.d_kv
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.heads, self.d_kv, self.implementation = cfg.num_heads, cfg.d_kv, implementation
    self.q = Dense(cfg.d_model, inner, axes=("embed", "heads"), **kw)
    self.k = Dense(cfg.d_model, inner, axes=("embed", "heads"), **kw)
    self.v = Dense(cfg.d_model, inner, axes=("embed", "heads"), **kw)
    self.o = Dense(inner, cfg.d_model, axes=("heads", "embed"), **kw)

  def __call__(self, x, bias, lengths):
    b, l, _ = x.shape
    q, k, v = (p(x).reshape(b, l, self.heads, self.d_kv) for p in (self.q, self.k, self.v))
    a = attention.attend(q, k, v, self.implementation, scale=1.0, bias=bias, kv_lengths=lengths)
    return self.o(a.reshape(b, l, -1))


class T5FeedForward(nnx.Module):
  def __init__(self, cfg: T5Config, *, dtype, param_dtype, rngs):
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.wi_0 = Dense(cfg.d_model, cfg.d_ff, axes=("embed", "mlp"), **kw)
    self.wi_1 = Dense(cfg.d_model, cfg.d_ff, axes=("embed", "mlp"), **kw)
    self.wo = Dense(cfg.d_ff, cfg.d_model, axes=("mlp", "embed"), **kw)
    self.act = activation(cfg.dense_act_fn)

  def __call__(self, x):
    return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))


class T5Block(nnx.Module):
  def __init__(self, cfg: T5Config, *, dtype, param_dtype, rngs, implementation):
    eps = cfg.layer_norm_epsilon
    self.attn_norm = RMSNorm(cfg.d_model, param_dtype=param_dtype, eps=eps)
    self.attn = T5Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                            implementation=implementation)
    self.ff_norm = RMSNorm(cfg.d_model, param_dtype=param_dtype, eps=eps)
    self.ff = T5FeedForward(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, bias, lengths):
    x = x + self.attn(self.attn_norm(x), bias, lengths)
    return x + self.ff(self.ff_norm(x))


class T5Encoder(nnx.Module):
  """`T5EncoderModel`: ids [B, L] (mask optional) → last_hidden_state [B, L, d_model]."""

  def __init__(self, cfg: T5Config, *, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
               rngs: nnx.Rngs, implementation: attention.AttentionSpec | str = "xla",
               scan: bool = True):
    self.cfg, self.dtype, self.scan = cfg, dtype, scan
    self.shared = Embed(cfg.vocab_size, cfg.d_model, axes=("vocab", "embed"), dtype=dtype,
                        param_dtype=param_dtype, rngs=rngs, std=1.0)
    # layer 0's table in transformers, shared by all layers: [buckets, heads]
    self.relative_attention_bias = param(
        jax.random.normal(rngs.params(), (cfg.relative_attention_num_buckets, cfg.num_heads),
                          jnp.float32).astype(param_dtype), (None, None))
    self.blocks = stack_blocks(
        lambda r: T5Block(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r,
                          implementation=implementation), cfg.num_layers, rngs)
    self.final_layer_norm = RMSNorm(cfg.d_model, param_dtype=param_dtype,
                                    eps=cfg.layer_norm_epsilon)

  def position_bias(self, length: int) -> jax.Array:
    """[1, H, L, L] relative-position bias in float32 (transformers keeps it in param dtype)."""
    cfg = self.cfg
    buckets = relative_position_buckets(length, length, cfg.relative_attention_num_buckets,
                                        cfg.relative_attention_max_distance)
    values = jnp.take(self.relative_attention_bias[...].astype(jnp.float32),
                      jnp.asarray(buckets), axis=0)            # [L, L, H]
    return jnp.transpose(values, (2, 0, 1))[None]

  def __call__(self, ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    x = self.shared(ids)
    bias = self.position_bias(ids.shape[1])
    lengths = key_lengths(mask)
    x = scan_blocks(self.blocks, x, lambda blk, h: blk(h, bias, lengths), scan=self.scan,
                    axes=TOKENS)
    return self.final_layer_norm(x)
