"""CoTIR-4B: FLUX.2-klein-4B backbone, upstream `configs/train_cotir-4b.yaml`."""

from cotir_jax.config import defaults


def get_config():
  c = defaults("flux.2-klein-4b")
  c.project_name = "CoTIR-4B"
  # global batches: upstream's per-GPU (12, 10, 6, 4) × the 8 GPUs of its README run
  c.training.batch_sizes = tuple(8 * b for b in (12, 10, 6, 4))
  return c
