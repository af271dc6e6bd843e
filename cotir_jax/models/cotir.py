"""CoTIR = FLUX backbone (+ LoRA on the single blocks and final layer) + CoT adapter."""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from cotir_jax.models.adapter import CoTAdapter
from cotir_jax.models.flux import FluxTransformer
from cotir_jax.models.spec import ModelSpec

# What training updates, by variable type and path: every LoRA variable and all of the adapter.
TRAINABLE = nnx.Any(nnx.LoRAParam, nnx.PathContains("cot_adapter"))


class CoTIR(nnx.Module):
  """`model(img, img_ids, txt, txt_ids, timesteps, vec=None, guidance=None)` →
  (velocity [B, N_img, C], scene, degradation, plan [B, L_txt, D_ctx]), all float32."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, platform: str | None = None):
    """`cfg`: `config.model` or a `ModelSpec`; `platform`: see `ModelSpec.from_config`."""
    spec = cfg if isinstance(cfg, ModelSpec) else ModelSpec.from_config(cfg, platform)
    self.backbone = FluxTransformer(spec, rngs=rngs)
    self.cot_adapter = CoTAdapter(spec, rngs=rngs)

  def __call__(self, img, img_ids, txt, txt_ids, timesteps, vec=None, guidance=None):
    st = self.backbone.run_double(self.backbone.embed(img, img_ids, txt, txt_ids, timesteps,
                                                      vec, guidance))
    with jax.named_scope("cot_adapter"):
      residual, scene, degradation, plan = self.cot_adapter(st.txt, st.img, st.vec, st.rope)
    st = dataclasses.replace(st, txt=st.txt + residual.astype(st.txt.dtype))
    return self.backbone.run_single(st), scene, degradation, plan
