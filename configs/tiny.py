"""Tiny FLUX.2-family CoTIR with random weights: trains on a laptop CPU on the shipped sample data.

The embedded default of `python -m cotir_jax.train`, the demo and the test fixture. Same code
paths as `cotir_4b.py`; only sizes, schedule lengths and dtypes differ (`config.tiny`).
"""

from cotir_jax.config import tiny


def get_config():
  c = tiny("flux.2-klein-4b")
  c.project_name = "CoTIR-tiny"
  m = c.model
  m.axes_dim = (8, 8, 8, 8)
  m.context_in_dim = 96  # 3 stacked hidden layers of a 32-wide tiny Qwen3
  m.tokenizer = "assets/tokenizers/tiny_qwen3"
  return c
