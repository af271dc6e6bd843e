"""The CoT adapter (spec §7): six attention blocks over [txt; img] that update the text stream,
then three heads predicting the text-encoder features of the scene description ("sharpness"
layers, spec §17.4), the degradation description and the enhancement plan.

It uses FLUX.1-style layers (biases, GELU-tanh, per-block modulation) on every backbone. Its
residual into the backbone's text stream is the sum of the three pre-GELU hidden features times
three zero-initialised scalars, so an untrained adapter leaves the backbone unchanged.

Exact shortcut: upstream computes queries, attention and MLP for every image token of each
block and then discards those rows; here only the text rows are computed (same numbers).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from cotir_jax.models.layers import (HIDDEN, TOKENS, Dense, LastLayer, Modulation, QKNorm,
                                     attention, gelu_tanh, modulate, param, scan_blocks,
                                     split_heads, stack_blocks)
from cotir_jax.sharding import constrain
from cotir_jax.models.spec import ModelSpec


def _dense(spec: ModelSpec, rngs, i, o, axes):
  return Dense(i, o, use_bias=True, axes=axes, dtype=spec.dtype, param_dtype=spec.trainable_dtype,
               rngs=rngs)


class CoTIRBlock(nnx.Module):
  def __init__(self, spec: ModelSpec, rngs):
    h = spec.hidden_size
    self.hidden, self.num_heads, self.attention = h, spec.num_heads, spec.attention
    self.mlp_hidden = int(h * spec.adapter_mlp_ratio)
    self.linear1 = _dense(spec, rngs, h, 3 * h + self.mlp_hidden, ("embed", "mlp"))
    self.linear2 = _dense(spec, rngs, h + self.mlp_hidden, h, ("mlp", "embed"))
    self.norm = QKNorm(spec.head_dim, param_dtype=spec.trainable_dtype)
    self.modulation = Modulation(h, double=False, use_bias=True, dtype=spec.dtype,
                                 param_dtype=spec.trainable_dtype, rngs=rngs)

  def __call__(self, x, img, vec, rope):
    n_txt, h = x.shape[1], self.hidden
    sh, sc, g = self.modulation(vec)
    z = modulate(jnp.concatenate([x, img], axis=1), sh, sc)
    z_txt = z[:, :n_txt]
    q = self.linear1(z_txt, slice(0, h)).reshape(*z_txt.shape[:2], self.num_heads, -1)
    k, v = split_heads(constrain(self.linear1(z, slice(h, 3 * h)), HIDDEN), 2, self.num_heads)
    m = constrain(self.linear1(z_txt, slice(3 * h, None)), HIDDEN)
    q, k = self.norm(q, k, v)
    cos, sin = rope
    a = attention(q, k, v, rope, self.attention, q_rope=(cos[:, :n_txt], sin[:, :n_txt]))
    return x + g[:, None] * self.linear2(jnp.concatenate([a, gelu_tanh(m)], axis=-1))


class CoTAdapter(nnx.Module):
  def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
    h, out = spec.hidden_size, spec.adapter_out_channels
    self.spec = spec
    self.decoder = stack_blocks(lambda r: CoTIRBlock(spec, r), spec.adapter_depth, rngs)
    self.degradation_layer = _dense(spec, rngs, h, h, ("embed", "mlp"))
    self.sharpness_layer = _dense(spec, rngs, h, h, ("embed", "mlp"))
    self.planning_layer = _dense(spec, rngs, 2 * h, h, ("mlp", "embed"))
    last = dict(use_bias=True, dtype=spec.dtype, param_dtype=spec.trainable_dtype, rngs=rngs)
    self.final_degradation_layer = LastLayer(h, out, **last)
    self.final_sharpness_layer = LastLayer(h, out, **last)
    self.final_planning_layer = LastLayer(h, out, **last)
    zero = lambda: param(jnp.zeros((1,), spec.trainable_dtype), (None,))
    self.scale_degradation = zero()
    self.scale_sharpness = zero()
    self.scale_planning = zero()

  def __call__(self, txt, img, vec, rope):
    """Returns (txt residual [B, L, H], scene, degradation, plan [B, L, out_channels]) in float32."""
    img = constrain(img, TOKENS)
    x = scan_blocks(self.decoder, txt, lambda blk, c: blk(c, img, vec, rope),
                    remat=self.spec.remat_for("cot_adapter"), scan=self.spec.scan_layers,
                    axes=TOKENS)
    x_deg = self.degradation_layer(x)
    x_sharp = self.sharpness_layer(x)
    x_plan = self.planning_layer(jnp.concatenate([x_deg, x_sharp], axis=-1))
    f32 = lambda y: y.astype(jnp.float32)
    scene = f32(self.final_sharpness_layer(gelu_tanh(x_sharp), vec))
    degradation = f32(self.final_degradation_layer(gelu_tanh(x_deg), vec))
    plan = f32(self.final_planning_layer(gelu_tanh(x_plan), vec))
    residual = (x_deg * self.scale_degradation[...].astype(x_deg.dtype)
                + x_sharp * self.scale_sharpness[...].astype(x_deg.dtype)
                + x_plan * self.scale_planning[...].astype(x_deg.dtype))
    return residual, scene, degradation, plan
