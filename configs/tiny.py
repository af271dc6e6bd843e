"""Tiny FLUX.2-family CoTIR on its tiny pretrained base: trains on a laptop CPU on the shipped
sample data and visibly learns to restore.

The embedded default of `python -m cotir_jax.train`, the demo and the test fixture. Same code
paths as `cotir_4b.py`; only sizes, schedule lengths and dtypes differ (`config.tiny`). The
frozen base (`assets/tiny_base/flux2`: autoencoder, Qwen3 encoder and a transformer pretrained
as an image editor) is a converted base checkpoint like FLUX.2-klein's, made by
`python scripts/pretrain_tiny_base.py`; `--config.model.pretrained=None` gives random weights
instead.
"""

from cotir_jax.config import tiny


def get_config():
  c = tiny("flux.2-klein-4b")
  c.project_name = "CoTIR-tiny"
  m = c.model
  m.pretrained = "assets/tiny_base/flux2"
  m.axes_dim = (8, 8, 8, 8)
  m.context_in_dim = 96  # 3 stacked hidden layers of a 32-wide tiny Qwen3
  m.tokenizer = "assets/tokenizers/tiny_qwen3"
  return c
