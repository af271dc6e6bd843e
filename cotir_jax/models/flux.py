"""The FLUX.2-klein and FLUX.1-Kontext transformers as one NNX module.

The two families share the double-stream / single-stream structure and differ in four
places, each a branch on `spec.family` here: FLUX.2 has no biases, SwiGLU MLPs and three
modulations shared by all blocks; FLUX.1 has biases, GELU-tanh MLPs, a modulation per block,
and guidance and pooled-vector embedders. Parameter names follow BFL's (and so upstream
CoTIR's `lora.pt`): `double_blocks`, `single_blocks.linear1`, `final_layer.adaLN_modulation`…

Blocks are stacked on a `layers` axis and run by `scan_blocks` (see `layers.stack_blocks`).
The forward is split into stages (`embed`, `run_double`, `run_single`, `project_out`) so
that `CoTIR` can insert the CoT adapter between the double and the single blocks.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from cotir_jax.models.layers import (FUSED, HIDDEN, TOKENS, Dense, FusedLayout, LastLayer,
                                     MLPEmbedder, Modulation, QKNorm, attention, gelu_tanh,
                                     modulate, rope_angles, rope_cos_sin, scan_blocks, stack_blocks,
                                     swiglu, timestep_embedding, to_heads)
from cotir_jax.sharding import constrain
from cotir_jax.models.spec import ModelSpec


def _dense(spec: ModelSpec, rngs, i, o, axes, lora=False, **kw):
  return Dense(i, o, use_bias=spec.use_bias, axes=axes, dtype=spec.dtype,
               param_dtype=spec.param_dtype, rngs=rngs,
               lora=spec.lora if lora else None, lora_dtype=spec.trainable_dtype, **kw)


def mlp_act(parts: list[jax.Array]) -> jax.Array:
  """The MLP activation of the split MLP input: SwiGLU of (gate, up) or GELU-tanh of one part."""
  return swiglu(*parts) if len(parts) == 2 else gelu_tanh(parts[0])


class SelfAttention(nnx.Module):
  """qkv (columns head-major, `spec.qkv_layout`) → per-head QK-norm; proj takes [B, L, H·D]."""

  def __init__(self, spec: ModelSpec, rngs):
    h = spec.hidden_size
    self.layout, self.num_heads = spec.qkv_layout, spec.num_heads
    self.qkv = _dense(spec, rngs, h, 3 * h, ("embed", "heads"))
    self.norm = QKNorm(spec.head_dim, param_dtype=spec.param_dtype)
    self.proj = _dense(spec, rngs, h, h, ("heads", "embed"))

  def __call__(self, x):
    """q, k (normed), v [B, L, H, D] of the modulated tokens x."""
    q, k, v = (to_heads(t, self.num_heads)
               for t in self.layout.split(constrain(self.qkv(x), FUSED)))
    q, k = self.norm(q, k, v)
    return q, k, v


class MLP(nnx.Module):
  """FLUX.2: fc1 → SwiGLU → fc2; FLUX.1: fc1 → GELU-tanh → fc2. fc1's columns follow
  `spec.mlp_in_layout` (gate and up interleaved by head group), fc2's rows the MLP width."""

  def __init__(self, spec: ModelSpec, rngs):
    self.layout = spec.mlp_in_layout
    self.fc1 = _dense(spec, rngs, spec.hidden_size, sum(self.layout.sizes), ("embed", "mlp"))
    self.fc2 = _dense(spec, rngs, spec.mlp_hidden, spec.hidden_size, ("mlp", "embed"))

  def __call__(self, x):
    m = mlp_act(self.layout.split(constrain(self.fc1(x), HIDDEN)))
    return self.fc2(m.reshape(*m.shape[:-2], -1))


class DoubleStreamBlock(nnx.Module):
  """Separate img / txt weights, joint attention over [txt; img]."""

  def __init__(self, spec: ModelSpec, rngs):
    self.num_heads, self.attention = spec.num_heads, spec.attention
    if spec.family == "flux1":
      mod = dict(double=True, use_bias=True, dtype=spec.dtype, param_dtype=spec.param_dtype, rngs=rngs)
      self.img_mod = Modulation(spec.hidden_size, **mod)
      self.txt_mod = Modulation(spec.hidden_size, **mod)
    else:
      self.img_mod = self.txt_mod = None
    self.img_attn = SelfAttention(spec, rngs)
    self.img_mlp = MLP(spec, rngs)
    self.txt_attn = SelfAttention(spec, rngs)
    self.txt_mlp = MLP(spec, rngs)

  def __call__(self, img, txt, vec, mod_img, mod_txt, rope):
    if self.img_mod is not None:
      mod_img, mod_txt = self.img_mod(vec), self.txt_mod(vec)
    qkv = [attn(modulate(x, sh, sc))
           for x, attn, (sh, sc, _, _, _, _) in ((txt, self.txt_attn, mod_txt),
                                                 (img, self.img_attn, mod_img))]
    q, k, v = (jnp.concatenate(t, axis=1) for t in zip(*qkv))
    a = attention(q, k, v, rope, self.attention)
    n_txt = txt.shape[1]
    out = []
    for x, a_s, attn, mlp, (_, _, g1, sh2, sc2, g2) in (
        (txt, a[:, :n_txt], self.txt_attn, self.txt_mlp, mod_txt),
        (img, a[:, n_txt:], self.img_attn, self.img_mlp, mod_img)):
      x = x + g1[:, None] * attn.proj(a_s)
      x = x + g2[:, None] * mlp(modulate(x, sh2, sc2))
      out.append(x)
    txt, img = out
    return img, txt


class SingleStreamBlock(nnx.Module):
  """Parallel attention + MLP over [txt; img]: linear1 = [qkv | mlp-in], linear2 = [proj | mlp-out],
  both interleaved by head group (`spec.linear1_layout`, `spec.linear2_layout`)."""

  def __init__(self, spec: ModelSpec, rngs):
    h = spec.hidden_size
    self.num_heads, self.attention = spec.num_heads, spec.attention
    self.layout = spec.linear1_layout
    self.linear1 = _dense(spec, rngs, h, sum(self.layout.sizes), ("embed", "heads"), lora=True)
    self.linear2 = _dense(spec, rngs, sum(spec.linear2_layout.sizes), h, ("heads", "embed"),
                          lora=True)
    self.norm = QKNorm(spec.head_dim, param_dtype=spec.param_dtype)
    self.modulation = (Modulation(h, double=False, use_bias=True, dtype=spec.dtype,
                                  param_dtype=spec.param_dtype, rngs=rngs, lora=spec.lora,
                                  lora_dtype=spec.trainable_dtype)
                       if spec.family == "flux1" else None)

  def __call__(self, x, vec, mod, rope):
    sh, sc, g = self.modulation(vec) if self.modulation is not None else mod
    q, k, v, *m = self.layout.split(constrain(self.linear1(modulate(x, sh, sc)), FUSED))
    q, k, v = (to_heads(t, self.num_heads) for t in (q, k, v))
    q, k = self.norm(q, k, v)
    a = attention(q, k, v, rope, self.attention)
    a = a.reshape(*a.shape[:-1], self.layout.groups, -1)
    return x + g[:, None] * self.linear2(FusedLayout.join([a, mlp_act(m)]))


@dataclasses.dataclass
class Streams:
  """The state passed between forward stages."""
  img: jax.Array
  txt: jax.Array
  vec: jax.Array
  rope: tuple[jax.Array, jax.Array]  # cos, sin over [txt; img]: [B, L_txt + N_img, head_dim/2]
  mods: tuple                        # FLUX.2 shared modulations; () for FLUX.1


class FluxTransformer(nnx.Module):
  """FLUX.2-klein (family "flux2") or FLUX.1-Kontext (family "flux1") DiT returning velocity."""

  def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
    self.spec = spec
    h, bias = spec.hidden_size, spec.use_bias
    emb = dict(use_bias=bias, dtype=spec.dtype, param_dtype=spec.param_dtype, rngs=rngs)
    self.img_in = _dense(spec, rngs, spec.in_channels, h, (None, "embed"))
    self.txt_in = _dense(spec, rngs, spec.context_in_dim, h, (None, "embed"))
    self.time_in = MLPEmbedder(256, h, **emb)
    self.guidance_in = MLPEmbedder(256, h, **emb) if spec.guidance_embed else None
    self.vector_in = MLPEmbedder(spec.vec_in_dim, h, **emb) if spec.family == "flux1" else None
    if spec.family == "flux2":
      mod = dict(use_bias=False, dtype=spec.dtype, param_dtype=spec.param_dtype, rngs=rngs)
      self.double_stream_modulation_img = Modulation(h, double=True, **mod)
      self.double_stream_modulation_txt = Modulation(h, double=True, **mod)
      self.single_stream_modulation = Modulation(h, double=False, **mod)
    self.double_blocks = stack_blocks(lambda r: DoubleStreamBlock(spec, r), spec.depth, rngs)
    self.single_blocks = stack_blocks(lambda r: SingleStreamBlock(spec, r),
                                      spec.depth_single_blocks, rngs)
    self.final_layer = LastLayer(h, spec.out_channels, use_bias=bias, dtype=spec.dtype,
                                 param_dtype=spec.param_dtype, rngs=rngs, lora=spec.lora,
                                 lora_dtype=spec.trainable_dtype)

  def embed(self, img, img_ids, txt, txt_ids, timesteps, vec=None, guidance=None) -> Streams:
    s = self.spec
    temb = lambda t: timestep_embedding(t, 256, upstream=s.upstream)
    v = self.time_in(temb(timesteps))
    if self.guidance_in is not None:
      if guidance is None:
        raise ValueError("this model embeds guidance (model.guidance_embed); pass guidance=[B]")
      v = v + self.guidance_in(temb(guidance))
    if self.vector_in is not None:
      if vec is None:
        raise ValueError("FLUX.1 needs the pooled CLIP vector: pass vec=[B, model.vec_in_dim]")
      v = v + self.vector_in(vec)
    ids = jnp.concatenate([txt_ids, img_ids], axis=1)
    rope = rope_cos_sin(rope_angles(ids, s.axes_dim, s.theta, upstream=s.upstream))
    mods = ()
    if s.family == "flux2":
      mods = (self.double_stream_modulation_img(v), self.double_stream_modulation_txt(v),
              self.single_stream_modulation(v))
    return Streams(img=constrain(self.img_in(img), TOKENS), txt=constrain(self.txt_in(txt), TOKENS),
                   vec=v, rope=rope, mods=mods)

  def run_double(self, st: Streams) -> Streams:
    mod_img, mod_txt = st.mods[:2] if st.mods else (None, None)
    with jax.named_scope("double_blocks"):
      img, txt = scan_blocks(
          self.double_blocks, (st.img, st.txt),
          lambda blk, c: blk(c[0], c[1], st.vec, mod_img, mod_txt, st.rope),
          remat=self.spec.remat_for("double_blocks"), scan=self.spec.scan_layers,
          axes=(TOKENS, TOKENS))
    return dataclasses.replace(st, img=img, txt=txt)

  def run_single(self, st: Streams) -> jax.Array:
    """Single blocks over [txt; img] then the final layer on the image tokens."""
    mod = st.mods[2] if st.mods else None
    x = jnp.concatenate([st.txt, st.img], axis=1)
    with jax.named_scope("single_blocks"):
      x = scan_blocks(self.single_blocks, x, lambda blk, c: blk(c, st.vec, mod, st.rope),
                      remat=self.spec.remat_for("single_blocks"), scan=self.spec.scan_layers,
                      axes=TOKENS)
    with jax.named_scope("final_layer"):
      out = self.final_layer(x[:, st.txt.shape[1]:], st.vec)
    return out.astype(jnp.float32)

  def __call__(self, img, img_ids, txt, txt_ids, timesteps, vec=None, guidance=None) -> jax.Array:
    """Velocity [B, N_img, out_channels] in float32 for tokens [B, N_img, in_channels]."""
    return self.run_single(self.run_double(self.embed(img, img_ids, txt, txt_ids, timesteps,
                                                      vec, guidance)))
