"""BFL single-file FLUX transformers ↔ our `FluxTransformer`.

Upstream CoTIR loads its base transformer from Black Forest Labs' native checkpoints:
`flux-2-klein-4b.safetensors` / `flux-2-klein-9b.safetensors` (FLUX.2-klein) and
`flux1-kontext-dev.safetensors` (FLUX.1-Kontext). Our parameter names follow BFL's, so the
tables below are almost one to one: a Linear's `weight` is our transposed `kernel`, the MLPs'
`*_mlp.0` / `*_mlp.2` are our `fc1` / `fc2`, blocks stack on our leading layer axis, the fused
projections (`qkv`, `linear1`, `linear2`'s rows, the SwiGLU `*_mlp.0`) are regrouped by head
(`models.layers.FusedLayout`), and `final_layer.adaLN_modulation.1` already emits (shift,
scale) as ours does (no swap, unlike diffusers' `norm_out`). FLUX.2-klein has no biases;
FLUX.1 has one on every Linear.

A BFL file holds only the transformer and no config: `transformer_config` derives the
diffusers-style config the rest of the converter stores (layer counts and widths from the
tensor shapes, RoPE axes and θ from the family), unless a diffusers `transformer/config.json`
is at hand. Keys may carry ComfyUI's `model.diffusion_model.` prefix.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax.numpy as jnp
from flax import nnx

from cotir_jax.convert.core import (IDENTITY, ConversionError, Rule, flat_params, import_params,
                                    linear, materialize, rule)
from cotir_jax.convert.flux import spec_from_diffusers
from cotir_jax.convert.safetensors_io import SafetensorsDir, SafetensorsError
from cotir_jax.models.flux import FluxTransformer
from cotir_jax.models.spec import ModelSpec

KEY_PREFIXES = ("model.diffusion_model.",)
# a key only one family has → family; diffusers-style config class of each family
FAMILY_MARKERS = {"single_stream_modulation.lin.weight": "flux2", "vector_in.in_layer.weight": "flux1"}
CLASS_NAMES = {"flux2": "Flux2Transformer2DModel", "flux1": "FluxTransformer2DModel"}
# RoPE of the BFL parameter classes: klein (Klein4BParams / Klein9BParams) splits the head
# dimension into four equal axes with θ = 2000; FLUX.1 uses (16, 56, 56) of a 128-wide head.
ROPE_THETA = {"flux2": 2000, "flux1": 10000}
FLUX1_AXES = (16, 56, 56)
# fields every diffusers transformer config.json has; a config given for a file must agree
CHECKED_FIELDS = ("_class_name", "in_channels", "num_layers", "num_single_layers",
                  "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                  "guidance_embeds", "pooled_projection_dim")


# ----------------------------------------------------------------------------- the tables

def _norms(ours: str, theirs: str) -> list[Rule]:
  return [rule(f"{ours}.query_norm.scale", f"{theirs}.query_norm.scale", t=IDENTITY),
          rule(f"{ours}.key_norm.scale", f"{theirs}.key_norm.scale", t=IDENTITY)]


def transformer_rules(spec: ModelSpec, *, prefix: str = "", key_prefix: str = "") -> list[Rule]:
  """The BFL table of the transformer `spec` describes (family, guidance embedder, fused
  layouts). `prefix` places it inside a bigger module ("backbone."); `key_prefix` is the
  prefix every key of the file carries ("" or "model.diffusion_model.")."""
  family, guidance_embed = spec.family, spec.guidance_embed
  if family not in CLASS_NAMES:
    raise ConversionError(f"unknown family {family!r}; expected one of {sorted(CLASS_NAMES)}")
  b = family == "flux1"
  p, k = prefix, key_prefix
  d, s = f"{k}double_blocks.{{i}}", f"{k}single_blocks.{{i}}"
  lin = lambda ours, theirs, **fused: linear(f"{p}{ours}", theirs, b, **fused)
  rules = [
      *lin("img_in", f"{k}img_in"),
      *lin("txt_in", f"{k}txt_in"),
      *lin("time_in.in_layer", f"{k}time_in.in_layer"),
      *lin("time_in.out_layer", f"{k}time_in.out_layer"),
      *lin("final_layer.linear", f"{k}final_layer.linear"),
      *lin("final_layer.adaLN_modulation", f"{k}final_layer.adaLN_modulation.1"),
      *lin("single_blocks.linear1", f"{s}.linear1", cols=spec.linear1_layout),
      *lin("single_blocks.linear2", f"{s}.linear2", rows=spec.linear2_layout),
      *_norms(f"{p}single_blocks.norm", f"{s}.norm"),
  ]
  for stream in ("img", "txt"):
    rules += [*lin(f"double_blocks.{stream}_attn.qkv", f"{d}.{stream}_attn.qkv",
                   cols=spec.qkv_layout),
              *_norms(f"{p}double_blocks.{stream}_attn.norm", f"{d}.{stream}_attn.norm"),
              *lin(f"double_blocks.{stream}_attn.proj", f"{d}.{stream}_attn.proj"),
              *lin(f"double_blocks.{stream}_mlp.fc1", f"{d}.{stream}_mlp.0",
                   cols=spec.mlp_in_layout),
              *lin(f"double_blocks.{stream}_mlp.fc2", f"{d}.{stream}_mlp.2")]
  if guidance_embed:
    rules += [*lin("guidance_in.in_layer", f"{k}guidance_in.in_layer"),
              *lin("guidance_in.out_layer", f"{k}guidance_in.out_layer")]
  if family == "flux2":  # shared modulations, one per stream
    rules += [*lin("double_stream_modulation_img.lin", f"{k}double_stream_modulation_img.lin"),
              *lin("double_stream_modulation_txt.lin", f"{k}double_stream_modulation_txt.lin"),
              *lin("single_stream_modulation.lin", f"{k}single_stream_modulation.lin")]
  else:  # pooled CLIP vector and per-block modulations
    rules += [*lin("vector_in.in_layer", f"{k}vector_in.in_layer"),
              *lin("vector_in.out_layer", f"{k}vector_in.out_layer"),
              *lin("double_blocks.img_mod.lin", f"{d}.img_mod.lin"),
              *lin("double_blocks.txt_mod.lin", f"{d}.txt_mod.lin"),
              *lin("single_blocks.modulation.lin", f"{s}.modulation.lin")]
  return rules


# ----------------------------------------------------------------------------- the file

def key_prefix(keys) -> str:
  """The prefix every key of a BFL file carries: "" or ComfyUI's "model.diffusion_model."."""
  keys = list(keys)
  for p in KEY_PREFIXES:
    if keys and all(key.startswith(p) for key in keys):
      return p
  return ""


def family_of(keys, source: str) -> str:
  """"flux2" (klein) or "flux1" (Kontext) from the keys only one of them has."""
  p = key_prefix(keys)
  found = {fam for marker, fam in FAMILY_MARKERS.items() if p + marker in set(keys)}
  if len(found) != 1:
    raise ConversionError(
        f"{source}: not a BFL FLUX transformer checkpoint (expected exactly one of "
        f"{sorted(FAMILY_MARKERS)}: FLUX.2-klein or FLUX.1-Kontext native key names)")
  return found.pop()


def _count(keys, pattern: str) -> int:
  idx = {int(m.group(1)) for key in keys if (m := re.match(pattern, key))}
  if idx != set(range(len(idx))):
    raise ConversionError(f"block indices {sorted(idx)} of {pattern!r} are not 0..n-1")
  return len(idx)


def _architecture(shapes: Mapping[str, tuple[int, ...]], source: str) -> dict:
  """Every diffusers config field that the tensor shapes determine."""
  keys = list(shapes)
  family, p = family_of(keys, source), key_prefix(keys)

  def shape(name):
    if p + name not in shapes:
      raise ConversionError(f"{source}: missing key {p + name!r}")
    return tuple(shapes[p + name])

  hidden, in_channels = shape("img_in.weight")
  head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
  config = {
      "_class_name": CLASS_NAMES[family],
      "in_channels": in_channels,
      "out_channels": shape("final_layer.linear.weight")[0],
      "num_layers": _count(keys, rf"{re.escape(p)}double_blocks\.(\d+)\."),
      "num_single_layers": _count(keys, rf"{re.escape(p)}single_blocks\.(\d+)\."),
      "attention_head_dim": head_dim,
      "num_attention_heads": hidden // head_dim,
      "joint_attention_dim": shape("txt_in.weight")[1],
      "mlp_ratio": shape("double_blocks.0.img_mlp.2.weight")[1] / hidden,
      "guidance_embeds": p + "guidance_in.in_layer.weight" in shapes,
  }
  if family == "flux1":
    config["pooled_projection_dim"] = shape("vector_in.in_layer.weight")[1]
  return config


def transformer_config(shapes: Mapping[str, tuple[int, ...]], source: str) -> dict:
  """The diffusers-style transformer config.json of a BFL file, from its key → shape map:
  what `flux.spec_from_diffusers` reads and the base checkpoint's manifest stores. The RoPE
  axes and θ are not in the weights: they are the family's (klein, FLUX.1)."""
  config = _architecture(shapes, source)
  family = {v: k for k, v in CLASS_NAMES.items()}[config["_class_name"]]
  head_dim = config["attention_head_dim"]
  axes = (head_dim // 4,) * 4 if family == "flux2" else FLUX1_AXES
  if sum(axes) != head_dim:
    raise ConversionError(
        f"{source}: head dimension {head_dim} does not fit the {family} RoPE axes {axes}; "
        "give the matching diffusers transformer/config.json")
  return {**config, "axes_dims_rope": list(axes), "rope_theta": ROPE_THETA[family]}


def open_file(path: str) -> SafetensorsDir:
  """The lazy tensors of a safetensors file (headers read only)."""
  try:
    return SafetensorsDir(path)
  except SafetensorsError as e:
    raise ConversionError(str(e)) from None


def read(path: str, config: dict | None = None) -> tuple[SafetensorsDir, dict]:
  """(lazy tensors, config) of a BFL single-file transformer. `config`: a diffusers
  transformer config.json describing it (checked against the file); default: derived."""
  tensors = open_file(path)
  shapes = {k: tensors.shape(k) for k in tensors}
  if config is None:
    return tensors, transformer_config(shapes, path)
  derived = _architecture(shapes, path)
  diff = [f"{f} {config.get(f)!r} vs {derived[f]!r}" for f in CHECKED_FIELDS
          if f in derived and config.get(f) != derived[f]]
  if diff:
    raise ConversionError(f"{path}: the given transformer config does not describe this file "
                          f"(config vs file: {', '.join(diff)})")
  return tensors, config


def load_transformer(path: str, *, config: dict | None = None, dtype=None,
                     compute_dtype=None) -> FluxTransformer:
  """A BFL single-file transformer → our module, as `flux.load_transformer` does for a
  diffusers directory. `dtype` is the parameter dtype (default: the file's), `compute_dtype`
  the matmul dtype (default float32 when dtype is float32, else bfloat16)."""
  tensors, config = read(path, config)
  param_dtype = jnp.dtype(dtype or next(iter(tensors.values())).dtype)
  compute = compute_dtype or (jnp.float32 if param_dtype == jnp.float32 else jnp.bfloat16)
  spec = spec_from_diffusers(config, source=path, dtype=compute, param_dtype=param_dtype)
  build = lambda: FluxTransformer(spec, rngs=nnx.Rngs(0))
  rules = transformer_rules(spec, key_prefix=key_prefix(tensors))
  params = import_params(rules, tensors, flat_params(nnx.eval_shape(build)), source=path)
  return materialize(build, params)
