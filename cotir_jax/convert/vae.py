"""diffusers `AutoencoderKLFlux2` / `AutoencoderKL` ↔ our `Flux2AutoEncoder` / `Flux1AutoEncoder`.

Our module tree mirrors diffusers' names, so the table is a rename per layer kind: conv
`weight` [out,in,kh,kw] → HWIO `kernel`, GroupNorm `weight` → `scale`, Linear `weight` →
transposed `kernel`, attention `to_out.0` → `to_out`. The table is generated from the
architecture config (which blocks have a shortcut conv, how many resnets, ...), and drives
import, export and the meta-device coverage check alike. BatchNorm's `num_batches_tracked`
counter is the only reference key we drop.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import ml_collections
from flax import nnx

from cotir_jax.convert.core import (CONV, IDENTITY, ConversionError, Rule, flat_params,
                                    import_params, linear, materialize, rule)
from cotir_jax.convert.safetensors_io import SafetensorsDir
from cotir_jax.models.vae import build_vae, vae_config

CLASSES = {"AutoencoderKLFlux2": "flux2", "AutoencoderKL": "flux1"}
IGNORE = (r"(^|\.)bn\.num_batches_tracked$",)


def _conv(ours: str, ref: str) -> list[Rule]:
  return [rule(f"{ours}.kernel", f"{ref}.weight", t=CONV),
          rule(f"{ours}.bias", f"{ref}.bias", t=IDENTITY)]


def _norm(ours: str, ref: str) -> list[Rule]:
  return [rule(f"{ours}.scale", f"{ref}.weight", t=IDENTITY),
          rule(f"{ours}.bias", f"{ref}.bias", t=IDENTITY)]


def _resnet(p: str, cin: int, cout: int) -> list[Rule]:
  rules = [*_norm(f"{p}.norm1", f"{p}.norm1"), *_conv(f"{p}.conv1", f"{p}.conv1"),
           *_norm(f"{p}.norm2", f"{p}.norm2"), *_conv(f"{p}.conv2", f"{p}.conv2")]
  if cin != cout:
    rules += _conv(f"{p}.conv_shortcut", f"{p}.conv_shortcut")
  return rules


def _mid(p: str, c: int, attention: bool) -> list[Rule]:
  rules = _resnet(f"{p}.resnets.0", c, c) + _resnet(f"{p}.resnets.1", c, c)
  if attention:
    a = f"{p}.attentions.0"
    rules += _norm(f"{a}.group_norm", f"{a}.group_norm")
    for n in ("to_q", "to_k", "to_v"):
      rules += linear(f"{a}.{n}", f"{a}.{n}", bias=True)
    rules += linear(f"{a}.to_out", f"{a}.to_out.0", bias=True)
  return rules


def vae_rules(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[Rule]:
  """The table for one autoencoder config; `prefix` places it inside a bigger module."""
  enc_ch = tuple(cfg.block_out_channels)
  dec_ch = tuple(cfg.get("decoder_block_out_channels") or enc_ch)
  n, attn = cfg.layers_per_block, cfg.mid_block_add_attention
  rules = _conv("encoder.conv_in", "encoder.conv_in")
  for i, c in enumerate(enc_ch):
    p = f"encoder.down_blocks.{i}"
    for j in range(n):
      rules += _resnet(f"{p}.resnets.{j}", enc_ch[max(i - 1, 0)] if j == 0 else c, c)
    if i < len(enc_ch) - 1:
      rules += _conv(f"{p}.downsamplers.0.conv", f"{p}.downsamplers.0.conv")
  rules += _mid("encoder.mid_block", enc_ch[-1], attn)
  rules += _norm("encoder.conv_norm_out", "encoder.conv_norm_out")
  rules += _conv("encoder.conv_out", "encoder.conv_out")

  rev = tuple(reversed(dec_ch))
  rules += _conv("decoder.conv_in", "decoder.conv_in")
  rules += _mid("decoder.mid_block", dec_ch[-1], attn)
  for i, c in enumerate(rev):
    p = f"decoder.up_blocks.{i}"
    for j in range(n + 1):
      rules += _resnet(f"{p}.resnets.{j}", rev[max(i - 1, 0)] if j == 0 else c, c)
    if i < len(rev) - 1:
      rules += _conv(f"{p}.upsamplers.0.conv", f"{p}.upsamplers.0.conv")
  rules += _norm("decoder.conv_norm_out", "decoder.conv_norm_out")
  rules += _conv("decoder.conv_out", "decoder.conv_out")

  if cfg.use_quant_conv:
    rules += _conv("quant_conv", "quant_conv")
  if cfg.use_post_quant_conv:
    rules += _conv("post_quant_conv", "post_quant_conv")
  if cfg.family == "flux2":
    rules += [rule("bn.running_mean", "bn.running_mean", t=IDENTITY),
              rule("bn.running_var", "bn.running_var", t=IDENTITY)]
  if prefix:
    rules = [Rule(prefix + r.ours, r.ref, r.transform) for r in rules]
  return rules


def vae_config_from_diffusers(config: dict, *, source: str = "config.json"
                              ) -> ml_collections.ConfigDict:
  """Our VAE config (diffusers field names) from a diffusers `vae/config.json` dict."""
  cls = config.get("_class_name")
  if cls not in CLASSES:
    raise ConversionError(f"{source}: unsupported autoencoder class {cls!r}; expected one of "
                          f"{sorted(CLASSES)}")
  family = CLASSES[cls]
  c = vae_config(family)
  for key in c.keys():  # keys missing from the file keep the FLUX defaults
    if key == "family" or key not in config:
      continue
    value = config[key]
    if value is None and key == "shift_factor":
      value = 0.0  # diffusers: no shift
    if value is not None:
      c[key] = tuple(value) if isinstance(value, list) else value
  for key, want in (("down_block_types", "DownEncoderBlock2D"),
                    ("up_block_types", "UpDecoderBlock2D")):
    got = config.get(key, [want] * len(c.block_out_channels))
    if any(t != want for t in got) or len(got) != len(c.block_out_channels):
      raise ConversionError(f"{source}: {key}={got} is not supported; expected "
                            f"{len(c.block_out_channels)} × {want!r}")
  if config.get("act_fn", "silu") != "silu":
    raise ConversionError(f"{source}: act_fn={config['act_fn']!r} is not supported (only 'silu')")
  return c


def load_vae(path: str, dtype=None, *, compute_dtype=None):
  """A diffusers `vae/` directory (config.json + single or sharded safetensors) → our module.

  `dtype` is the parameter dtype (default: the file's); `compute_dtype` defaults to float32
  for float32 parameters, else bfloat16. BatchNorm statistics stay float32.
  """
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise ConversionError(f"{path}: no config.json (expected a diffusers vae/ directory)")
  with open(cfg_path) as f:
    config = json.load(f)
  cfg = vae_config_from_diffusers(config, source=cfg_path)
  tensors = SafetensorsDir(path)
  file_dtype = next((jnp.dtype(tensors[k].dtype) for k in tensors if k.endswith(".weight")),
                    jnp.dtype(jnp.float32))
  param_dtype = jnp.dtype(dtype) if dtype is not None else file_dtype
  compute = compute_dtype or (jnp.float32 if param_dtype == jnp.float32 else jnp.bfloat16)
  build = lambda: build_vae(cfg, dtype=compute, param_dtype=param_dtype, rngs=nnx.Rngs(0))
  targets = flat_params(nnx.eval_shape(build))
  params = import_params(vae_rules(cfg), tensors, targets, source=path, ignore=IGNORE)
  return materialize(build, params)
