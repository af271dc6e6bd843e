"""Tiny FLUX.1-Kontext-family CoTIR with random weights (guidance, pooled CLIP vector, T5 text)."""

from cotir_jax.config import defaults, use_encoders


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
  m.remat_policy = "none"  # nothing to save at these sizes; halves the compile time
  m.cot_adapter.depth = 2
  m.lora.rank = 8
  use_encoders(m, "flux1", "tiny")
  m.encoder_dtype = "float32"
  m.tokenizer = "assets/tokenizers/tiny_clip"
  m.tokenizer_2 = "assets/tokenizers/tiny_t5"

  d = c.data
  d.data_dir = "data/sample"  # the real-photo sample set shipped in the repository
  d.num_workers = 0      # decode in the main process: fine for 32-64 px patches
  d.max_length = 64      # text tokens per prompt / answer
  d.val_batch_size = 2

  t = c.training
  t.iterations = (60, 120)
  t.patch_sizes = (32, 64)
  t.batch_sizes = (4, 2)
  t.learning_rate = 2e-3  # tiny random models learn visibly within 120 steps
  t.lr_warmup_steps = 10
  t.val_steps = 60
  t.save_steps = 40
  t.log_steps = 1
  t.num_steps = 4
  return c
