"""Builds what training runs: the CoTIR model, the frozen encoders and the host tokenizers.

With `model.pretrained` the frozen weights come from a checkpoint written by
`convert/diffusers_to_orbax.py` (transformer, VAE, text encoders, tokenizers); without it every
module is randomly initialised from the config (the tiny configs).
"""

from __future__ import annotations

import os

from flax import nnx

from cotir_jax import models, tokenization
from cotir_jax.models.layers import dtype_of
from cotir_jax.models.text import build_text_encoder
from cotir_jax.models.vae import build_vae


def build_modules(cfg) -> dict:
  """{"model": CoTIR, "vae", "text", "clip" (FLUX.1 only, else None)}."""
  m = cfg.model
  rngs = nnx.Rngs(cfg.seed)
  model = models.CoTIR(m, rngs=rngs)
  enc = dict(dtype=dtype_of(m.encoder_dtype), param_dtype=dtype_of(m.encoder_dtype), rngs=rngs)
  out = {"model": model, "vae": build_vae(m.vae, **enc),
         "text": build_text_encoder(m.text_encoder, **enc),
         "clip": build_text_encoder(m.clip, **enc) if "clip" in m else None}
  if m.pretrained:
    from cotir_jax.convert.orbax_io import load_base_into
    load_base_into(m.pretrained, out)
  return out


def _tokenizer_dir(cfg, field: str, stored: str) -> str:
  path = cfg.model.get(field)
  if path:
    return path
  if cfg.model.pretrained:
    return os.path.join(cfg.model.pretrained, stored)
  raise ValueError(f"model.{field} is unset and there is no model.pretrained to take "
                   f"{stored}/ from; point model.{field} at a tokenizer directory")


def build_tokenizers(cfg) -> dict:
  """Host tokenizers keyed as the data pipeline names its arrays: qwen (FLUX.2) or t5 + clip."""
  n = cfg.data.max_length
  if cfg.model.family == "flux2":
    return {"qwen": tokenization.QwenChatTokenizer(_tokenizer_dir(cfg, "tokenizer", "tokenizer"), n)}
  return {"t5": tokenization.T5TextTokenizer(_tokenizer_dir(cfg, "tokenizer_2", "tokenizer_2"), n),
          "clip": tokenization.CLIPTextTokenizer(_tokenizer_dir(cfg, "tokenizer", "tokenizer"), 77)}
