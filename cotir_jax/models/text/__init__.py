"""Frozen text encoders: Qwen3 (FLUX.2-klein), T5 v1.1 and CLIP-L (FLUX.1).

Each reproduces its transformers model exactly (float32 parity ≤ 2e-5 relative) and takes
bfloat16 weights with a configurable compute dtype. `build_text_encoder` picks the module
from a config: one of the dataclasses below, or a mapping (e.g. an ml_collections
ConfigDict) with `model_type` ("qwen3" | "t5" | "clip_text_model") and the dataclass fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax.numpy as jnp
from flax import nnx

from cotir_jax.models.attention import AttentionSpec
from cotir_jax.models.text.clip import CLIPTextConfig, CLIPTextEncoder, clip_config
from cotir_jax.models.text.qwen3 import Qwen3Config, Qwen3Embedder, qwen3_config
from cotir_jax.models.text.t5 import T5Config, T5Encoder, t5_config

CONFIGS = {"qwen3": Qwen3Config, "t5": T5Config, "clip_text_model": CLIPTextConfig}
MODULES = {Qwen3Config: Qwen3Embedder, T5Config: T5Encoder, CLIPTextConfig: CLIPTextEncoder}

TextConfig = Qwen3Config | T5Config | CLIPTextConfig


def text_config(cfg) -> TextConfig:
  """Our config dataclass from a dataclass or a mapping with `model_type` and field values."""
  if isinstance(cfg, tuple(MODULES)):
    return cfg
  if not isinstance(cfg, Mapping) and hasattr(cfg, "items"):  # an ml_collections ConfigDict
    cfg = dict(cfg.items())
  if not isinstance(cfg, Mapping):
    raise TypeError(f"text encoder config must be a config dataclass or a mapping, got {type(cfg)}")
  model_type = cfg.get("model_type")
  if model_type not in CONFIGS:
    raise ValueError(f"text encoder model_type {model_type!r} is not supported; "
                     f"choose one of {sorted(CONFIGS)}")
  cls = CONFIGS[model_type]
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(cfg) - names)
  if unknown:
    raise ValueError(f"unknown {model_type} text encoder field(s) {unknown}")
  return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})


def build_text_encoder(cfg, *, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                       rngs: nnx.Rngs, implementation: AttentionSpec | str = "xla",
                       scan: bool = True):
  """The Qwen3 embedder, T5 encoder or CLIP text encoder for `cfg` (random init);
  `implementation`: its attention kernel (`model.attention`, see models/attention.py)."""
  cfg = text_config(cfg)
  return MODULES[type(cfg)](cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                            implementation=implementation, scan=scan)


__all__ = ["CLIPTextConfig", "CLIPTextEncoder", "Qwen3Config", "Qwen3Embedder", "T5Config",
           "T5Encoder", "TextConfig", "build_text_encoder", "clip_config", "qwen3_config",
           "t5_config", "text_config"]
