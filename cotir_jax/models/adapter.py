"""The CoT adapter: six attention blocks over [txt; img] that update the text stream,
then three heads predicting the text-encoder features of the scene description (upstream's
"sharpness" layers), the degradation description and the enhancement plan.

It uses FLUX.1-style layers (biases, GELU-tanh, per-block modulation) on every backbone. Its
residual into the backbone's text stream is the sum of the three pre-GELU hidden features times
three zero-initialised scalars, so an untrained adapter leaves the backbone unchanged.

Exact shortcut: upstream computes queries, attention and MLP for every image token of each
block and then discards those rows; here only the text rows are computed (same numbers).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from cotir_jax.models.layers import (FUSED, TOKENS, Dense, FusedLayout, LastLayer, Modulation,
                                     QKNorm, attention, gelu_tanh, modulate, param, scan_blocks,
                                     stack_blocks, to_heads)
from cotir_jax.sharding import constrain
from cotir_jax.models.spec import ModelSpec


def _dense(spec: ModelSpec, rngs, i, o, axes):
  return Dense(i, o, use_bias=True, axes=axes, dtype=spec.dtype, param_dtype=spec.trainable_dtype,
               rngs=rngs)


class CoTIRBlock(nnx.Module):
  """A single-stream block (linear1 = [q | k | v | mlp-in], linear2 = [attention | mlp-out],
  interleaved by head group as the backbone's) whose outputs are the text rows only."""

  def __init__(self, spec: ModelSpec, rngs):
    h = spec.hidden_size
    self.num_heads, self.attention = spec.num_heads, spec.attention
    self.layout = spec.adapter_linear1_layout
    self.linear1 = _dense(spec, rngs, h, sum(self.layout.sizes), ("embed", "heads"))
    self.linear2 = _dense(spec, rngs, sum(spec.adapter_linear2_layout.sizes), h,
                          ("heads", "embed"))
    self.norm = QKNorm(spec.head_dim, param_dtype=spec.trainable_dtype)
    self.modulation = Modulation(h, double=False, use_bias=True, dtype=spec.dtype,
                                 param_dtype=spec.trainable_dtype, rngs=rngs)

  def __call__(self, x, img, vec, rope):
    n_txt, layout = x.shape[1], self.layout
    sh, sc, g = self.modulation(vec)
    z = modulate(jnp.concatenate([x, img], axis=1), sh, sc)
    # q and the MLP input for the text rows, k and v for every row
    q, m = layout.subset((0, 3)).split(constrain(
        self.linear1(z[:, :n_txt], cols=lambda w: layout.take(w, (0, 3))), FUSED))
    k, v = layout.subset((1, 2)).split(constrain(
        self.linear1(z, cols=lambda w: layout.take(w, (1, 2))), FUSED))
    q, k, v = (to_heads(t, self.num_heads) for t in (q, k, v))
    q, k = self.norm(q, k, v)
    cos, sin = rope
    a = attention(q, k, v, rope, self.attention, q_rope=(cos[:, :n_txt], sin[:, :n_txt]))
    a = a.reshape(*a.shape[:-1], layout.groups, -1)
    return x + g[:, None] * self.linear2(FusedLayout.join([a, gelu_tanh(m)]))


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
    # unsharded like the text stream it is added to (the heads' outputs may be split over
    # `tensor`, which would otherwise spread into the stream and the blocks' inputs)
    return constrain(residual, TOKENS), scene, degradation, plan
