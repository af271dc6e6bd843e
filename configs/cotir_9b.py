"""CoTIR-9B: FLUX.2-klein-9B backbone, upstream `configs/train_cotir-9b.yaml`."""

from cotir_jax.config import defaults


def get_config():
  c = defaults("flux.2-klein-9b")
  c.project_name = "CoTIR-9B"
  # global batches: upstream's per-GPU (6, 4, 2, 1) × the 8 GPUs of its README run
  c.training.batch_sizes = tuple(8 * b for b in (6, 4, 2, 1))
  return c
