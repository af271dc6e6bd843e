"""Qwen3 as a frozen text embedder (FLUX.2-klein): transformers' `Qwen3Model`.

Returns the per-token concatenation of hidden states at `hidden_layers` (transformers'
`output_hidden_states` indexing: 0 = embedding output, k = output of decoder layer k, before
the final norm) → [B, L, len(hidden_layers)·d]. Only decoder layers 1..max(hidden_layers)
are built and run (27 of 36 for the upstream (9, 18, 27)); the final norm and the LM head are
never needed, so they are not parameters here. For k == num_hidden_layers transformers
reports the *normed* state; we always return the pre-norm output of layer k.

RoPE angles, cos/sin and the rotation run in float32 (transformers rounds cos/sin to the
activation dtype first; a bfloat16-only difference).

The layers are stacked (`stack_blocks`) and run with one `lax.scan`; the wanted hidden states
are collected in the scan carry by writing each layer's output into a slot buffer (layers
that are not wanted write into a spare slot), so no [depth, B, L, d] stack is materialised.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cotir_jax.models import attention
from cotir_jax.models.layers import TOKENS, Dense, RMSNorm, scan_blocks, stack_blocks
from cotir_jax.models.text.common import Embed, activation, key_lengths


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
  vocab_size: int = 151936
  hidden_size: int = 2560
  intermediate_size: int = 9728
  num_hidden_layers: int = 36
  num_attention_heads: int = 32
  num_key_value_heads: int = 8
  head_dim: int = 128
  rope_theta: float = 1_000_000.0
  rms_norm_eps: float = 1e-6
  attention_bias: bool = False
  hidden_act: str = "silu"
  hidden_layers: tuple[int, ...] = (9, 18, 27)
  model_type: str = "qwen3"

  def __post_init__(self):
    object.__setattr__(self, "hidden_layers", tuple(int(i) for i in self.hidden_layers))
    if not self.hidden_layers:
      raise ValueError("qwen3 hidden_layers must name at least one hidden state")
    bad = [i for i in self.hidden_layers if not 0 <= i <= self.num_hidden_layers]
    if bad:
      raise ValueError(f"qwen3 hidden_layers {bad} outside 0..{self.num_hidden_layers} "
                       "(0 = embeddings, k = output of decoder layer k)")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError("qwen3 num_attention_heads must be a multiple of num_key_value_heads")

  @property
  def num_layers_built(self) -> int:
    """Decoder layers actually built and run: the deepest requested hidden state."""
    return max(self.hidden_layers)

  @property
  def feature_dim(self) -> int:
    return len(self.hidden_layers) * self.hidden_size

  @classmethod
  def from_hf(cls, cfg: dict, hidden_layers=(9, 18, 27)) -> "Qwen3Config":
    """From a transformers `config.json` dict (rope_theta top-level or in rope_parameters)."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
      raise ValueError(f"qwen3 rope_type {rope_type!r} is not supported (only 'default')")
    if cfg.get("use_sliding_window") or "sliding_attention" in (cfg.get("layer_types") or ()):
      raise ValueError("qwen3 sliding-window attention is not supported")
    heads = cfg["num_attention_heads"]
    return cls(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
               intermediate_size=cfg["intermediate_size"],
               num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=heads,
               num_key_value_heads=cfg.get("num_key_value_heads") or heads,
               head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
               rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
               rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
               attention_bias=bool(cfg.get("attention_bias", False)),
               hidden_act=cfg.get("hidden_act", "silu"), hidden_layers=tuple(hidden_layers))


def qwen3_config(size: str = "4b", hidden_layers=(9, 18, 27)) -> Qwen3Config:
  """Architectures: "4b" (FLUX.2-klein-4B's encoder), "8b" (klein-9B's), "tiny" (tests/demo)."""
  if size == "4b":
    return Qwen3Config(hidden_layers=hidden_layers)
  if size == "8b":
    return Qwen3Config(hidden_size=4096, intermediate_size=12288, hidden_layers=hidden_layers)
  if size == "tiny":
    hl = (1, 2, 3) if tuple(hidden_layers) == (9, 18, 27) else hidden_layers
    return Qwen3Config(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                       hidden_layers=hl)
  raise ValueError(f"unknown qwen3 size {size!r}; choose '4b', '8b' or 'tiny'")


def _rope_cos_sin(length: int, head_dim: int, theta: float):
  """transformers' default RoPE: inv_freq θ^(-2j/D), angles duplicated over both halves."""
  inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  ang = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None]
  ang = jnp.concatenate([ang, ang], axis=-1)
  return jnp.cos(ang)[None, :, None, :], jnp.sin(ang)[None, :, None, :]


def _apply_rope(x, cos, sin):
  """x·cos + rotate_half(x)·sin in float32 (rotate_half = cat(-x2, x1)); cast back."""
  xf = x.astype(jnp.float32)
  x1, x2 = jnp.split(xf, 2, axis=-1)
  return (xf * cos + jnp.concatenate([-x2, x1], axis=-1) * sin).astype(x.dtype)


class Qwen3Attention(nnx.Module):
  def __init__(self, cfg: Qwen3Config, *, dtype, param_dtype, rngs, implementation):
    d, hd = cfg.hidden_size, cfg.head_dim
    self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
    self.implementation = implementation
    kw = dict(use_bias=cfg.attention_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = Dense(d, self.heads * hd, axes=("embed", "heads"), **kw)
    self.k_proj = Dense(d, self.kv_heads * hd, axes=("embed", "kv"), **kw)
    self.v_proj = Dense(d, self.kv_heads * hd, axes=("embed", "kv"), **kw)
    self.o_proj = Dense(self.heads * hd, d, axes=("heads", "embed"), **kw)
    self.q_norm = RMSNorm(hd, param_dtype=param_dtype, eps=cfg.rms_norm_eps)
    self.k_norm = RMSNorm(hd, param_dtype=param_dtype, eps=cfg.rms_norm_eps)

  def __call__(self, x, cos, sin, lengths):
    b, l, _ = x.shape
    q = self.q_norm(self.q_proj(x).reshape(b, l, self.heads, self.head_dim))
    k = self.k_norm(self.k_proj(x).reshape(b, l, self.kv_heads, self.head_dim))
    v = self.v_proj(x).reshape(b, l, self.kv_heads, self.head_dim)
    q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
    a = attention.attend(q, k, v, self.implementation, causal=True, kv_lengths=lengths)
    return self.o_proj(a.reshape(b, l, -1))


class Qwen3MLP(nnx.Module):
  def __init__(self, cfg: Qwen3Config, *, dtype, param_dtype, rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = Dense(d, f, axes=("embed", "mlp"), **kw)
    self.up_proj = Dense(d, f, axes=("embed", "mlp"), **kw)
    self.down_proj = Dense(f, d, axes=("mlp", "embed"), **kw)
    self.act = activation(cfg.hidden_act)

  def __call__(self, x):
    return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Qwen3DecoderLayer(nnx.Module):
  def __init__(self, cfg: Qwen3Config, *, dtype, param_dtype, rngs, implementation):
    self.input_layernorm = RMSNorm(cfg.hidden_size, param_dtype=param_dtype, eps=cfg.rms_norm_eps)
    self.self_attn = Qwen3Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                    implementation=implementation)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, param_dtype=param_dtype,
                                            eps=cfg.rms_norm_eps)
    self.mlp = Qwen3MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, cos, sin, lengths):
    x = x + self.self_attn(self.input_layernorm(x), cos, sin, lengths)
    return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Embedder(nnx.Module):
  """`Qwen3Model` truncated to the deepest wanted hidden state; returns [B, L, n·d] features."""

  def __init__(self, cfg: Qwen3Config, *, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
               rngs: nnx.Rngs, implementation: attention.AttentionSpec | str = "xla",
               scan: bool = True):
    self.cfg, self.dtype, self.scan = cfg, dtype, scan
    self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, axes=("vocab", "embed"),
                              dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.layers = stack_blocks(
        lambda r: Qwen3DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r,
                                    implementation=implementation),
        cfg.num_layers_built, rngs)

  def __call__(self, ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """ids [B, L] int, mask [B, L] (1 = token, 0 = right padding; None = all tokens)."""
    cfg = self.cfg
    b, l = ids.shape
    wanted = sorted(set(cfg.hidden_layers))
    n_slots = len(wanted)
    # slot_of[k] = buffer slot of hidden state k; unwanted states go to the spare slot n_slots
    slot_of = np.full(cfg.num_layers_built + 1, n_slots, np.int32)
    slot_of[wanted] = np.arange(n_slots, dtype=np.int32)
    slot_of = jnp.asarray(slot_of)

    h = self.embed_tokens(ids)
    cos, sin = _rope_cos_sin(l, cfg.head_dim, cfg.rope_theta)
    lengths = key_lengths(mask)
    buf = jnp.zeros((n_slots + 1, b, l, cfg.hidden_size), self.dtype)
    buf = jax.lax.dynamic_update_index_in_dim(buf, h, slot_of[0], 0)

    def body(layer, carry):
      x, buf, i = carry
      x = layer(x, cos, sin, lengths)
      buf = jax.lax.dynamic_update_index_in_dim(buf, x, slot_of[i + 1], 0)
      return x, buf, i + 1

    _, buf, _ = scan_blocks(self.layers, (h, buf, jnp.int32(0)), body, scan=self.scan,
                            axes=(TOKENS, (None,) + TOKENS, None))
    order = jnp.asarray([wanted.index(k) for k in cfg.hidden_layers])
    feats = buf[order]                                  # [n, B, L, d]
    return jnp.transpose(feats, (1, 2, 0, 3)).reshape(b, l, -1)
