"""Tiny FLUX.1-Kontext-family CoTIR with random weights (guidance, pooled CLIP vector, T5 text)."""

from cotir_jax.config import tiny


def get_config():
  c = tiny("flux-dev-kontext")
  c.project_name = "CoTIR-tiny-kontext"
  m = c.model
  m.axes_dim = (8, 12, 12)
  m.context_in_dim = 32  # tiny T5 width
  m.vec_in_dim = 32      # tiny CLIP width
  m.tokenizer = "assets/tokenizers/tiny_clip"
  m.tokenizer_2 = "assets/tokenizers/tiny_t5"
  return c
