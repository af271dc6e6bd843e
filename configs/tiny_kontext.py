"""Tiny FLUX.1-Kontext-family CoTIR (guidance, pooled CLIP vector, T5 text) on its tiny
pretrained base (`assets/tiny_base/flux1`, made by `python scripts/pretrain_tiny_base.py`;
`--config.model.pretrained=None` gives random weights instead)."""

from cotir_jax.config import tiny


def get_config():
  c = tiny("flux-dev-kontext")
  c.project_name = "CoTIR-tiny-kontext"
  m = c.model
  m.pretrained = "assets/tiny_base/flux1"
  m.axes_dim = (8, 12, 12)
  m.context_in_dim = 32  # tiny T5 width
  m.vec_in_dim = 32      # tiny CLIP width
  m.tokenizer = "assets/tokenizers/tiny_clip"
  m.tokenizer_2 = "assets/tokenizers/tiny_t5"
  return c
