"""Tiny FLUX.1-Kontext-family CoTIR with random weights (guidance, pooled CLIP vector, T5 text)."""

from cotir_jax.config import defaults


def get_config():
  c = defaults("flux-dev-kontext")
  c.project_name = "CoTIR-tiny-kontext"
  m = c.model
  m.base_model_name = "tiny-flux1"
  m.hidden_size = 64
  m.num_heads = 2
  m.axes_dim = (8, 12, 12)
  m.depth = 2
  m.depth_single_blocks = 2
  m.context_in_dim = 32  # tiny T5 width
  m.vec_in_dim = 32      # tiny CLIP width
  m.dtype = "float32"
  m.param_dtype = "float32"
  m.cot_adapter.depth = 2
  m.lora.rank = 8
  return c
