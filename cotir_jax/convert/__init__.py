"""Weights in and out: diffusers / transformers / upstream CoTIR ↔ our modules, one rule table
per family.

Import-safe: only the table modules and Orbax helpers load here; torch is imported lazily
where upstream `.pt` files are read or written.
"""

from cotir_jax.convert.base import (diffusers_to_orbax, load_base, read_manifest,
                                    restore_base_params, tokenizer_path)
from cotir_jax.convert.bfl import load_transformer as load_bfl_transformer
from cotir_jax.convert.core import ConversionError
from cotir_jax.convert.cotir import (cotir_to_orbax, load_cotir_weights, orbax_to_cotir,
                                     save_cotir_weights)
from cotir_jax.convert.flux import load_transformer
from cotir_jax.convert.orbax_io import load_trainable, save_trainable

try:  # written by the encoder issue; keep `convert` importable without them
  from cotir_jax.convert.vae import load_vae
except ImportError:  # pragma: no cover
  load_vae = None
try:
  from cotir_jax.convert.text import load_text_encoder
except ImportError:  # pragma: no cover
  load_text_encoder = None

__all__ = ["ConversionError", "cotir_to_orbax", "diffusers_to_orbax", "load_base",
           "load_bfl_transformer", "load_cotir_weights", "load_text_encoder", "load_trainable",
           "load_transformer", "load_vae", "orbax_to_cotir", "read_manifest",
           "restore_base_params", "save_cotir_weights", "save_trainable", "tokenizer_path"]
