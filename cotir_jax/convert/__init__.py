"""Weights in and out: diffusers / transformers / upstream CoTIR ↔ our modules (design decision 8)."""

from cotir_jax.convert.core import ConversionError
from cotir_jax.convert.flux import load_transformer

__all__ = ["ConversionError", "load_transformer"]
