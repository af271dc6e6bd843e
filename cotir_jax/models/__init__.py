"""Flax NNX modules: the FLUX backbones, the CoT adapter, LoRA, and the frozen encoders."""

from cotir_jax.models.adapter import CoTAdapter
from cotir_jax.models.cotir import TRAINABLE, CoTIR
from cotir_jax.models.flux import FluxTransformer
from cotir_jax.models.layers import merge_lora
from cotir_jax.models.spec import ModelSpec

__all__ = ["CoTIR", "CoTAdapter", "FluxTransformer", "ModelSpec", "TRAINABLE", "merge_lora"]
