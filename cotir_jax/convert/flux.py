"""diffusers `Flux2Transformer2DModel` / `FluxTransformer2DModel` ↔ our `FluxTransformer`.

One rule table per family. Differences the transforms absorb: diffusers splits q, k, v (and
FLUX.1's single-block MLP input) into separate Linears where BFL / we fuse them; our fused
projections interleave their parts by head group (`models.layers.FusedLayout`); its
`norm_out` emits (scale, shift) where we emit (shift, scale).
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
from flax import nnx

from cotir_jax.convert.core import (FUSED, FUSED_LINEAR, IDENTITY, SWAPPED, SWAPPED_LINEAR,
                                    ConversionError, Rule, import_params, linear, materialize,
                                    regroup, rule, flat_params)
from cotir_jax.convert.safetensors_io import SafetensorsDir
from cotir_jax.models.flux import FluxTransformer
from cotir_jax.models.spec import ModelSpec

CLASSES = {"Flux2Transformer2DModel": "flux2", "FluxTransformer2DModel": "flux1"}


def _fused(ours: str, refs: list[str], bias: bool, layout) -> list[Rule]:
  """Separate diffusers Linears (q, k, v[, MLP input]) → our fused kernel in `layout`."""
  rules = [rule(f"{ours}.kernel", *[f"{r}.weight" for r in refs],
                t=regroup(FUSED_LINEAR, layout, -1))]
  if bias:
    rules.append(rule(f"{ours}.bias", *[f"{r}.bias" for r in refs], t=regroup(FUSED, layout, -1)))
  return rules


def _norms(ours: str, q: str, k: str) -> list[Rule]:
  return [rule(f"{ours}.query_norm.scale", f"{q}.weight", t=IDENTITY),
          rule(f"{ours}.key_norm.scale", f"{k}.weight", t=IDENTITY)]


def transformer_rules(spec: ModelSpec, *, prefix: str = "") -> list[Rule]:
  """The table of the transformer `spec` describes (its family, guidance embedder and fused
  layouts); `prefix` places it inside a bigger module (e.g. "backbone.")."""
  family, guidance_embed = spec.family, spec.guidance_embed
  b = family == "flux1"
  p = prefix
  d, s = "transformer_blocks.{i}", "single_transformer_blocks.{i}"
  emb = "time_text_embed" if b else "time_guidance_embed"
  rules = [
      *linear(f"{p}img_in", "x_embedder", b),
      *linear(f"{p}txt_in", "context_embedder", b),
      *linear(f"{p}time_in.in_layer", f"{emb}.timestep_embedder.linear_1", b),
      *linear(f"{p}time_in.out_layer", f"{emb}.timestep_embedder.linear_2", b),
      # double blocks: image stream = to_*, text stream = add_*_proj
      *_fused(f"{p}double_blocks.img_attn.qkv",
              [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"], b, spec.qkv_layout),
      *_norms(f"{p}double_blocks.img_attn.norm", f"{d}.attn.norm_q", f"{d}.attn.norm_k"),
      *linear(f"{p}double_blocks.img_attn.proj", f"{d}.attn.to_out.0", b),
      *_fused(f"{p}double_blocks.txt_attn.qkv",
              [f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"], b,
              spec.qkv_layout),
      *_norms(f"{p}double_blocks.txt_attn.norm", f"{d}.attn.norm_added_q", f"{d}.attn.norm_added_k"),
      *linear(f"{p}double_blocks.txt_attn.proj", f"{d}.attn.to_add_out", b),
      *_norms(f"{p}single_blocks.norm", f"{s}.attn.norm_q", f"{s}.attn.norm_k"),
      *linear(f"{p}final_layer.linear", "proj_out", b),
      rule(f"{p}final_layer.adaLN_modulation.kernel", "norm_out.linear.weight", t=SWAPPED_LINEAR),
  ]
  if b:
    rules += [rule(f"{p}final_layer.adaLN_modulation.bias", "norm_out.linear.bias", t=SWAPPED)]
  if guidance_embed:
    rules += [*linear(f"{p}guidance_in.in_layer", f"{emb}.guidance_embedder.linear_1", b),
              *linear(f"{p}guidance_in.out_layer", f"{emb}.guidance_embedder.linear_2", b)]
  if family == "flux2":
    rules += [
        *linear(f"{p}double_stream_modulation_img.lin", "double_stream_modulation_img.linear", False),
        *linear(f"{p}double_stream_modulation_txt.lin", "double_stream_modulation_txt.linear", False),
        *linear(f"{p}single_stream_modulation.lin", "single_stream_modulation.linear", False),
        *linear(f"{p}double_blocks.img_mlp.fc1", f"{d}.ff.linear_in", False,
                cols=spec.mlp_in_layout),
        *linear(f"{p}double_blocks.img_mlp.fc2", f"{d}.ff.linear_out", False),
        *linear(f"{p}double_blocks.txt_mlp.fc1", f"{d}.ff_context.linear_in", False,
                cols=spec.mlp_in_layout),
        *linear(f"{p}double_blocks.txt_mlp.fc2", f"{d}.ff_context.linear_out", False),
        *linear(f"{p}single_blocks.linear1", f"{s}.attn.to_qkv_mlp_proj", False,
                cols=spec.linear1_layout),
        *linear(f"{p}single_blocks.linear2", f"{s}.attn.to_out", False,
                rows=spec.linear2_layout),
    ]
  else:
    rules += [
        *linear(f"{p}vector_in.in_layer", f"{emb}.text_embedder.linear_1", True),
        *linear(f"{p}vector_in.out_layer", f"{emb}.text_embedder.linear_2", True),
        *linear(f"{p}double_blocks.img_mod.lin", f"{d}.norm1.linear", True),
        *linear(f"{p}double_blocks.txt_mod.lin", f"{d}.norm1_context.linear", True),
        *linear(f"{p}double_blocks.img_mlp.fc1", f"{d}.ff.net.0.proj", True),
        *linear(f"{p}double_blocks.img_mlp.fc2", f"{d}.ff.net.2", True),
        *linear(f"{p}double_blocks.txt_mlp.fc1", f"{d}.ff_context.net.0.proj", True),
        *linear(f"{p}double_blocks.txt_mlp.fc2", f"{d}.ff_context.net.2", True),
        *_fused(f"{p}single_blocks.linear1",
                [f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v", f"{s}.proj_mlp"], True,
                spec.linear1_layout),
        *linear(f"{p}single_blocks.linear2", f"{s}.proj_out", True, rows=spec.linear2_layout),
        *linear(f"{p}single_blocks.modulation.lin", f"{s}.norm.linear", True),
    ]
  return rules


def spec_from_diffusers(config: dict, *, source: str = "config.json", dtype=jnp.float32,
                        param_dtype=jnp.float32, **overrides) -> ModelSpec:
  """Our `ModelSpec` (backbone only, no LoRA) from a diffusers transformer config.json."""
  cls = config.get("_class_name")
  if cls not in CLASSES:
    raise ConversionError(f"{source}: unsupported transformer class {cls!r}; "
                          f"expected one of {sorted(CLASSES)}")
  family = CLASSES[cls]
  heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
  flux2 = family == "flux2"
  spec = ModelSpec(
      family=family, in_channels=config["in_channels"],
      out_channels=config.get("out_channels") or config["in_channels"],
      hidden_size=heads * head_dim, num_heads=heads, depth=config["num_layers"],
      depth_single_blocks=config["num_single_layers"],
      mlp_ratio=float(config.get("mlp_ratio", 3.0 if flux2 else 4.0)),
      axes_dim=tuple(config["axes_dims_rope"]),
      theta=float(config.get("rope_theta", 2000 if flux2 else 10000)),
      context_in_dim=config["joint_attention_dim"],
      vec_in_dim=0 if flux2 else config["pooled_projection_dim"],
      guidance_embed=bool(config.get("guidance_embeds", not flux2)),
      adapter_depth=0, adapter_mlp_ratio=4.0, adapter_out_channels=config["joint_attention_dim"],
      lora=None, dtype=dtype, param_dtype=param_dtype, trainable_dtype=jnp.float32,
      upstream=False, attention="xla", remat="none", scan_layers=True)
  return spec.replace(**overrides)


def load_transformer(path: str, *, dtype=None, compute_dtype=None, **spec_overrides) -> FluxTransformer:
  """A diffusers `transformer/` directory (config.json + single or sharded safetensors) → module.

  `dtype` is the parameter dtype (default: the file's), `compute_dtype` the matmul dtype
  (default float32 when dtype is float32, else bfloat16).
  """
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise ConversionError(f"{path}: no config.json (expected a diffusers transformer/ directory)")
  with open(cfg_path) as f:
    config = json.load(f)
  tensors = SafetensorsDir(path)
  file_dtype = jnp.dtype(next(iter(tensors.values())).dtype) if len(tensors) else jnp.float32
  param_dtype = jnp.dtype(dtype) if dtype is not None else file_dtype
  compute = compute_dtype or (jnp.float32 if param_dtype == jnp.float32 else jnp.bfloat16)
  spec = spec_from_diffusers(config, source=cfg_path, dtype=compute, param_dtype=param_dtype,
                             **spec_overrides)
  build = lambda: FluxTransformer(spec, rngs=nnx.Rngs(0))
  targets = flat_params(nnx.eval_shape(build))
  params = import_params(transformer_rules(spec), tensors, targets, source=path)
  return materialize(build, params)
