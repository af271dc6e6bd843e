"""CLIP text tower (FLUX.1-Kontext's pooled vector): transformers' `CLIPTextModel`.

Token + learned position embeddings, pre-LN causal transformer (quick-GELU MLP), final
LayerNorm; the pooled output is the final state at the end-of-text token, found by
transformers' rule: legacy configs with `eos_token_id == 2` take the argmax of the ids (the
EOT id is the largest in the original vocabulary), others the first position equal to
`eos_token_id`. Upstream passes no attention mask (the causal mask alone), the default here.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from cotir_jax.models import attention
from cotir_jax.models.layers import TOKENS, Dense, scan_blocks, stack_blocks
from cotir_jax.models.text.common import Embed, LayerNorm, activation, key_lengths


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  eos_token_id: int = 2
  model_type: str = "clip_text_model"

  @property
  def feature_dim(self) -> int:
    return self.hidden_size

  @classmethod
  def from_hf(cls, cfg: dict) -> "CLIPTextConfig":
    """From a transformers `config.json` dict of a `clip_text_model`."""
    return cls(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
               intermediate_size=cfg["intermediate_size"],
               num_hidden_layers=cfg["num_hidden_layers"],
               num_attention_heads=cfg["num_attention_heads"],
               max_position_embeddings=cfg.get("max_position_embeddings", 77),
               layer_norm_eps=cfg.get("layer_norm_eps", 1e-5),
               hidden_act=cfg.get("hidden_act", "quick_gelu"),
               eos_token_id=cfg.get("eos_token_id", 2))


def clip_config(size: str = "l") -> CLIPTextConfig:
  """Architectures: "l" (openai/clip-vit-large-patch14 text tower, FLUX.1), "tiny" (tests/demo).

  The tiny one uses the legacy eos rule too (argmax of ids): the tiny CLIP tokenizer gives
  its end-of-text token the largest id, as the real one does.
  """
  if size == "l":
    return CLIPTextConfig()
  if size == "tiny":
    return CLIPTextConfig(vocab_size=1024, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4)
  raise ValueError(f"unknown clip size {size!r}; choose 'l' or 'tiny'")


class CLIPAttention(nnx.Module):
  def __init__(self, cfg: CLIPTextConfig, *, dtype, param_dtype, rngs, implementation):
    d = cfg.hidden_size
    self.heads, self.head_dim = cfg.num_attention_heads, d // cfg.num_attention_heads
    self.implementation = implementation
    kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = Dense(d, d, axes=("embed", "heads"), **kw)
    self.k_proj = Dense(d, d, axes=("embed", "heads"), **kw)
    self.v_proj = Dense(d, d, axes=("embed", "heads"), **kw)
    self.out_proj = Dense(d, d, axes=("heads", "embed"), **kw)

  def __call__(self, x, lengths):
    b, l, _ = x.shape
    q, k, v = (p(x).reshape(b, l, self.heads, self.head_dim)
               for p in (self.q_proj, self.k_proj, self.v_proj))
    a = attention.attend(q, k, v, self.implementation, causal=True, kv_lengths=lengths)
    return self.out_proj(a.reshape(b, l, -1))


class CLIPMLP(nnx.Module):
  def __init__(self, cfg: CLIPTextConfig, *, dtype, param_dtype, rngs):
    kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = Dense(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
    self.fc2 = Dense(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), **kw)
    self.act = activation(cfg.hidden_act)

  def __call__(self, x):
    return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
  def __init__(self, cfg: CLIPTextConfig, *, dtype, param_dtype, rngs, implementation):
    kw = dict(eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
    self.layer_norm1 = LayerNorm(cfg.hidden_size, **kw)
    self.self_attn = CLIPAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                   implementation=implementation)
    self.layer_norm2 = LayerNorm(cfg.hidden_size, **kw)
    self.mlp = CLIPMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, lengths):
    x = x + self.self_attn(self.layer_norm1(x), lengths)
    return x + self.mlp(self.layer_norm2(x))


class CLIPTextEncoder(nnx.Module):
  """`CLIPTextModel`: ids [B, L ≤ max_pos] → pooled [B, d] (and last_hidden_state [B, L, d])."""

  def __init__(self, cfg: CLIPTextConfig, *, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
               rngs: nnx.Rngs, implementation: attention.AttentionSpec | str = "xla",
               scan: bool = True):
    self.cfg, self.dtype, self.scan = cfg, dtype, scan
    d = cfg.hidden_size
    self.token_embedding = Embed(cfg.vocab_size, d, axes=("vocab", "embed"), dtype=dtype,
                                 param_dtype=param_dtype, rngs=rngs)
    self.position_embedding = Embed(cfg.max_position_embeddings, d, axes=(None, "embed"),
                                    dtype=dtype, param_dtype=param_dtype, rngs=rngs, std=0.01)
    self.layers = stack_blocks(
        lambda r: CLIPEncoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r,
                                   implementation=implementation), cfg.num_hidden_layers, rngs)
    self.final_layer_norm = LayerNorm(d, eps=cfg.layer_norm_eps, dtype=dtype,
                                      param_dtype=param_dtype)

  def pool_positions(self, ids: jax.Array) -> jax.Array:
    """Index of the end-of-text token per row (transformers' rule, see the module docstring)."""
    if self.cfg.eos_token_id == 2:
      return jnp.argmax(ids, axis=-1)
    return jnp.argmax((ids == self.cfg.eos_token_id).astype(jnp.int32), axis=-1)

  def __call__(self, ids: jax.Array, mask: jax.Array | None = None, *,
               return_hidden: bool = False):
    b, l = ids.shape
    if l > self.cfg.max_position_embeddings:
      raise ValueError(f"CLIP sequence length {l} exceeds max_position_embeddings "
                       f"{self.cfg.max_position_embeddings}")
    pos = self.position_embedding.embedding[...][:l].astype(self.dtype)
    x = self.token_embedding(ids) + pos[None]
    lengths = key_lengths(mask)
    x = scan_blocks(self.layers, x, lambda layer, h: layer(h, lengths), scan=self.scan,
                    axes=TOKENS)
    x = self.final_layer_norm(x)
    pooled = jnp.take_along_axis(x, self.pool_positions(ids)[:, None, None], axis=1)[:, 0]
    return (pooled, x) if return_hidden else pooled
